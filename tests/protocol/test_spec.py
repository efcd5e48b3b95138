"""protocol/SPEC.md stays true: every example in it decodes, verifies and
validates, and is exactly what the code produces today."""

import re

import pycddl

from protocol import messages as M
from protocol import secure
from protocol.examples import DEVICE_ID, EXAMPLES, KEY, spec_blocks
from hil_tests.support import vm

SPEC = (vm.ROOT / "protocol" / "SPEC.md").read_text()


def test_examples_in_the_spec_decode_and_verify():
    frames = [bytes.fromhex(h) for h in re.findall(r"```frame\n([0-9a-f]+)\n```", SPEC)]
    assert len(frames) == len(EXAMPLES)
    schema = pycddl.Schema((vm.ROOT / "protocol" / "schema.cddl").read_text())
    opener = secure.Opener(KEY, DEVICE_ID, secure.UPLINK)
    for frame, (msg_type, message) in zip(frames, EXAMPLES):
        out = bytearray(256)
        t, _counter, n = opener.open_into(frame, len(frame), out)
        schema.validate_cbor(bytes(out[:n]))
        assert t == msg_type and M.decode(t, bytes(out[:n])) == message


def test_spec_examples_are_what_the_code_produces():
    assert spec_blocks().strip() in SPEC
