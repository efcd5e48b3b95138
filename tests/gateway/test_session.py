"""The session layer alone: time fix-up, merged readings against finer ones already stored, ack rules."""

import cbor2

from gateway.session import Sessions
from gateway.store import Store
from protocol import link, secure
from protocol import messages as M
from protocol.secure import MemoryCounters

KEY = bytes(range(16))


class Clock:
    t = 1_800_000_000.0

    def __call__(self):
        return self.t


def rig(tmp_path):
    sent = []
    clock = Clock()
    store = Store(tmp_path / "s.db")
    s = Sessions(store, lambda d: KEY if d == 9 else None, lambda addr, wire: sent.append(wire),
                 lambda d: MemoryCounters(0), clock=clock)
    board = link.Sender(KEY, 9, secure.UPLINK, MemoryCounters(1))

    def up(msg_type, message):
        payload = bytearray(cbor2.dumps(message, canonical=True))
        n = board.wire_into(msg_type, payload, len(payload))
        s.feed(bytes(board.wire[:n]))

    return s, store, clock, up, sent


def items(store):
    return store.entries()


def test_readings_without_wall_time_are_fixed_up_from_the_boards_hello(tmp_path):
    s, store, clock, up, sent = rig(tmp_path)
    up(M.HELLO, M.hello(3, "0.2.0", "esp32-devkitc", 0, bytes(8), False, 0, board_t_s=1000, addr=1))
    assert sent, "a hello is answered with wall time"
    up(M.READINGS, M.readings(3, 1, 1800, 900, 0, M.units("L", 0, 1000), [5, 7], 100))
    up(M.READINGS, M.readings(4, 1, 900, 900, 0, M.units("L", 0, 1000), [1], 112))     # a boot never heard of
    s.flush()
    a, b, c = sorted(items(store), key=lambda i: (i["boot"], i["seq"]))
    assert a["time_source"] == "gateway" and a["wall_t"] == clock.t - 1000 + 1800
    assert b["wall_t"] == a["wall_t"] + 900 and b["register"] == 112
    assert c["time_source"] == "unknown" and c["wall_t"] is None


def test_a_merged_reading_stores_only_what_finer_readings_did_not_cover(tmp_path):
    s, store, clock, up, sent = rig(tmp_path)
    up(M.READINGS, M.readings(1, 1, 900, 900, 0, M.units("L", 0, 1000), [4, 6], 100, wall_t0=1_799_000_000))
    s.flush()
    # The board's log filled; seqs 1-4 were merged into one row before it heard the ack for 1-2.
    up(M.READINGS, M.readings(1, 1, 3600, 3600, 0, M.units("L", 0, 1000), [30], 100, wall_t0=1_799_002_700,
                              seq_step=4))
    acks = s.flush()
    stored = items(store)
    assert [(i["seq"], i.get("seq_last")) for i in stored] == [(1, None), (2, None), (3, 4)]
    assert stored[2]["register_before"] == 110 and stored[2]["value"] == 20 and stored[2]["register"] == 130
    assert store.acked_upto(9, 1) == 4 and acks


def test_a_restarted_gateway_refuses_frames_it_accepted_before(tmp_path):
    s, store, clock, up, sent = rig(tmp_path)
    captured = []
    s.feed = (lambda feed: lambda data, link=None: (captured.append(data), feed(data, link)))(s.feed)
    up(M.HELLO, M.hello(3, "0.2.0", "esp32-devkitc", 0, bytes(8), False, 0, board_t_s=10, addr=1))
    up(M.READINGS, M.readings(3, 1, 900, 900, 0, M.units("L", 0, 1000), [5], 100))
    s.flush()
    again = Sessions(store, lambda d: KEY if d == 9 else None, lambda addr, wire: None,
                     lambda d: MemoryCounters(0), clock=clock)
    for frame in captured:
        again.feed(frame)
    again.flush()
    assert again.counts()["replay"] == 2 and again.receiver.accepted == 0
