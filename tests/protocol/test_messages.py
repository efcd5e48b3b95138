"""Message payloads: valid against schema.cddl, the same bytes on both sides,
and a meter batch that fits one ESP-NOW frame."""

import cbor2
import pycddl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor, framing, secure
from protocol import messages as M
from protocol.examples import EXAMPLES
from protocol.roles import meter as meter_spec
from hil_tests.support import vm

SCHEMA = pycddl.Schema((vm.ROOT / "protocol" / "schema.cddl").read_text())


@pytest.mark.parametrize("msg_type, message", EXAMPLES, ids=[f"{M.NAMES[t]}{i}" for i, (t, _) in enumerate(EXAMPLES)])
def test_every_message_validates_against_the_cddl_and_decodes(msg_type, message):
    payload = cbor.encode(message)
    SCHEMA.validate_cbor(payload)
    assert M.decode(msg_type, payload) == message
    assert payload == cbor2.dumps(message, canonical=True)


def test_the_schema_refuses_what_it_should():
    bad = dict(EXAMPLES[0][1])
    bad[3] = 7                                              # no such role
    with pytest.raises(Exception):
        SCHEMA.validate_cbor(cbor.encode(bad))
    with pytest.raises(Exception):
        SCHEMA.validate_cbor(cbor.encode({0: 1}))          # an ack without its seq


def test_missing_keys_and_unknown_types_are_named():
    with pytest.raises(M.MessageError, match="ack: key 1 missing"):
        M.decode(M.ACK, cbor.encode({0: 1}))
    with pytest.raises(M.MessageError, match="unknown message type 42"):
        M.decode(42, b"\xa0")


def test_vm_encodes_every_message_type_to_the_same_bytes():
    script = "from protocol import cbor\nfrom protocol.examples import EXAMPLES\n" \
             "for t, m in EXAMPLES:\n    print(cbor.encode(m).hex())\n"
    assert vm.run(script).split() == [cbor2.dumps(m, canonical=True).hex() for _t, m in EXAMPLES]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.lists(st.integers(0, 5000), max_size=80), st.integers(0, 2**40))
def test_meter_hot_path_encoder_matches_the_general_one(boot, seq, t0, deltas, register):
    buf = bytearray(512)
    n = meter_spec.encode_readings_into(buf, 0, boot, seq, t0, 900, 1000, register, deltas, len(deltas))
    expected = cbor.encode(M.readings(boot, seq, t0, 900, 0, M.units("L", 0, 1000), deltas, register))
    assert bytes(buf[:n]) == expected
    SCHEMA.validate_cbor(expected)


def test_meter_hot_path_allocates_nothing_in_the_vm():
    out = vm.run(
        "import micropython\nfrom protocol.roles import meter as meter_spec\n"
        "buf = bytearray(256)\ndeltas = bytearray(range(40))\nn = 0\n"
        "micropython.heap_lock()\n"
        "for _ in range(10):\n"
        "    n = meter_spec.encode_readings_into(buf, 0, 7, 120, 900, 900, 1000, 123456, deltas, 40)\n"
        "micropython.heap_unlock()\n"
        "print(bytes(buf[:n]).hex())\n")
    assert out.strip() == cbor.encode(M.readings(7, 120, 900, 900, 0, M.units("L", 0, 1000), list(range(40)),
                                                 123456)).hex()


def test_eighty_household_readings_fit_one_esp_now_frame():
    """A household meter's 15-minute litres (mostly 0-30 L) for 20 hours."""
    import random
    rnd = random.Random(5)
    deltas = [rnd.choice([0, 0, 0, 2, 5, 9, 14, 22, 30]) for _ in range(80)]
    payload = cbor.encode(M.readings(1234, 99999, 86400, 900, 0, M.units("L", 0, 1000), deltas, 1234567))
    frame_len = secure.OVERHEAD + len(payload)
    assert frame_len <= framing.MAX_FRAME, frame_len
