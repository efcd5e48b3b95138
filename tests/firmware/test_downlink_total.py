"""The board's downlink path is total, in the real MicroPython VM: a running doser board (its
runtime and uplink, as commissioned) is fed authenticated downlink frames (sealed with its real key)
of every type, valid and broken as tests/protocol/message_gen.py makes them (wrong types, extreme
integers, floats, NaN, deep nesting, long arrays, unknown keys and types). Nothing raises out of
the receiver; each frame is counted once, as the schema says (a refusal shows in health's
`rejected`); a request is always answered; and the good ping after every frame is handled.

Each VM start costs ~0.3 s, so the frames of a run are drawn first (hypothesis) and fed in one
script; what the generator found is replayed from tests/protocol/corpus/found.json."""

import json
from pathlib import Path

import cbor2
from hypothesis import HealthCheck, given, settings

from hil_tests.support import vm
from protocol import link, secure
from protocol import messages as M
from protocol.secure import MemoryCounters
from tests.firmware.test_doser_path import _script
from tests.protocol import message_gen as G
from tests.protocol.test_cbor import vm_single_floats

DEVICE, KEY, ADDR = 7, bytes(16), 1         # what test_doser_path's commission() provisions
FRAMES_PER_RUN = 800
PING = 777                                   # the id of the good command after every frame
CORPUS = Path(__file__).resolve().parents[1] / "protocol" / "corpus" / "found.json"

BODY = """
import sys
u = rt.uplink
r = u.receiver
def snapshot():
    c = r.counts
    c["accepted"] = r.accepted
    return c
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    out = []
    for h in line.split():
        before, sent, faults = snapshot(), u.sent, rt.faults
        try:
            r.feed(bytes.fromhex(h))
            raised = "-"
        except Exception as e:
            raised = type(e).__name__
        after = snapshot()
        moved = [k for k in after if after[k] != before[k]]
        delta = sum(after[k] - before[k] for k in moved)
        out.append("%s,%d,%d,%d,%s" % ("+".join(moved) or "none", delta, u.sent - sent, rt.faults - faults, raised))
    print("R", " ".join(out))
print("H", u.rejected(), u.received)
"""


def _wire(sender, msg_type, payload):
    n = sender.wire_into(msg_type, bytearray(payload), len(payload))
    return bytes(sender.wire[:n]).hex()


def board_run(frames):
    """Feed each frame, then a good ping, to a running board; return [(frame outcome, ping outcome)]
    (each "what,counted,sent,faults,raised") and the board's health counters."""
    gateway = link.Sender(KEY, DEVICE, secure.DOWNLINK, MemoryCounters(1), addr=ADDR)
    ping = M.command(PING, "ping")
    lines = []
    for msg_type, payload in frames:
        lines.append(_wire(gateway, msg_type, payload) + " " + _wire(gateway, M.COMMAND, cbor2.dumps(ping)))
    out = vm.run(_script(BODY), stdin="\n".join(lines) + "\n", timeout=300).strip().split("\n")
    rows = [tuple(line.split()[1:]) for line in out if line.startswith("R ")]     # the board prints its faults too
    assert len(rows) == len(frames), out[-20:]
    return rows, [line.split() for line in out if line.startswith("H ")][-1]


def problems_of(frames):
    single = vm_single_floats()
    rows, health = board_run(frames)
    problems = []
    refused = 0
    for (msg_type, payload), (frame, ping) in zip(frames, rows):
        what, counted, sent, _faults, raised = frame.split(",")
        want = G.expected(msg_type, payload, single_floats=single)
        where = f"{M.NAMES.get(msg_type, msg_type)} {payload.hex()}"
        request = want is None and msg_type in (M.CONFIG_PUSH, M.COMMAND)
        if raised != "-" or counted != "1":
            problems.append(f"{where}: raised {raised}, counted {counted} times")
        elif want is None and what not in ("accepted", "handler_error"):
            problems.append(f"{where}: counted as {what}, the schema says accepted")
        elif want is not None and what != want:
            problems.append(f"{where}: counted as {what}, the schema says {want}")
        if request and sent != "1":
            problems.append(f"{where}: a request answered {sent} times")
        refused += what != "accepted"
        if ping.split(",")[:3] != ["accepted", "1", "1"]:
            problems.append(f"{where}: the ping after it was {ping}")
    if int(health[1]) != refused:
        problems.append(f"health's rejected is {health[1]}, {refused} refused")
    return problems, rows


DRAWN = []


@settings(max_examples=FRAMES_PER_RUN, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(G.payloads(types=G.DOWNLINK_TYPES))
def _draw(frame):
    DRAWN.append(frame)


def test_the_boards_downlink_counts_every_generated_frame_once_and_handles_the_next():
    DRAWN.clear()
    _draw()
    problems, rows = problems_of(DRAWN)
    handler_errors = sum(r[0].startswith("handler_error") for r in rows)
    print(f"\ntest_downlink_total: {len(DRAWN)} generated frames (+ {len(DRAWN)} pings) fed to the board's "
          f"downlink in one VM run; {handler_errors} requests the board could not act on (answered, refused)")
    assert problems == []


def test_the_corpus_of_what_the_generator_found_on_the_downlink():
    frames = [(c["type"], bytes.fromhex(c["payload"])) for c in json.loads(CORPUS.read_text())
              if c["type"] in G.DOWNLINK_TYPES or c.get("side") == "board"]
    assert frames
    problems, _rows = problems_of(frames)
    assert problems == []
