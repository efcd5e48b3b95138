"""prapa bench scaling: what must hold whatever this machine's speed.

No assertion is about a timing. The bench's own boards (tools/bench/scaling.py's generator) must speak the
wire the gateway's Opener accepts; and a small run at two device counts, each meter with its own key over
UDP to a real gateway and Mosquitto, must end with every reading sent in the store exactly once and
PUBACKed, no frame refused on either side, and every figure present and positive.
"""

import argparse
import secrets

import pytest

from protocol import secure
from protocol.errors import UsageError
from tools.bench import scaling, scaling_boards

SMALL = argparse.Namespace(devices=(10, 200), readings=3200, window=scaling.WINDOW_FRAMES, steady_readings=640,
                           steady_rate=scaling.STEADY_RATE, quick=True, json=True)


def test_the_generators_frames_open_with_the_gateways_opener_and_its_counters_never_repeat():
    key = secrets.token_bytes(16)
    boards = scaling_boards.Boards({0x3000: key}, 9, 4)
    opener = secure.Opener(key, 0x3000, secure.UPLINK)
    out = bytearray(300)
    frames = [boards.readings_frame(0x3000) for _ in range(3)]
    for i, frame in enumerate([*frames, frames[0]]):            # the last: a resend, sealed anew
        wire = bytearray(boards.seal(0x3000, scaling_boards.READINGS, frame.payload))
        msg_type, counter, n = opener.open_into(wire, len(wire), out)
        assert (msg_type, counter, bytes(out[:n])) == (scaling_boards.READINGS, i, frame.payload)
    assert [f.seq_last for f in frames] == [32, 64, 96]


def test_device_counts_are_checked_before_anything_starts():
    assert scaling.device_counts("10,100,1000,5000") == (10, 100, 1000, 5000)
    for bad in ("", "10,x", "0", "10,-5", "30000"):
        with pytest.raises(UsageError):
            scaling.device_counts(bad)


@pytest.fixture(scope="module")
def small_run():
    from tools.broker import mosquitto_exe
    try:
        mosquitto_exe()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return scaling.measure(SMALL)


@pytest.mark.parametrize("devices", SMALL.devices)
def test_every_reading_sent_is_stored_exactly_once_and_pubacked(small_run, devices):
    f = small_run[f"devices_{devices}"]
    assert f["devices_answered"] == devices, f
    assert f["readings_sent"] >= SMALL.readings + SMALL.steady_readings, f
    assert f["readings_missing"] == f["readings_not_sent_or_twice"] == f["devices_seqs_not_exact"] == 0, f
    assert f["readings_not_pubacked"] == 0, f
    assert f["gateway_refusals"] == 0 and f["gateway_refusals_by_reason"] == {}, f
    assert f["acks_refused_by_boards"] == 0, f


@pytest.mark.parametrize("devices", SMALL.devices)
def test_every_figure_is_there_and_positive(small_run, devices):
    f = small_run[f"devices_{devices}"]
    for key in ("readings_per_s", "gateway_cpu_s_per_100k_readings", "gateway_rss_mb_after_start",
                "gateway_peak_rss_mb", "commit_to_puback_ms_p50", "commit_to_puback_ms_p99", "ack_rtt_ms_p50",
                "ack_rtt_ms_p99", "ack_rtt_ms_p99_flat_out", "steady_readings_per_s", "generator_cpu_share"):
        assert isinstance(f[key], (int, float)) and f[key] > 0, (key, f)
    assert f["gateway_peak_rss_mb"] >= f["gateway_rss_mb_after_start"], f
    assert f["commit_to_puback_ms_p99"] >= f["commit_to_puback_ms_p50"], f


def test_flatness_compares_each_count_with_the_smallest_and_every_figure_is_declared(small_run):
    flat = small_run["flatness"]
    for key in ("readings_per_s", "commit_to_puback_ms_p99", "ack_rtt_ms_p99"):
        assert flat[f"{key}_200_vs_10"] > 0
    from tools.bench.suite import flatten, rows
    undeclared = [r["figure"] for r in rows(small_run, scaling.FIGURES) if r["meaning"] is None]
    assert undeclared == [], undeclared
    assert len(flatten(small_run)) > 40
    assert "devices" in scaling.table(small_run)
