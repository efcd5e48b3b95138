"""A virtual board as a child process (`prapa board run`), driven over its control socket.

Used by the HIL unix target and by `prapa site`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from protocol.errors import BoardError
from tools import boards

READY_TIMEOUT_S = 20


class BoardProcess:

    def __init__(self, board_name, role, flash_path, speed=1, start_ticks_ms=0, world=(), seed=0, vm=None,
                 powered=True):
        """vm: "unix32" or "unix64" (tools/sim/vm.py); None: the child's $PRAPA_VM, else the default.
        powered=False: the board waits, off, for power_on() (open its console first)."""
        self._dir = tempfile.mkdtemp(prefix="prapa-vb-")
        self.control_path = os.path.join(self._dir, "ctl.sock")
        cmd = [sys.executable, "-m", "tools.cli", "board", "run", "--board", board_name, "--role", role,
               "--flash", str(flash_path), "--control", self.control_path, "--speed", str(speed),
               "--start-ticks-ms", str(start_ticks_ms), "--seed", str(seed)]
        for w in world:
            cmd += ["--world", w]
        if vm:
            cmd += ["--vm", vm]
        if not powered:
            cmd += ["--off"]
        self.name = f"virtual board {board_name} ({role})"
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self.events = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_events, daemon=True).start()
        self._ready.wait(READY_TIMEOUT_S)
        ready = next((e for e in self.events if e.get("event") == "board_ready"), None)
        if ready is None:                     # too slow, or it exited: say what it printed
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            said = self.proc.stderr.read().strip()[-2000:]
            self.close()
            raise BoardError(self.name, f"did not start within {READY_TIMEOUT_S} s: {said or 'no message'}",
                             "run it by hand to see why: " + " ".join(cmd[2:]).replace("tools.cli", "prapa"))
        self.board, self.role = boards.load(board_name), role
        self.console_port, self.uart_port = ready["console"], ready["uart"]
        self.flash_path = ready["flash"]
        self.vm = ready.get("vm")

    def _read_events(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "board_ready":
                self._ready.set()
        self._ready.set()

    def control(self, request):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.control_path)
            s.sendall((json.dumps(request) + "\n").encode())
            reply = json.loads(s.makefile().readline())
        if not reply.get("ok"):
            raise BoardError(self.name, f"its control socket refused {request}: {reply.get('error')}",
                             "send what `prapa board world-params` lists, while the board runs")
        return reply

    def status(self):
        return self.control({"cmd": "status"})

    def line_noise(self, data):
        """Put bytes on the board's serial line towards the gateway (noise, garbage, half frames)."""
        return self.control({"cmd": "line_noise", "hex": bytes(data).hex()})

    def truth(self, t_us):
        """The world's truth at an earlier instant of its clock (status()["world"]["t_us"] is now)."""
        return self.control({"cmd": "truth", "t_us": int(t_us)})["world"]

    def power_on(self):
        """Switch on a board started with powered=False."""
        self.control({"cmd": "power_on"})

    def power_cut(self):
        """Cut and restore power; return the world's truth at the instant of the cut."""
        return self.control({"cmd": "power_cut"})["world"]

    def set_world(self, model, param, value):
        self.control({"cmd": "set", "model": model, "param": param, "value": value})

    def wait_event(self, name, after=0, timeout=10):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events[after:]:
                if e.get("event") == name:
                    return e
            time.sleep(0.02)
        raise BoardError(self.name, f"no {name} event within {timeout} s (saw: "
                         f"{[e['event'] for e in self.events[after:]]})",
                         "look at the board's events and stderr; is the process still running?")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        shutil.rmtree(self._dir, ignore_errors=True)     # the control socket's folder: nothing left in /tmp

