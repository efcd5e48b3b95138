"""What a test holds: a board, whatever it runs on.

The console is the REPL (mpremote, the pytest-embedded Dut); the UART is the
data link the gateway talks to. Capabilities a real bench may lack (a world
simulator, a power switch) are flags: tests that need them skip with a reason.
"""

import subprocess
import sys
from pathlib import Path

from protocol.errors import BoardError  # noqa: F401  (the one board error, re-exported for every target)

MPREMOTE = str(Path(sys.executable).with_name("mpremote"))


class BoardHandle:
    target = "?"
    has_world = False
    has_power_switch = False

    def __init__(self, board, role, console_port, uart_port):
        self.board, self.role = board, role
        self.console_port, self.uart_port = console_port, uart_port

    def mpremote(self, *args, timeout=30):
        return subprocess.run([MPREMOTE, "connect", self.console_port, *args], capture_output=True,
                              text=True, timeout=timeout)

    def exec(self, code, timeout=30, resume=False):
        """Run code in the board's REPL (after a soft reset unless resume) and return what it printed."""
        args = (["resume"] if resume else []) + ["exec", code]
        r = self.mpremote(*args, timeout=timeout)
        if r.returncode != 0:
            raise BoardError(self.console_port, f"mpremote exec failed ({r.returncode}): {r.stdout}{r.stderr}",
                             f"is the board's console free and its REPL answering? (mpremote connect "
                             f"{self.console_port} repl)")
        return r.stdout

    def hard_reset(self):
        r = self.mpremote("reset")
        if r.returncode != 0:
            raise BoardError(self.console_port, f"mpremote reset failed: {r.stderr}",
                             "press the board's EN/RST button; check the USB cable")

    def power_cut(self):
        raise NotImplementedError(f"target {self.target} has no power switch")

    def status(self):
        raise NotImplementedError(f"target {self.target} has no world simulator")

    def set_world(self, model, param, value):
        raise NotImplementedError(f"target {self.target} has no world simulator")

    def close(self):
        pass
