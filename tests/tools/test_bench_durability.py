"""prapa bench durability (tools/bench/durability.py): SIGKILL the gateway just after it accepted readings,
upstream down; count the accepted readings that never reach the subscriber.

Real processes throughout: `prapa gateway run`, a real SIGKILL, real Mosquittos, a QoS 1 subscriber. Ours must
lose no acked reading; the peer's figures are measured, not asserted (only that they are there and the peer's
path works without a kill). The peer half skips, with the reason, where its venv or `unshare -n` is missing.
No timing assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import durability

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick():
    """One `--quick --json` run (ours: 3 rounds; the peer, where it can run: memory storage, 2 rounds)."""
    r = subprocess.run([sys.executable, "-m", "tools.bench.durability", "--quick", "--json"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sigkill_a_few_ms_after_the_last_send_loses_no_acked_reading(quick):
    f = quick
    rounds, per_round = f["rounds"], f["readings_per_round"]
    assert rounds == durability.QUICK_ROUNDS and f["kill_delays_ms"] == list(durability.KILL_DELAYS_MS[:rounds])
    assert f["ours_readings_sent"] == rounds * per_round
    # It counts: each round some readings were acked before the kill and the subscriber got readings after it.
    assert len(f["ours_acked_per_round"]) == rounds
    assert all(0 < n <= per_round for n in f["ours_acked_per_round"]), f["ours_acked_per_round"]
    assert all(n > 0 for n in f["ours_delivered_per_round"]), f["ours_delivered_per_round"]
    assert f["ours_backlog_forwarded_every_round"] is True
    # The promise: nothing acked is lost.
    assert f["ours_acked_readings_lost"] == 0 and f["ours_lost_per_round"] == [0] * rounds
    assert f["ours_duplicates_delivered"] >= 0 and f["ours_delivered_not_acked"] >= 0


def test_a_lost_store_is_counted_as_acked_readings_lost():
    """The count can fail: delete the gateway's store between the kill and the restart, and every acked
    reading of the round is counted lost."""
    def lose_the_store(data_dir):
        for name in ("store.db", "store.db-wal", "store.db-shm"):
            (data_dir / name).unlink(missing_ok=True)

    f = durability.measure_ours(1, 320, after_kill=lose_the_store, progress=lambda _line: None)
    assert f["ours_readings_acked"] > 0
    assert f["ours_acked_readings_lost"] == f["ours_readings_acked"]


def test_the_peer_beside_ours_or_the_reason_it_is_skipped(quick):
    f = quick
    if "peer_skipped" in f:
        assert "prapa bench peers --setup" in f["peer_skipped"] or "namespace" in f["peer_skipped"]
        pytest.skip(f"the peer half did not run: {f['peer_skipped']}")
    n = f["peer_rounds"] * f["readings_per_round"]
    assert f["peer_rounds"] == durability.PEER_QUICK_ROUNDS
    assert f["peer_memory_storage"].startswith("memory")
    # Its path works with the upstream down when it is not killed: what the kill rounds lose, the kill lost.
    assert f["peer_memory_control_delivered"] == f["peer_memory_control_accepted"] == f["readings_per_round"]
    assert f["peer_memory_readings_sent"] == n and 0 < f["peer_memory_readings_accepted"] <= n
    assert 0 <= f["peer_memory_accepted_readings_lost"] <= f["peer_memory_readings_accepted"]
    assert len(f["peer_memory_lost_per_round"]) == f["peer_rounds"]
    assert f["peer_memory_alive_at_end"] is True


def test_without_the_peer_venv_the_peer_half_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reason = durability.peer_problem()
    assert "prapa bench peers --setup" in reason and str(tmp_path) in reason
    assert not any(tmp_path.iterdir())                    # it built nothing there
