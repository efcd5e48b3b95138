"""A real gateway service (`prapa gateway run` as a child process): its config, its registry, start and kill.

Used by `prapa site`, the gateway benchmark and the tests."""

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gateway.registry import Registry
from tools.broker import free_port

ROOT = Path(__file__).resolve().parent.parent


def _toml_utc(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _simulated_clock(speed, start):
    """[time] lines that pin a simulated clock to now: a gateway restarted later goes on from the same calendar."""
    if speed == 1 and start is None:
        return ""
    now = time.time()
    return f"simulate_from = {_toml_utc(now if start is None else start)}\nsimulate_since = {_toml_utc(now)}\n"


def write_config(folder, uart_ports, broker_port, site="testsite", extra="", http_port=None, sync_interval_s=60,
                 simulate_speed=1, simulate_from=None):
    """A gateway.toml for serial links on this machine and a local broker; data in folder/data.

    sync_interval_s: how often the gateway sets the boards' wall clocks (in its wall clock's seconds).
    simulate_speed / simulate_from: boards running N times faster than real time run their wall clocks N
    times faster too; a gateway whose wall clock runs as fast (from simulate_from, a UTC timestamp, or
    now) syncs them onto one calendar, and a board that reboots goes on where it was, not back to today."""
    folder = Path(folder)
    links = "".join(f'[[links]]\ntype = "serial"\nport = "{p}"\n\n' for p in uart_ports)
    text = (f'[gateway]\nsite = "{site}"\ndata_dir = "{folder / "data"}"\nlog_level = "info"\n\n{links}'
            f'[[brokers]]\nurl = "mqtt://127.0.0.1:{broker_port}"\nclient_id = "prapa-{site}-gw"\n\n'
            f'[http]\nlisten = "127.0.0.1:{http_port or free_port()}"\n\n[time]\nsync_interval_s = {sync_interval_s}\n'
            f'simulate_speed = {simulate_speed}\n' + _simulated_clock(simulate_speed, simulate_from) + extra)
    path = folder / "gateway.toml"
    path.write_text(text)
    (folder / "data").mkdir(mode=0o700, exist_ok=True)
    return path


def register(folder, devices, role="meter", names=None, board=None, roles=None, places=None):
    """Add devices ({device_id: key}) to the folder's registry; roles ({device_id: role}) or one role;
    places ({device_id: {"catchment", "lat", "lon"}}, any part missing) where a device has one."""
    reg = Registry(Path(folder) / "data" / "registry.db")
    for device_id, key in devices.items():
        place = (places or {}).get(device_id) or {}
        location = (place["lat"], place["lon"]) if "lat" in place else None
        reg.add(device_id, (roles or {}).get(device_id, role), key, name=(names or {}).get(device_id), board=board,
                location=location, catchment=place.get("catchment"))
    reg.close()


class GatewayProcess:
    """One `prapa gateway run` child; start() again after it died starts a new one on the same config
    (so the same data_dir, registry and ports), its stderr appended to the same log_path."""

    def __init__(self, config_path, log_path=None, entry="tools.cli"):
        """entry: the module run with `-m` (a campaign's rig wraps tools.cli: tools/rigs/gateway_rig.py)."""
        self.config_path = config_path
        self.entry = entry
        self.log_path = log_path
        self.proc = None
        self.log = []

    def start(self):
        # The environment of deploy/prapa-gateway.service: one malloc arena per thread would let a
        # burst of frames grow the heap in every thread and keep it (RSS figures on a Pi matter).
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        self.proc = subprocess.Popen([sys.executable, "-m", self.entry, "gateway", "run", "--config",
                                      str(self.config_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.log = []                       # this process's lines: started() looks at nothing older
        threading.Thread(target=self._read, args=(self.proc, self.log), daemon=True).start()
        return self

    def _read(self, proc, log):
        out = open(self.log_path, "a") if self.log_path else None
        try:
            for line in proc.stderr:
                log.append(line.rstrip())
                del log[:-1000]
                if out:
                    out.write(line)
                    out.flush()
        finally:
            if out:
                out.close()

    def started(self):
        """True once the process last started has said gateway_started (its links and broker set up)."""
        return any('"gateway_started"' in line for line in self.log)

    def wait_started(self, timeout=20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.started():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}: {self.log[-5:]}")
            time.sleep(0.02)
        raise AssertionError(f"gateway did not start: {self.log[-5:]}")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None
