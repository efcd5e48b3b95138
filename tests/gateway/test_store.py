"""gateway/store.py keeps its promise: what commit() acknowledged survives SIGKILL."""

import random
import signal
import subprocess
import sys
import time

import pytest

from gateway.store import Entry, Store


def entries(device, boot, seqs, kind="readings"):
    return [Entry(device, boot, s, kind, 900 * s, b"p%d" % s) for s in seqs]


def test_resent_entries_are_kept_once_and_acked_contiguously(tmp_path):
    st = Store(tmp_path / "g.db")
    assert st.commit(entries(1, 7, range(0, 5))) == {(1, 7): 4}
    assert st.commit(entries(1, 7, range(3, 8))) == {(1, 7): 7}                # overlap: no duplicates
    assert st.commit(entries(1, 7, [10, 11])) == {(1, 7): 7}                   # a gap holds the ack
    assert st.commit(entries(1, 7, [8, 9])) == {(1, 7): 11}                    # filled: ack moves on
    assert len(st.since(1, 7, -1)) == 12


def test_a_gateway_meeting_a_boot_midway_acks_from_what_it_first_saw(tmp_path):
    st = Store(tmp_path / "g.db")
    assert st.commit(entries(2, 3, range(57, 60))) == {(2, 3): 59}


def test_an_alarm_sent_ahead_of_a_new_boots_backlog_acknowledges_nothing_the_board_still_has_to_send(tmp_path):
    """A board sends an alarm the moment it is raised, ahead of older records it holds: seq 3 may be the
    first this gateway sees of a boot. Acknowledging 3 would make the board delete readings 1-2 that never
    arrived; the store waits for the board's cursor (readings, or the alarm sent again in its turn)."""
    st = Store(tmp_path / "g.db")
    assert st.commit(entries(1, 7, [3], "alarm")) == {(1, 7): None}          # ahead of the backlog: no ack
    assert st.commit(entries(1, 7, [1, 2])) == {(1, 7): 3}                     # the backlog: 1-3 held, ack 3
    # A boot whose oldest record the board holds is an alarm (the rest acknowledged by an earlier gateway):
    assert st.commit(entries(1, 8, [5], "alarm")) == {(1, 8): None}           # first seen: maybe ahead
    assert st.commit(entries(1, 8, [5], "alarm")) == {(1, 8): 5}              # sent again in its turn: the oldest
    assert st.commit(entries(1, 9, [1], "alarm")) == {(1, 9): 1}              # a boot's first record: no doubt


def test_alarms_go_first_and_only_forwarded_entries_are_pruned(tmp_path):
    st = Store(tmp_path / "g.db")
    st.commit(entries(1, 1, range(0, 3)) + entries(1, 1, [3], kind="alarm"), now=1000)
    pending = st.pending()
    assert [r[4] for r in pending] == ["alarm", "readings", "readings", "readings"]
    st.mark_forwarded([pending[0][0], pending[1][0]], now=1000)
    assert st.prune(retention_s=3600, now=1000 + 7200) == 2
    assert len(st.pending()) == 2
    assert [r[3] for r in st.since(1, 1, 0)] == [1, 2]


def test_marking_forwarded_takes_exactly_the_ids_given_in_runs_or_alone(tmp_path):
    """Runs of consecutive ids are marked a range at a time: the ids between two runs stay pending."""
    st = Store(tmp_path / "g.db")
    st.commit(entries(1, 1, range(0, 12)), now=1000)
    ids = sorted(r[0] for r in st.pending())
    marked = ids[0:3] + ids[4:5] + ids[6:10] + ids[9:10]          # three runs and one alone, a repeat
    st.mark_forwarded(reversed(marked), now=1001)
    assert sorted(r[0] for r in st.pending()) == [i for i in ids if i not in marked]
    assert st.count(forwarded=True) == len(set(marked)) == 8
    st.mark_forwarded([], now=1002)                                 # nothing: no statement, no error
    assert st.count(forwarded=True) == 8


def test_replay_windows_round_trip_with_the_top_bit_set(tmp_path):
    st = Store(tmp_path / "g.db")
    st.save_window(9, 0, 5000, (1 << 63) | 5)
    st.close()
    assert Store(tmp_path / "g.db").load_window(9, 0) == (5000, (1 << 63) | 5)


def test_read_methods_and_a_read_only_look_at_a_live_store(tmp_path):
    import sqlite3

    import cbor2
    st = Store(tmp_path / "g.db")
    item = lambda d, s, kind="reading": Entry(d, 1, s, kind, 900 * s, cbor2.dumps({"d": d, "seq": s}))
    st.commit([item(2, 1), item(1, 3), item(1, 2, "alarm"), item(1, 1)], now=1000)
    st.mark_forwarded([r[0] for r in st.pending() if r[1] == 2], now=1003)
    ro = Store(tmp_path / "g.db", readonly=True)            # another process's view, the writer still open
    assert ro.count() == 4 and ro.count(kind="alarm") == 1
    assert ro.count(forwarded=True) == 1 and ro.count(forwarded=False) == 3
    assert ro.count_by_device() == {1: 3, 2: 1} and ro.count_by_device(kind="reading") == {1: 2, 2: 1}
    assert [e["seq"] for e in ro.entries()] == [1, 2, 3, 1]                     # (device, boot, seq)
    assert [e["seq"] for e in ro.entries("reading", order="id")] == [1, 3, 1]   # as they arrived
    assert ro.forward_latencies() == [3] and ro.forward_latencies(received_since=1001) == []
    with pytest.raises(sqlite3.OperationalError):
        ro.prune(0, now=2000)
    ro.close()
    st.close()


WRITER = """
import sys
from gateway.store import Entry, Store
st = Store(sys.argv[1])
seq = (st.acked_upto(1, 1) if st.acked_upto(1, 1) is not None else -1) + 1
while True:
    batch = [Entry(1, 1, s, "readings", s, b"x" * 40) for s in range(seq, seq + 25)]
    acked = st.commit(batch)[(1, 1)]
    print(acked, flush=True)
    seq = acked + 1
"""


def sigkill_campaign(db, kills, seed):
    rnd = random.Random(seed)
    acked_max = -1
    for _ in range(kills):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
        time.sleep(rnd.uniform(0.05, 0.3))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        told = [int(x) for x in out.split("\n")[:-1] if x]   # what the "board" was told (last line may be torn)
        if told:
            acked_max = max(acked_max, told[-1])
        st = Store(db)
        assert st.integrity_ok()
        kept = len(st.covering(1, 1, 0, acked_max))
        assert kept == acked_max + 1, "an acknowledged entry was lost"   # seqs are unique: count == all present
        upto = st.acked_upto(1, 1)                    # None: nothing committed yet (a kill before the first)
        assert (-1 if upto is None else upto) >= acked_max
        st.close()
    return acked_max


def test_every_acknowledged_entry_survives_sigkill_at_random_instants(tmp_path):
    assert sigkill_campaign(tmp_path / "g.db", kills=40, seed=42) > 300


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_300_sigkills(tmp_path):
    assert sigkill_campaign(tmp_path / "g.db", kills=300, seed=7) > 3000
