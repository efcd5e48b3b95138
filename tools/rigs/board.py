"""A commissioned virtual board wired to the gateway's session layer, for tests and benchmarks.

The board is the real firmware on the real VM (`prapa board run` as a child
process); the gateway end is gateway/harness.py's OneLinkGateway (the
service's sessions and store) on the board's UART pseudo-terminal. `unplug()` /
`plug()` make the gateway vanish and return (bytes sent meanwhile are lost, as
on a dead line). The console is tools/console.py's reader, following from the start.
"""

import time

from gateway.harness import OneLinkGateway
from protocol.errors import BoardError
from tools import boards, image
from protocol.roles import catalog as roles
from tools.console import ConsoleReader
from tools.sim import worlds
from tools.sim.board import prepare_flash
from tools.sim.process import BoardProcess

DEVICE_ID = 0x1001
KEY = bytes(range(16))
BOARD = "esp32-devkitc"


def commissioned_flash(tmp_path, role, section=None, extra=None, name="flash.img", device_id=DEVICE_ID, key=KEY,
                       limits=None):
    """A virtual board's flash image with the app, its device id, key and config (the role's section
    and any other sections in extra), as `prapa commission` leaves a real board. limits: the role's
    hard limits (a role with a LIMITS_PATH), else its world's SITE_LIMITS."""
    board = boards.load(BOARD)
    flash = tmp_path / name
    prepare_flash(board, role, flash)
    config = {"device_id": device_id, "role": role, role: dict(section or {})}
    config.update(extra or {})
    if limits is None and roles.attr(role, "LIMITS_PATH"):
        limits = worlds.ROLE_WORLDS[role].SITE_LIMITS
    image.provision(board, flash, config, key, limits)
    return flash


class Gateway(OneLinkGateway):
    """The gateway end for the rig's one board (DEVICE_ID, KEY), pumping from the start."""

    def __init__(self, uart_port, store_path):
        super().__init__(uart_port, store_path, {DEVICE_ID: KEY})
        self.start()

    def health(self, device_id=DEVICE_ID):
        return super().health(device_id)


class Rig:
    """One board of `role` (its config section, world overrides, clock speed and start) beside a
    OneLinkGateway on its UART, with its console followed from power-on. vm: unix32 or unix64
    (tools/sim/vm.py; None: $PRAPA_VM, else unix32 when built, else unix64)."""

    def __init__(self, tmp_path, role, section=None, extra=None, speed=10, world=(), start_ticks_ms=0, seed=1,
                 vm=None, limits=None):
        self.role = role
        self.flash = commissioned_flash(tmp_path, role, section, extra, limits=limits)
        self.board = BoardProcess(BOARD, role, self.flash, speed=speed, world=world,
                                  start_ticks_ms=start_ticks_ms, seed=seed, vm=vm, powered=False)
        self.vm = self.board.vm
        self.console = ConsoleReader(self.board.console_port)     # open before the first boot prints
        self.board.power_on()
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
            raise BoardError(self.board.console_port, f"mpremote exec failed: {r.stderr.strip()}",
                             f"check the board's console: mpremote connect {self.board.console_port} repl")
        return r.stdout.strip()

    def truth_count(self):
        """What the world really made of the count the role's sensor check watches (its TRUTH)."""
        model, key = worlds.ROLE_WORLDS[self.role].TRUTH
        return self.board.status()["world"][model][key]

    def counter(self):
        """The name of the board's status counter that the sensor moves (the spec's COMMISSION_COUNTER)."""
        return roles.spec(self.role).COMMISSION_COUNTER

    def wait(self, predicate, timeout, what):
        return wait_for(predicate, timeout, what)

    def close(self):
        self.gateway.close()
        self.console.close()
        self.board.close()


def wait_for(predicate, timeout, what, context=""):
    """predicate()'s first truthy value within timeout seconds, else an AssertionError naming what
    (a test's failure, and a benchmark's: its figures would be wrong)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{context}")
