"""messages.decode checks every key against its message's rule (schema.cddl's types and ranges), on
the gateway and on the board alike: a refusal names the message, the key and the fault, and says
what a receiver counts it as. Property tests compare it with the rules written out again by hand
(tests/protocol/message_gen.py reference()) over generated messages of every type, valid and
broken; the messages the generator calls valid also pass the CDDL itself (pycddl); the board's
decoder (the real VM) gives the same verdicts; and the corpus of what the generator found replays."""

import json
from pathlib import Path

import cbor2
import pycddl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hil_tests.support import vm
from protocol import link, roles
from protocol import messages as M
from tests.protocol import message_gen as G
from tests.protocol.test_cbor import to_cbor2, vm_single_floats

SCHEMA = pycddl.Schema((vm.ROOT / "protocol" / "schema.cddl").read_text())
CORPUS = Path(__file__).resolve().parent / "corpus" / "found.json"
GENERATED = {"decode": 0, "cddl": 0}


def _refusal(msg_type, message):
    with pytest.raises(M.MessageError) as e:
        M.decode(msg_type, cbor2.dumps(message, canonical=True))
    return e.value.reason, str(e.value)


def _with(msg_type, message, **changes):
    m = dict(message)
    for key, value in changes.items():
        m[int(key[1:])] = value
    return msg_type, m


HELLO = M.hello(3, "0.2.0", "esp32-devkitc", 0, bytes(8), False, 0, board_t_s=10, addr=1)
READINGS = M.readings(3, 1, 900, 900, 0, M.units("L", 0, 1000), [5, 7], 100)
DOSER_ROW = [40, 2010, 1234, 480, 512, 560, 60, 0, 0, 0, 2000]


@pytest.mark.parametrize("msg_type, message, reason, text", [
    (*_with(M.READINGS, READINGS, k1=-1), "invalid_readings", "readings: key 1 (seq) is not a u32"),
    (*_with(M.READINGS, READINGS, k1=2**32), "invalid_readings", "readings: key 1 (seq) is not a u32"),
    (*_with(M.READINGS, READINGS, k0=-1), "invalid_readings", "readings: key 0 (boot_id) is not a u32"),
    (*_with(M.READINGS, READINGS, k6=[5, "7"]), "invalid_readings", "readings: key 6 (rows) row 1 is not a uint"),
    (*_with(M.READINGS, READINGS, k3=86401), "invalid_readings", "readings: key 3 (interval_s) is not a uint <= 86400"),
    (*_with(M.READINGS, READINGS, k5={0: "L", 1: 10}), "invalid_readings",
     "readings: key 5 (units) key 1 (scale) is not an int in -9..9"),
    (*_with(M.READINGS, READINGS, k5={0: "litres!!!", 1: 0}), "invalid_readings",
     "readings: key 5 (units) key 0 (unit) is not text of 1..8 bytes"),
    (*_with(M.READINGS, READINGS, k10=1), "invalid_readings", "readings: key 10 (seq_step) is not a uint >= 2"),
    (*_with(M.READINGS, READINGS, k9=2), "invalid_readings", "readings: key 9 (series) is not a uint <= 1"),
    (*_with(M.READINGS, READINGS, k1=2**32 - 1), "invalid_readings",
     "readings: key 6 (rows) run past a u32 seq or board second (2 rows)"),
    (*_with(M.READINGS, READINGS, k4=1, k6=[DOSER_ROW, DOSER_ROW[:-1]]), "invalid_readings",
     "readings: key 6 (rows) row 1 is not an array of 11 uints"),
    (*_with(M.READINGS, READINGS, k4=1, k6=[DOSER_ROW[:1] + [1.5] + DOSER_ROW[2:]]), "invalid_readings",
     "readings: key 6 (rows) row 0 is not an array of 11 uints"),
    (*_with(M.READINGS, READINGS, k4=3), "invalid_readings", "readings: key 4 (role) is not a uint <= 2"),
    (*_with(M.HELLO, HELLO, k0="3"), "invalid_hello", "hello: key 0 (boot_id) is not a u32"),
    (*_with(M.HELLO, HELLO, k1=""), "invalid_hello", "hello: key 1 (firmware) is not text of 1..32 bytes"),
    (*_with(M.HELLO, HELLO, k1="\u00e9" * 17), "invalid_hello", "hello: key 1 (firmware) is not text of 1..32 bytes"),
    (*_with(M.HELLO, HELLO, k4=bytes(7)), "invalid_hello",
     "hello: key 4 (config_hash) is not a byte string of 8 bytes"),
    (*_with(M.HELLO, HELLO, k6=7), "invalid_hello", "hello: key 6 (reset_cause) is not a uint <= 6"),
    (*_with(M.HELLO, HELLO, k8=255), "invalid_hello", "hello: key 8 (addr) is not a uint <= 254"),
    (*_with(M.ALARM, M.alarm(3, 4, 5, 1, True), k4=1), "invalid_alarm", "alarm: key 4 (active) is not a bool"),
    (*_with(M.ALARM, M.alarm(3, 4, 5, 1, True), k5=0.5), "invalid_alarm", "alarm: key 5 (detail) is not an int"),
    (*_with(M.HEALTH, M.health(3, 60, 1, 1, 0, 0, 1, 1, 0, 0, 0), k7=1001), "invalid_health",
     "health: key 7 (log_fill_permille) is not a uint <= 1000"),
    (*_with(M.HEALTH, M.health(3, 60, 1, 1, 0, 0, 1, 1, 0, 0, 0), k6={0: 1, 1: 1}), "invalid_health",
     "health: key 6 (link) key 2 missing (rejected)"),
    (*_with(M.ACK, M.ack(3, 4), k1=True), "invalid_ack", "ack: key 1 (seq) is not a u32"),
    (*_with(M.TIME_SYNC, M.time_sync(1, 2), k0=2**32 * 1000), "invalid_time_sync",
     "time_sync: key 0 (wall_ms) is not a uint <= 4294967295999"),
    (*_with(M.CONFIG_PUSH, M.config_push(1, {}), k1={1: 2}), "invalid_config_push",
     "config_push: key 1 (config) is not a map of text keys"),
    (*_with(M.COMMAND, M.command(1, "ping"), k1="x" * 33), "invalid_command",
     "command: key 1 (name) is not text of 1..32 bytes"),
    (*_with(M.COMMAND_RESULT, M.command_result(1, True), k0=-1), "invalid_command_result",
     "command_result: key 0 (id) is not a uint"),
    (M.ACK, {1: "x"}, "bad_payload", "ack: key 0 missing (boot_id)"),        # a key missing comes first
    (M.ACK, [3, 4], "bad_payload", "ack: payload is not a map"),
    (M.ACK, {0: 3, "1": 4}, "bad_payload", "ack: map keys of more than one type at offset 3"),
])
def test_a_refusal_names_the_message_the_key_and_what_it_is_counted_as(msg_type, message, reason, text):
    assert _refusal(msg_type, message) == (reason, text)
    assert reason in link.REASONS


def test_unknown_keys_are_ignored_and_a_valid_message_comes_back_whole():
    m = {**READINGS, 11: "from a newer board", 2**32: [1.5]}
    assert M.decode(M.READINGS, cbor2.dumps(m, canonical=True)) == m


def test_the_rules_know_every_role_reset_cause_and_message():
    rules = {t: {r[0]: r for r in rs} for t, rs in M.RULES.items()}
    assert rules[M.HELLO][3][4] == rules[M.READINGS][4][4] == len(roles.ROLES) - 1
    assert rules[M.HELLO][6][4] == rules[M.HEALTH][5][4] == len(M.RESET_CAUSES) - 1
    assert set(M.RULES) == set(M.NAMES)
    assert {f"invalid_{name}" for name in M.NAMES.values()} <= set(link.REASONS)
    for t, rs in M.RULES.items():             # the keys schema.cddl requires are the ones the rules require
        assert [r[0] for r in rs if r[5]] == list(range(G._REQUIRED[t])) or t == M.READINGS
    assert sorted(r[0] for r in M.RULES[M.READINGS] if r[5]) == list(range(7))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(G.payloads())
def test_decode_gives_the_verdict_the_schema_gives(frame):
    msg_type, payload = frame
    GENERATED["decode"] += 1
    try:
        M.decode(msg_type, payload)
        got = None
    except M.MessageError as e:           # nothing else may come out
        got = e.reason
    assert got == G.expected(msg_type, payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(M.NAMES)).flatmap(lambda t: st.tuples(st.just(t), G.valid_message(t))))
def test_what_the_generator_calls_valid_the_cddl_calls_valid(typed):
    msg_type, m = typed
    GENERATED["cddl"] += 1
    payload = cbor2.dumps(m, canonical=True)
    if G.reference(msg_type, m) is None:
        SCHEMA.validate_cbor(payload)
        assert cbor2.dumps(to_cbor2(M.decode(msg_type, payload)), canonical=True) == payload


def test_the_corpus_of_what_the_generator_found_is_refused_as_recorded():
    corpus = json.loads(CORPUS.read_text())
    assert len(corpus) >= 50
    for c in corpus:
        payload = bytes.fromhex(c["payload"])
        with pytest.raises(M.MessageError) as e:
            M.decode(c["type"], payload)
        assert (e.value.reason, str(e.value)) == (c["reason"], c["now"]) == (G.expected(c["type"], payload), c["now"])


BOARD = """
import sys
from protocol import messages as M
for line in sys.stdin:
    t, h = line.split()
    try:
        M.decode(int(t), bytes.fromhex(h) if h != "-" else b"")
        print("accepted")
    except M.MessageError as e:
        print(e.reason)
    except Exception as e:
        print("raised", repr(e))
"""
DRAWN = []


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(G.payloads())
def _draw(frame):
    DRAWN.append(frame)


def test_the_board_gives_the_same_verdicts():
    DRAWN.clear()
    _draw()
    frames = DRAWN + [(c["type"], bytes.fromhex(c["payload"])) for c in json.loads(CORPUS.read_text())]
    out = vm.run(BOARD, stdin="".join(f"{t} {p.hex() or '-'}\n" for t, p in frames)).split("\n")
    single = vm_single_floats()
    got = [line for line in out if line]
    want = [G.expected(t, p, single_floats=single) or "accepted" for t, p in frames]
    assert [(M.NAMES.get(t, t), p.hex(), g) for (t, p), g, w in zip(frames, got, want) if g != w] == []
    assert len(got) == len(frames)
    print(f"\ntest_validate: decode checked on {GENERATED['decode']} generated payloads, the CDDL on "
          f"{GENERATED['cddl']} valid ones, the board on {len(DRAWN)} (+ {len(frames) - len(DRAWN)} from the corpus)")
