"""prapa bench peers: our gateway beside the ThingsBoard IoT Gateway (tools/bench/peers.py).

The peer lives in a venv of its own that `prapa bench peers --setup` builds under $XDG_CACHE_HOME; where it
is absent the run is skipped, saying how to build it. No timing assertions: only that every figure is there
and sane."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import peers

ROOT = Path(__file__).resolve().parents[2]


def prapa(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_without_the_peer_venv_it_exits_2_naming_setup(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    r = prapa("bench", "peers", "--quick", env=env)
    assert r.returncode == 2, r.stderr
    assert "prapa bench peers --setup" in r.stderr
    assert str(tmp_path) in r.stderr                      # it says where it looked
    assert not any(tmp_path.iterdir())                    # and built nothing there


def test_quick_run_beside_the_peer():
    if not peers.venv_ready():
        pytest.skip(f"the peer's venv is not at {peers.venv_dir()}: build it with `prapa bench peers --setup`")
    r = prapa("bench", "peers", "--quick", "--udp", "--json", timeout=600)
    if r.returncode == 2 and "namespace" in r.stderr:
        pytest.skip(f"no loopback-only network namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout)
    n = f["readings"]
    assert n == peers.QUICK_READINGS and f["isolation"].startswith("unshare -n")
    # The peer: every reading delivered once, with no fault injected.
    assert f["peer_mqtt_readings"] == n
    assert f["peer_mqtt_delivered"] == n and f["peer_mqtt_lost"] == 0 and f["peer_mqtt_duplicates"] == 0
    assert f["peer_mqtt_readings_per_s"] > 0 and f["peer_mqtt_cpu_s_per_100k_readings"] > 0
    assert 10 < f["peer_mqtt_peak_rss_mb"] < 2000
    assert f["peer_alive_at_end"] is True
    assert f["peer_mqtt_steady_delivered"] == peers.QUICK_STEADY
    assert 0 < f["peer_mqtt_send_to_upstream_ms_p50"] <= f["peer_mqtt_send_to_upstream_ms_p99"]
    assert f["peer_udp_readings"] == peers.QUICK_UDP_READINGS
    assert f["peer_udp_delivered"] == f["peer_udp_readings"] and f["peer_udp_lost"] == 0
    assert f["peer_udp_duplicates"] == 0 and f["peer_udp_readings_per_s"] > 0
    # Ours, same run and offered load, and the ratios.
    assert f["ours_readings_per_s_received_committed_pubacked"] > 0
    assert f["ours_gateway_cpu_s_per_100k_readings"] > 0 and 10 < f["ours_gateway_peak_rss_mb"] < 2000
    assert f["ours_latency_offered_readings_per_s"] == f["peer_mqtt_steady_offered_readings_per_s"]
    assert 0 <= f["ours_commit_to_puback_ms_p50"] <= f["ours_commit_to_puback_ms_p99"]
    for k in ("ratio_readings_per_s_ours_to_peer_mqtt", "ratio_cpu_per_100k_ours_to_peer_mqtt",
              "ratio_peak_rss_ours_to_peer_mqtt", "ratio_readings_per_s_ours_to_peer_udp"):
        assert f[k] > 0, k
