"""The gateway's receive path is total: frames that authenticate (sealed with the device's real key:
buggy firmware or a leaked key) but carry messages of every type with wrong types, extreme
integers, floats, NaN, deep nesting, long arrays, text and negative keys beside the integer ones,
unknown keys and types never raise out of Sessions, each is counted once (accepted, or refused
under the reason the schema gives it), nothing of a refused message reaches the store, and the
device's next good readings batch is accepted, committed and acknowledged.

The frames come from tests/protocol/message_gen.py (built from the schema, with a reference
verdict for each); what the generator found before the receive path was made total is replayed from
tests/protocol/corpus/found.json."""

import json
import tempfile
from pathlib import Path

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.session import Sessions
from gateway.store import Store
from protocol import link, secure
from protocol import messages as M
from protocol.secure import MemoryCounters
from tests.protocol import message_gen as G

KEY = bytes(range(16))
DEVICE = 0x2A
GOOD_BOOT = 4_000_000_001          # a boot no generated message names (they stay below 2**32 - 1 mostly)
CORPUS = Path(__file__).resolve().parents[1] / "protocol" / "corpus" / "found.json"
FRAMES = []                        # frames fed by the property test (its count is printed with -s)


class Rig:
    """One gateway session store and one board that holds the device's real key."""

    def __init__(self, folder):
        self.wires = []
        self.store = Store(Path(folder) / "s.db")
        self.s = Sessions(self.store, lambda d: KEY if d == DEVICE else None,
                          lambda addr, wire: self.wires.append(wire), lambda d: MemoryCounters(0),
                          clock=lambda: 1_800_000_000.0)
        self.board = link.Sender(KEY, DEVICE, secure.UPLINK, MemoryCounters(1))
        self.downlink = []
        self.board_rx = link.Receiver(secure.DOWNLINK, lambda d: KEY if d == DEVICE else None,
                                      lambda d, c, t, m: self.downlink.append((t, m)), accept_any_addr=True)

    def counts(self):
        return dict(self.s.counts(), accepted=self.s.receiver.accepted)

    def feed(self, msg_type, payload):
        """Seal and feed one frame; return (what it was counted as, problems seen)."""
        before, pending = self.counts(), len(self.s.pending)
        n = self.board.wire_into(msg_type, bytearray(payload), len(payload))
        try:
            self.s.feed(bytes(self.board.wire[:n]))
        except Exception as e:       # noqa: BLE001 - what the test is about
            return None, [f"raised {e!r}"]
        after = self.counts()
        moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        problems = []
        if list(moved.values()) != [1]:
            problems.append(f"counted as {moved}")
        got = next(iter(moved), None)
        want = G.expected(msg_type, payload)
        if got != ("accepted" if want is None else want):
            problems.append(f"counted as {got}, the schema says {want or 'accepted'}")
        if got != "accepted" and len(self.s.pending) != pending:
            problems.append("a refused message left entries to commit")
        return got, problems

    def good_batch_is_acknowledged(self, seq):
        """The board's next good frame: accepted, committed, acknowledged."""
        got, problems = self.feed(M.READINGS, cbor2.dumps(G.good_readings(GOOD_BOOT, seq), canonical=True))
        self.wires.clear()
        try:
            committed = self.s.flush()
        except Exception as e:       # noqa: BLE001
            return problems + [f"flush raised {e!r}"]
        for wire in self.wires:
            self.board_rx.feed(wire)
        acks = [m for t, m in self.downlink if t == M.ACK and m[0] == GOOD_BOOT and m[1] >= seq + 1]
        if got != "accepted" or committed < 2 or not acks:
            problems.append(f"next good batch: counted as {got}, {committed} committed, acks {self.downlink}")
        return problems


def run_frames(frames):
    """Feed frames [(msg_type, payload)], then a good batch; return every problem seen."""
    with tempfile.TemporaryDirectory() as folder:
        rig = Rig(folder)
        problems = []
        for i, (msg_type, payload) in enumerate(frames):
            _got, p = rig.feed(msg_type, payload)
            problems += [f"frame {i} ({M.NAMES.get(msg_type, msg_type)} {payload.hex()}): {x}" for x in p]
        problems += rig.good_batch_is_acknowledged(1)
        rig.store.close()
        return problems


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(G.payloads(), min_size=1, max_size=6))
def test_authenticated_garbage_never_raises_is_counted_once_and_stores_nothing(frames):
    FRAMES.extend(frames)
    assert run_frames(frames) == []


def test_zz_frames_generated():
    """Says how many frames the property test fed (pytest -s shows it)."""
    print(f"\ntest_receive_total: {len(FRAMES)} generated frames fed to the gateway's receive path")


def test_the_corpus_of_what_the_generator_found_is_counted_and_never_stored():
    corpus = json.loads(CORPUS.read_text())
    assert corpus
    frames = [(c["type"], bytes.fromhex(c["payload"])) for c in corpus]
    for frame in frames:                                  # each alone, then all in a row
        assert run_frames([frame]) == []
    assert run_frames(frames) == []


def test_a_hello_with_a_text_boot_id_cannot_stall_the_devices_readings(tmp_path):
    """Issue 17: such a hello used to be taken, and every good frame of the device then raised."""
    rig = Rig(tmp_path)
    hello = M.hello(3, "0.2.0", "esp32-devkitc", 0, bytes(8), False, 0, board_t_s=10, addr=1)
    hello[0] = "3"
    got, problems = rig.feed(M.HELLO, cbor2.dumps(hello, canonical=True))
    assert got == "invalid_hello" and problems == []
    assert rig.s.devices.get(DEVICE) is None or rig.s.devices[DEVICE].boot_id is None
    assert rig.good_batch_is_acknowledged(1) == []


def test_a_handler_that_raises_is_counted_and_logged_once_without_a_traceback(tmp_path, caplog):
    rig = Rig(tmp_path)
    rig.s.on_command_result = lambda device_id, m: 1 / 0
    for _ in range(3):
        got, problems = rig.feed(M.COMMAND_RESULT, cbor2.dumps(M.command_result(5, True, "ok"), canonical=True))
        assert got == "handler_error" and problems == ["counted as handler_error, the schema says accepted"]
    logged = [r for r in caplog.records if "message_refused" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None
    assert "ZeroDivisionError" in logged[0].getMessage() and "test_receive_total.py" in logged[0].getMessage()
    assert rig.counts()["handler_error"] == 3
    assert rig.good_batch_is_acknowledged(1) == []
