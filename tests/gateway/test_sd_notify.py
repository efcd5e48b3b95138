"""gateway/sd_notify.py speaks systemd's datagram protocol to a real unix socket."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.sd_notify import Notifier


@pytest.fixture
def listener(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield str(path), sock
    sock.close()


def test_ready_status_and_watchdog_reach_the_socket(listener):
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("listening on 2 links")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 2 links"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("backlog 12")
    assert sock.recv(4096) == b"STATUS=backlog 12"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_a_newline_in_a_status_cannot_send_another_assignment(listener):
    path, sock = listener
    Notifier({"NOTIFY_SOCKET": path}).status("broker down\nREADY=1")
    assert sock.recv(4096) == b"STATUS=broker down READY=1"


def test_an_abstract_socket_name_is_reached():
    name = f"prapa-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_quiet_no_op():
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.status("x")
    assert n.watchdog_interval_s() is None


def test_a_vanished_socket_is_reported_not_raised(tmp_path):
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready() is False


def test_the_watchdog_interval_is_half_of_watchdog_sec_and_only_for_this_process():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s() == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval_s() is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None


UNIT = Path(__file__).resolve().parents[2] / "deploy" / "prapa-gateway.service"


def unit_settings():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_waits_for_ready_and_watches_the_loop():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) > 0 and s["Restart"] == ["on-failure"]
    assert s["ExecStart"][0].endswith("prapa gateway run --config /etc/prapa/gateway.toml")
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert s["ReadWritePaths"] == ["/var/lib/prapa"] and "char-ttyUSB rw" in s["DeviceAllow"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path):
    out = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, cwd=tmp_path)
    complaints = [line for line in (out.stdout + out.stderr).splitlines()
                  if line.strip() and "is not executable" not in line]     # /opt/prapa exists only on a Pi
    assert complaints == []
