"""A virtual board as a child process (`prapa board run`), driven over its control socket.

Used by the HIL unix target and by `prapa site`."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tools import boards

READY_TIMEOUT_S = 20


class BoardError(RuntimeError):
    pass


class BoardProcess:

    def __init__(self, board_name, role, flash_path, speed=1, start_ticks_ms=0, world=(), seed=0):
        self._dir = tempfile.mkdtemp(prefix="prapa-vb-")
        self.control_path = os.path.join(self._dir, "ctl.sock")
        cmd = [sys.executable, "-m", "tools.cli", "board", "run", "--board", board_name, "--role", role,
               "--flash", str(flash_path), "--control", self.control_path, "--speed", str(speed),
               "--start-ticks-ms", str(start_ticks_ms), "--seed", str(seed)]
        for w in world:
            cmd += ["--world", w]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        self.events = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_events, daemon=True).start()
        if not self._ready.wait(READY_TIMEOUT_S):
            self.close()
            raise BoardError(f"virtual board did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
        ready = next(e for e in self.events if e["event"] == "board_ready")
        self.board, self.role = boards.load(board_name), role
        self.console_port, self.uart_port = ready["console"], ready["uart"]
        self.flash_path = ready["flash"]

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
            raise BoardError(f"bench refused {request}: {reply.get('error')}")
        return reply

    def status(self):
        return self.control({"cmd": "status"})

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
        raise BoardError(f"no {name} event within {timeout} s; saw {[e['event'] for e in self.events[after:]]}")

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

