"""A commissioned virtual board wired to the gateway's session layer, for firmware tests.

The board is the real firmware on the real VM (`prapa board run` as a child
process); the gateway end is gateway/session.py + gateway/store.py on the
board's UART pseudo-terminal, pumped by a thread. `unplug()` / `plug()` make
the gateway vanish and return (bytes sent meanwhile are lost, as on a dead line).
"""

import random
import re
import threading
import time

import cbor2
import serial

from gateway.serial_link import SerialLink
from gateway.session import Sessions
from gateway.store import Store
from protocol.secure import MemoryCounters
from tools import boards, image
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess

DEVICE_ID = 0x1001
KEY = bytes(range(16))
BOARD = "esp32-devkitc"
STATUS_LINE = re.compile(r"prapa device=(\d+) log=(\d+)/(\d+) torn=(\d+) (.*)")


def commissioned_flash(tmp_path, meter=None, extra=None, name="flash.img", device_id=DEVICE_ID, key=KEY):
    board = boards.load(BOARD)
    flash = tmp_path / name
    prepare_flash(board, "meter", flash)
    config = {"device_id": device_id, "role": "meter", "meter": dict(meter or {})}
    config.update(extra or {})
    image.provision(board, flash, config, key)
    return flash


class Gateway:
    def __init__(self, uart_port, store_path):
        self.store = Store(store_path)
        self.link = SerialLink(uart_port)
        self.sessions = Sessions(self.store, lambda d: KEY if d == DEVICE_ID else None, self.link.write,
                                 lambda d: MemoryCounters(0))
        self.lock = threading.Lock()
        self.plugged = True
        self.running = True
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        while self.running:
            try:
                data = self.link.read()
            except (OSError, serial.SerialException):
                time.sleep(0.01)
                continue
            with self.lock:
                if self.plugged and data:
                    self.sessions.feed(data)
                    self.sessions.flush()

    def unplug(self):
        with self.lock:
            self.plugged = False

    def plug(self):
        with self.lock:
            self.plugged = True

    def entries(self, kind="reading", order="boot_id, seq"):
        """Stored entries of a kind as decoded dicts, in (boot, seq) order (order="id": as they arrived)."""
        with self.lock:
            rows = self.store.db.execute(
                f"SELECT payload FROM entries WHERE kind=? ORDER BY {order}", (kind,)).fetchall()
        return [cbor2.loads(r[0]) for r in rows]

    def health(self):
        with self.lock:
            d = self.sessions.devices.get(DEVICE_ID)
            return dict(d.health) if d and d.health else None

    def close(self):
        self.running = False
        self.thread.join(2)
        self.link.close()
        self.store.close()


class Console:
    """Lines from the board's console pty, collected by a thread (they survive power cuts)."""

    def __init__(self, port):
        self.serial = serial.Serial(port, timeout=0.05)
        self.lines = []
        self._buf = b""
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while self.running:
            try:
                data = self.serial.read(4096)
            except (OSError, serial.SerialException):
                time.sleep(0.01)
                continue
            self._buf += data
            *done, self._buf = self._buf.split(b"\n")
            self.lines.extend(x.decode(errors="replace").strip() for x in done)

    def wait_for(self, pattern, after=0, timeout=20):
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i in range(after, len(self.lines)):
                m = rx.search(self.lines[i])
                if m:
                    return i, m
            time.sleep(0.02)
        raise AssertionError(f"console never showed {pattern!r}; last lines: {self.lines[-10:]}")

    def close(self):
        self.running = False
        self.thread.join(2)
        self.serial.close()


class Rig:
    def __init__(self, tmp_path, meter=None, extra=None, speed=10, world=(), start_ticks_ms=0, seed=1):
        self.flash = commissioned_flash(tmp_path, meter, extra)
        self.board = BoardProcess(BOARD, "meter", self.flash, speed=speed, world=world,
                                  start_ticks_ms=start_ticks_ms, seed=seed)
        self.console = Console(self.board.console_port)
        self.gateway = Gateway(self.board.uart_port, tmp_path / "gateway.db")

    def board_exec(self, code, timeout=30):
        """Run code on the board's console with mpremote (it stops the app): for figures at the end of a run."""
        import subprocess
        import sys
        self.console.close()
        r = subprocess.run([sys.executable, "-m", "mpremote", "connect", self.board.console_port, "resume", "exec",
                            code],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"mpremote exec failed: {r.stderr.strip()}")
        return r.stdout.strip()

    def truth_pulses(self):
        return self.board.status()["world"]["flow_meter"]["pulses"]

    def wait(self, predicate, timeout, what):
        return wait_for(predicate, timeout, what)

    def close(self):
        self.gateway.close()
        if self.console.running:
            self.console.close()
        self.board.close()


def wait_for(predicate, timeout, what, context=""):
    """predicate()'s first truthy value within timeout seconds, else an AssertionError naming what."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{context}")


def interval_readings(entries):
    return [e for e in entries if e["series"] == "interval"]


def check_register_chain(readings):
    """Within a boot, each reading starts where the last ended; across boots it never goes back."""
    last = None
    for r in readings:
        if last is not None:
            if r["boot"] == last["boot"]:
                assert r["register_before"] == last["register"], (last, r)
            else:
                assert r["register_before"] >= last["register"], (last, r)
        assert r["register"] == r["register_before"] + r["value"]
        last = r


def _boot_status(rig, after):
    """(console line index, boot id, total pulses recovered) of the next boot's status line."""
    i, m = rig.console.wait_for(STATUS_LINE, after=after, timeout=30)
    boot = int(re.search(r"boot=(\d+)", rig.console.lines[i - 1]).group(1))
    return i, boot, int(re.search(r"total_pulses=(\d+)", m.group(5)).group(1))


def power_cut_campaign(rig, cuts, rng=None, flow_lpm=6.0):
    """Cut the board's power `cuts` times at random instants while it counts; return pulses lost per cut.

    Flow runs only while a boot is up (status line seen: its counter is live) and
    stops 80 ms (past the world's look-ahead) before each cut, so every pulse the
    board does not have after the next boot was lost by the cut: a checkpoint
    loss. Every fifth cut lands within 20 ms of the flow starting, in the first
    writes after a boot. Raises if the recovered total ever goes backwards."""
    rng = rng or random.Random(0)
    after, recovered, truths, boots = 0, {}, [], []
    for k in range(cuts + 1):
        after, boot, total = _boot_status(rig, after)
        recovered[boot] = total
        boots.append(boot)
        if k == cuts:
            break
        rig.board.set_world("flow_meter", "forced_lpm", flow_lpm)
        time.sleep(rng.uniform(0, 0.02) if k % 5 == 4 else rng.uniform(0.05, 0.4))
        rig.board.set_world("flow_meter", "forced_lpm", 0)
        time.sleep(0.08)
        truths.append(rig.board.power_cut()["flow_meter"]["pulses"])
        after += 1
    losses, previous = [], 0
    for k, truth in enumerate(truths):
        boot, next_boot = boots[k], boots[k + 1]
        assert next_boot == boot + 1, f"cut {k}: boot {boot} was followed by boot {next_boot}"
        assert recovered[next_boot] >= recovered[boot], f"cut {k}: the total went backwards"
        cumulative = truth - recovered[next_boot]
        losses.append(cumulative - previous)
        previous = cumulative
    return losses
