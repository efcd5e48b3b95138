"""The bench a virtual board sits on: power, reset, console, link and world.

It runs the firmware in the real MicroPython VM (unix port) with the board's
heap budget and the board's flash image mounted at /, and emulates what the
VM alone cannot:

- reboots: the unix port exits on Ctrl-D; machine.reset(), soft_reset() and
  deepsleep() send K_EXIT and the bench ends the VM (a SystemExit from main.py
  would only fall into the REPL that -i gives). The bench restarts it on the
  same flash, printing what an ESP32 prints, and brings a
  soft reboot from the raw REPL back to the raw REPL (mpremote relies on it);
- Ctrl-C: the VM's console is a pty that turns 0x03 into SIGINT while the app
  runs, so KeyboardInterrupt stops it and the REPL comes up;
- REPL changes: the 1.28.0 unix port flushes its tty's pending input (tcsetattr
  TCSAFLUSH) whenever its REPL starts or changes mode: after a Ctrl-C stops the
  app, Ctrl-A (friendly to raw), Ctrl-B (raw to friendly), Ctrl-D (a raw-REPL
  command runs). An ESP32's UART keeps such input, and mpremote sends its next
  bytes without waiting (`\r\x03` then `\r\x01`), so console input after one of
  those is held until the VM prints its next prompt (`>>> `, the raw REPL's `>`),
  PROMPT_HOLD_S at most;
- power: a power cut is SIGKILL of the VM (the flash image keeps exactly the
  blocks written so far); if the bench itself is killed, so is the VM;
- the watchdog: a board whose firmware stops feeding it is reset;
- deep sleep: the firmware's K_SLEEP record, then K_EXIT EXIT_DEEP_SLEEP, end the
  VM; the bench keeps the RTC memory (K_RTC records) and the board's clock, drops
  the world's input meanwhile (a sleeping ESP32 sees none), and boots the board
  with reset cause "deepsleep" when its timer runs out, or at once when the world
  pulls the wake pin low (a rain gauge's tip); a power cut meanwhile cancels the
  wake and loses the RTC memory. No watchdog runs while it sleeps;
- the world: sensor inputs as timestamped records (see firmware/hal_virtual.py).

The UART and console pseudo-terminals live as long as the bench, so their
paths stay valid across reboots and power cuts, as a USB port does.
"""

import ctypes
import re
import json
import os
import pty
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path

from tools import image
from tools.sim import vm as vms
from tools.sim.rom import _vboard                      # the ROM's table of the world pipe and exit codes
from tools.sim.rom._vboard import (EXIT_DEEP_SLEEP, EXIT_HARD_RESET, K_ANALOG, K_BOOTED, K_EXIT, K_LEVEL, K_OUTPUT,
                                   K_RTC, K_SLEEP, K_WDT, NO_WAKE_GPIO)
from tools.sim.worlds import ANALOG, World

ROM_DIR = Path(__file__).resolve().parent / "rom"
TICKS_PERIOD_MS = 1 << 30
BOARD_US_MASK = (1 << 30) - 1       # world records carry board microseconds wrapped at 2**30 (small ints on the VM)
BOARD_US_HALF = 1 << 29
CONSOLE_HOLD_MAX = 4096
PROMPT_HOLD_S = 3.0          # host seconds console input waits for the REPL's next prompt (then goes anyway)
RECORD = struct.Struct(_vboard.RECORD_FORMAT)
WORD = struct.Struct("<i")                 # a K_RTC record's 4 bytes of RTC memory, as its value field
assert RECORD.size == _vboard.RECORD_BYTES
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n"
FRIENDLY_BANNER = b'Type "help()" for more information.'
FRIENDLY_PROMPTS = (b">>> ", b"... ", b"=== ")           # prompt, continuation, paste mode
RAW_PROMPTS = (RAW_BANNER + b">", b"\x04>")              # raw REPL entered; after a command's output
# Input that makes the VM flush its tty input before its next prompt, by where it waits: the app
# running (None): Ctrl-C; the friendly REPL: Ctrl-A; the raw REPL: Ctrl-B, and Ctrl-D that runs the
# command (raw-paste mode, mpremote's, never flushes: its Ctrl-A after Ctrl-E does not count).
FLUSHED_AFTER = {None: b"\x03", "friendly": b"\x01", "raw": b"\x02\x04"}
LOOKAHEAD_HOST_S = 0.05
BARE_LF = re.compile(rb"(?<!\r)\n")
WATCHDOG_MIN_HOST_S = 1.0
# The loop's longest wait when nothing is due sooner (a timed wake is waited for to the moment:
# _select_timeout_s). The world's records go out when they come within LOOKAHEAD_HOST_S, so each is
# written at least LOOKAHEAD_HOST_S - SELECT_S ahead of its time, and the VM, which looks at its pipe at
# least every 10 ms (firmware/hal_virtual.py _LOOK_MS), holds it before it is due. 10 ms, not 2: an idle
# board's bench woke 500 times a second, a fifth of a site's CPU.
SELECT_S = 0.01
_PR_SET_PDEATHSIG = 1


def micropython_exe(vm=None):
    """The VM's executable (tools/sim/vm.py knows the VMs): vm, else $PRAPA_VM, else the default."""
    return vms.micropython_exe(vm)


def _raw_pty():
    """A pty pair with the slave in raw mode (no echo, no line editing)."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave


def _vm_child_setup(console_fd):
    def setup():
        os.setsid()
        import fcntl
        fcntl.ioctl(console_fd, termios.TIOCSCTTY, 0)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return setup


class Log:
    """Structured events, one JSON object per line, to a stream."""

    def __init__(self, stream, board_name):
        self.stream, self.board_name = stream, board_name

    def __call__(self, event, **fields):
        from gateway.logs import json_line
        self.stream.write(json_line(event, stamp=True, board=self.board_name, **fields) + "\n")
        self.stream.flush()


class Sleep:
    """A board in deep sleep: when its timer wakes it (board us, None: never), its wake pin, and the
    world's records due after the wake (the board is up again by then)."""

    def __init__(self, since_us, wake_at_us, wake_gpio, ms):
        self.since_us, self.wake_at_us, self.wake_gpio, self.ms = since_us, wake_at_us, wake_gpio, ms
        self.by_pin = False
        self.held = []              # (board us, gpio, record kind, value)


class SimBoard:
    def __init__(self, board, role, flash_path, *, speed=1, start_ticks_ms=0, world_overrides=None,
                 seed=0, control_path=None, unique_id=None, log=None, vm=None, powered=True):
        """powered=False: the board stays off until the control socket's power_on (a test opens the
        console first: opening a serial port flushes what waits on it, the first boot's banner too)."""
        self.powered = powered
        self.board, self.role, self.flash_path = board, role, str(Path(flash_path).resolve())
        self.vm_name = vms.resolve(vm)                  # unix32 or unix64 (self.vm is the VM's process)
        self.vm_exe = vms.micropython_exe(vm)
        self.speed, self.start_ticks_ms = int(speed), int(start_ticks_ms) % TICKS_PERIOD_MS
        self.unique_id = unique_id or secrets.token_hex(6)
        self.log = log or Log(sys.stdout, board.name)
        self.world = World(role, board.role_pins[role], world_overrides, seed)
        self.world_epoch = time.monotonic_ns() // 1000
        self.board_epoch = self.world_epoch
        self.control_path = control_path
        self.sel = selectors.DefaultSelector()
        self.uart_master, self.uart_slave = _raw_pty()
        self.console_master, self.console_slave = _raw_pty()
        self.vm = None
        self.vm_booted = False
        self.console_hold = b""
        self.prompt_hold_until = None   # while set: console input waits for the REPL's next prompt
        self.prompt = None              # where the VM waits: "friendly" or "raw" REPL, None (code runs)
        self.vm_console = None      # our end of the VM's stdio pty
        self.vm_world_out = None    # we write world records here
        self.vm_world_in = None     # the VM writes outputs and watchdog feeds here
        self.pending = bytearray()  # world records not yet written to the VM
        self.repl_mode = "friendly"
        self.inject_raw_repl = False
        self.tail = b""
        self.wdt_timeout_s = None
        self.wdt_fed = 0.0
        self.resets = {"power_on": 0, "hard_reset": 0, "soft_reset": 0, "watchdog": 0, "panic": 0, "deepsleep": 0}
        self.rtc_memory = b""       # what the firmware keeps through a deep sleep (machine.RTC().memory())
        self._rtc_new = None        # K_RTC records of a write still coming in
        self.sleep_request = None   # (ms, wake gpio or None, board us it began or None): the VM's K_SLEEP
        self.exit_code = None       # the VM's K_EXIT: the bench ends it with this code
        self.asleep = None          # while asleep: Sleep
        self.sleeps = 0
        self.swallow_gpio = None    # the wake pin's tip that woke the board: its edges never reach the VM
        self.running = True
        self._ctl = None

    # -- paths a person or a test uses ---------------------------------------
    @property
    def uart_path(self):
        return os.ttyname(self.uart_slave)

    @property
    def console_path(self):
        return os.ttyname(self.console_slave)

    # -- the VM --------------------------------------------------------------
    def _board_us(self, world_us):
        return world_us - (self.board_epoch - self.world_epoch) * self.speed

    def _world_now_us(self):
        return (time.monotonic_ns() // 1000 - self.world_epoch) * self.speed

    def power_on(self, cause="power_on", run_main=True):
        """cause "deepsleep": the wake from self.asleep (RTC memory and the board's clock kept); any
        other cause loses the RTC memory. power_on/hard_reset/watchdog/panic restart the clock."""
        if cause in ("power_on", "hard_reset", "watchdog", "panic"):
            self.board_epoch = time.monotonic_ns() // 1000
        sleep, self.asleep, self.sleep_request = self.asleep if cause == "deepsleep" else None, None, None
        self.exit_code = None
        if sleep is None:
            self.rtc_memory = b""
            self.swallow_gpio = None
        self.resets[cause] += 1
        master, slave = pty.openpty()
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.ISIG                    # 0x03 from the console -> SIGINT, as on a board
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        os.set_blocking(master, False)
        to_vm_r, to_vm_w = os.pipe()
        from_vm_r, from_vm_w = os.pipe()
        os.set_blocking(to_vm_w, False)
        os.set_blocking(from_vm_r, False)
        uart_fd = os.dup(self.uart_master)
        host_now_us = time.monotonic_ns() // 1000
        params = {
            "flash_path": self.flash_path, "block_size": self.board.block_size,
            "block_count": self.board.vfs_block_count, "run_main": run_main, "speed": self.speed,
            # Now as a ticks_us() value of this VM (the host clock is the same CLOCK_MONOTONIC), and the
            # board's microseconds since its epoch then: the VM's clock goes on from there.
            "epoch_us": host_now_us % vms.TICKS_PERIOD[self.vm_name],
            "board_us": (host_now_us - self.board_epoch) * self.speed,
            "start_ticks_ms": self.start_ticks_ms,
            "reset_cause": "panic" if cause == "panic" else cause, "unique_id": self.unique_id,
            "world_in_fd": to_vm_r, "world_out_fd": from_vm_w, "uart_fd": uart_fd,
            "rtc_memory": self.rtc_memory.hex(), "wake_pin": bool(sleep and sleep.by_pin),
        }
        env = dict(os.environ, PRAPA_VBOARD=json.dumps(params), MICROPYPATH=str(ROM_DIR))
        # The pins' levels at power-on are in the pipe before the VM runs: a counter the app sets up reads
        # the level its pin has (a reed contact left closed is low), as the ESP32's PCNT would, never a
        # default that the first record then flips (a pulse counted that was never made).
        t0 = params["board_us"]                  # the VM's first instant: these are due when it starts
        levels = self.world.levels()
        if sleep is not None and sleep.by_pin:
            levels[sleep.wake_gpio] = 1         # the tip is over by the time a board has booted
        first = bytearray()
        for gpio, level in sorted(levels.items()):
            first += RECORD.pack(K_LEVEL, gpio, 0, level, max(0, t0) & BOARD_US_MASK)
        for gpio, uv in sorted(self.world.analog_levels().items()):
            first += RECORD.pack(K_ANALOG, gpio, 0, int(uv), max(0, t0) & BOARD_US_MASK)
        for t_us, gpio, rec_kind, value in (sleep.held if sleep else ()):
            first += RECORD.pack(rec_kind, gpio, 0, value, max(0, t_us) & BOARD_US_MASK)
        written = os.write(to_vm_w, first) if first else 0     # a few records: far within a pipe's buffer
        self.vm = subprocess.Popen(
            [self.vm_exe, "-X", self.board.heapsize_option(self.vm_name), "-i", str(ROM_DIR / "vboot.py")],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(ROM_DIR),
            pass_fds=(to_vm_r, from_vm_w, uart_fd), preexec_fn=_vm_child_setup(slave))
        for fd in (slave, to_vm_r, from_vm_w, uart_fd):
            os.close(fd)
        self.vm_console, self.vm_world_out, self.vm_world_in = master, to_vm_w, from_vm_r
        self.sel.register(master, selectors.EVENT_READ, self._on_vm_console)
        self.sel.register(from_vm_r, selectors.EVENT_READ, self._on_vm_world)
        self.inject_raw_repl = not run_main
        self.vm_booted = False
        self.console_hold = b""
        self.prompt_hold_until = None
        self.prompt = None
        self.tail = b""
        self.wdt_timeout_s = None
        self.pending = bytearray(first[written:])
        self.log("vm_started", pid=self.vm.pid, reset_cause=cause, run_main=run_main)

    def _teardown_vm(self):
        if self.vm is None:
            return
        for fd in (self.vm_console, self.vm_world_in):
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        if self.vm.poll() is None:
            self.vm.kill()
        self.vm.wait()
        for fd in (self.vm_console, self.vm_world_out, self.vm_world_in):
            os.close(fd)
        self.vm = None
        self.world.on_reset(self._world_now_us())      # the board's outputs float: a pump relay drops out

    def power_cut(self, then_on=True):
        self.log("power_cut", asleep=self.asleep is not None)
        self._teardown_vm()
        self.asleep, self.rtc_memory, self.swallow_gpio = None, b"", None    # no wake, and RTC memory is lost
        self.sleep_request = self.exit_code = None
        if then_on:
            self.power_on("power_on")

    def _on_vm_exit(self):
        """The VM ended, or asked to end (K_EXIT): a reset, a deep sleep, a crash."""
        while self._on_vm_world():          # its last records (a K_SLEEP, K_EXIT) before its pipe goes
            pass
        data = self._read_vm_console()
        while data:                         # and its last words (the raw REPL's \x04 before a command ran)
            self._vm_printed(data)
            data = self._read_vm_console()
        code = self.exit_code if self.exit_code is not None else self.vm.wait()
        self.exit_code = None
        self._teardown_vm()
        if not self.running:
            return
        if code == EXIT_DEEP_SLEEP:
            self._fall_asleep()
        elif code == EXIT_HARD_RESET:
            self._console_write(b"\r\nrst:0xc (SW_CPU_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n")
            self.log("reset", kind="hard_reset")
            self.power_on("hard_reset")
        elif code is not None and code < 0:
            self._console_write(b"\r\nGuru Meditation Error: VM ended by signal %d\r\n" % -code)
            self.log("reset", kind="panic", signal=-code)
            self.power_on("panic")
        else:
            self._console_write(b"MPY: soft reboot\r\n")
            self.log("reset", kind="soft_reset", exit_code=code, repl=self.repl_mode)
            self.power_on("soft_reset", run_main=self.repl_mode != "raw")

    # -- deep sleep ---------------------------------------------------------------
    def _fall_asleep(self):
        ms, wake_gpio, began_us = self.sleep_request or (0, None, None)
        self.sleep_request = None
        now_us = self._board_us(self._world_now_us())
        since_us = now_us if began_us is None else began_us
        wake_at_us = since_us + ms * 1000 if ms > 0 else None
        self.asleep = Sleep(since_us, wake_at_us, wake_gpio, ms)
        self.sleeps += 1
        self.log("deep_sleep", ms=ms, wake_gpio=wake_gpio)

    def _board_us_to_host_s(self, board_us):
        """The host's time.monotonic() at which the board's clock reads board_us."""
        return self.board_epoch / 1e6 + board_us / self.speed / 1e6

    def _asleep_event(self, board_us, gpio, rec_kind, value):
        """A world event while the board sleeps: the wake pin going low wakes it (from then on events are
        held for it), events after its wake are held, the rest are lost (a sleeping ESP32 sees nothing)."""
        sleep = self.asleep
        wake_at = sleep.wake_at_us
        if (sleep.wake_gpio is not None and not sleep.by_pin and rec_kind == K_LEVEL and gpio == sleep.wake_gpio
                and value == 0 and (wake_at is None or board_us < wake_at)):
            sleep.by_pin, sleep.wake_at_us = True, board_us
            sleep.held = [e for e in sleep.held if e[0] > board_us]
            self.swallow_gpio = gpio            # the tip's own edges: the board learns of it from wake_pin()
            return
        if wake_at is not None and board_us >= wake_at:
            sleep.held.append((board_us, gpio, rec_kind, value))

    def _check_wake(self):
        sleep = self.asleep
        if sleep is None or sleep.wake_at_us is None or self.vm is not None:
            return
        if self._board_us(self._world_now_us()) >= sleep.wake_at_us:
            self._console_write(b"\r\nrst:0x5 (DEEPSLEEP_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n")
            self.log("wake", by="pin" if sleep.by_pin else "timer",
                     slept_ms=(sleep.wake_at_us - sleep.since_us) // 1000)
            self.power_on("deepsleep")

    def _select_timeout_s(self):
        sleep = self.asleep
        if sleep is None or sleep.wake_at_us is None:
            return SELECT_S
        due = self._board_us_to_host_s(sleep.wake_at_us) - time.monotonic_ns() / 1e9
        return min(SELECT_S, max(0.0, due))

    # -- console ---------------------------------------------------------------
    def _console_write(self, data):
        try:
            os.write(self.console_master, data)
        except (BlockingIOError, OSError):
            pass   # nobody reading the console: output is lost, as on a UART

    def _on_console(self):
        try:
            data = os.read(self.console_master, 4096)
        except (BlockingIOError, OSError):
            return
        if self.vm is None or self.inject_raw_repl:
            return
        if not self.vm_booted or self.prompt_hold_until is not None:
            # Held until MicroPython runs (a Ctrl-C now would kill its host process), or until
            # the REPL shows its next prompt (it would flush this input before).
            self.console_hold = (self.console_hold + data)[-CONSOLE_HOLD_MAX:]
            return
        self._feed_vm_console(data)

    def _feed_vm_console(self, data):
        """Console input to the VM up to the first byte after which the VM flushes its tty input
        (FLUSHED_AFTER); the rest is held until its next prompt."""
        triggers = FLUSHED_AFTER[self.prompt]
        cut = next((i for i, b in enumerate(data) if b in triggers), -1)
        if cut < 0:
            self._to_vm_console(data)
            return
        self._to_vm_console(data[:cut + 1])
        self.console_hold = data[cut + 1:]
        self.prompt = None                   # it leaves this prompt: the next one is news
        self.prompt_hold_until = time.monotonic() + PROMPT_HOLD_S

    def _release_console_hold(self):
        held, self.console_hold, self.prompt_hold_until = self.console_hold, b"", None
        if held:
            self._feed_vm_console(held)

    def _check_console_hold(self):
        if self.prompt_hold_until is not None and time.monotonic() > self.prompt_hold_until:
            self.log("console_released", reason="no REPL prompt", seconds=PROMPT_HOLD_S, held=len(self.console_hold))
            self._release_console_hold()

    def _to_vm_console(self, data):
        try:
            os.write(self.vm_console, data)
        except (BlockingIOError, OSError):
            pass

    def _read_vm_console(self):
        """What the VM printed since: bytes, b"" once it has gone, None when nothing is there now."""
        try:
            return os.read(self.vm_console, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _on_vm_console(self):
        data = self._read_vm_console()
        if data is None:
            return
        if not data:
            self._on_vm_exit()
            return
        self._vm_printed(data)

    def _vm_printed(self, data):
        data = self._crlf(data)
        self._console_write(data)
        window = self.tail + data
        raw_at, friendly_at = window.rfind(RAW_BANNER), window.rfind(FRIENDLY_BANNER)
        if raw_at > friendly_at:
            self.repl_mode = "raw"
        elif friendly_at > raw_at:
            self.repl_mode = "friendly"
        if self.inject_raw_repl and window.endswith(b">>> "):
            self.inject_raw_repl = False
            os.write(self.vm_console, b"\x01")
        self.prompt = ("friendly" if window.endswith(FRIENDLY_PROMPTS) else
                       "raw" if window.endswith(RAW_PROMPTS) else None)
        self.tail = window[-64:]
        if self.prompt_hold_until is not None and self.vm_booted and self.prompt:
            self._release_console_hold()

    def _crlf(self, data):
        """A bare "\n" from print() becomes "\r\n", as an ESP32's console prints it;
        the REPL's own "\r\n" stays as it is (a tty's ONLCR would double it)."""
        out = BARE_LF.sub(b"\r\n", data)
        if data.startswith(b"\n") and self.tail.endswith(b"\r"):
            out = out[1:]
        return out

    # -- world -------------------------------------------------------------------
    def _on_vm_world(self):
        """Handle the VM's records that have come; False when none had."""
        try:
            data = os.read(self.vm_world_in, RECORD.size * 256)
        except (BlockingIOError, OSError):
            return False
        for off in range(0, len(data) - RECORD.size + 1, RECORD.size):
            kind, gpio, _r, value, t_us = RECORD.unpack_from(data, off)
            if kind == K_BOOTED:
                self.vm_booted = True
                if self.prompt_hold_until is None:
                    self._release_console_hold()
            elif kind == K_WDT:
                self.wdt_timeout_s = max(value / 1000 / self.speed, WATCHDOG_MIN_HOST_S)
                self.wdt_fed = time.monotonic()
            elif kind == K_OUTPUT:           # (a pulse's end may lie ahead)
                t_us = self._unwrap_board_us(t_us)
                self.world.on_output(t_us + (self.board_epoch - self.world_epoch) * self.speed, gpio, value)
            elif kind == K_RTC:
                self._on_rtc_record(_r, t_us, value)
            elif kind == K_EXIT:
                self.exit_code = value
            elif kind == K_SLEEP:
                self.sleep_request = (max(0, value), None if gpio == NO_WAKE_GPIO else gpio,
                                      self._unwrap_board_us(t_us) if _r else None)
        return bool(data)

    def _unwrap_board_us(self, t_us):
        """The board's time wraps at 2**30 us: unwrap it against ours."""
        board_now = self._board_us(self._world_now_us())
        return board_now + ((t_us - board_now + BOARD_US_HALF) & BOARD_US_MASK) - BOARD_US_HALF

    def _on_rtc_record(self, length, offset, word):
        """One 4-byte piece of an RTC memory write; the write counts once its last piece is in."""
        if offset == 0:
            self._rtc_new = bytearray(length)
        if self._rtc_new is None or len(self._rtc_new) != length:
            return
        self._rtc_new[offset:offset + 4] = WORD.pack(word)[:max(0, length - offset)]
        if offset + 4 >= length:
            self.rtc_memory, self._rtc_new = bytes(self._rtc_new), None

    def _step_world(self):
        horizon = self._world_now_us() + int(LOOKAHEAD_HOST_S * 1e6) * self.speed
        for t_us, gpio, kind, value in self.world.events_until(horizon):
            rec_kind, board_us = K_ANALOG if kind == ANALOG else K_LEVEL, self._board_us(t_us)
            if gpio == self.swallow_gpio and rec_kind == K_LEVEL:
                if value:                       # the tip that woke the board is over: its next one counts
                    self.swallow_gpio = None
                continue
            if self.asleep is not None:
                self._asleep_event(board_us, gpio, rec_kind, int(value))
                continue
            if self.vm is None:
                continue
            self.pending += RECORD.pack(rec_kind, gpio, 0, int(value), max(0, board_us) & BOARD_US_MASK)
        if self.vm is None or not self.pending:
            return
        try:
            # Whole records only: a pipe write of up to PIPE_BUF bytes is all or nothing.
            n = os.write(self.vm_world_out, self.pending[:4096 - 4096 % RECORD.size])
        except (BlockingIOError, BrokenPipeError, OSError):
            n = 0
        del self.pending[:n]

    def _check_watchdog(self):
        if self.vm is not None and self.wdt_timeout_s and time.monotonic() - self.wdt_fed > self.wdt_timeout_s:
            self.log("reset", kind="watchdog", timeout_s=self.wdt_timeout_s)
            self._console_write(b"\r\nE (wdt) Task watchdog got triggered: board reset\r\n")
            self._teardown_vm()
            self.power_on("watchdog")

    # -- control socket -------------------------------------------------------------
    def _open_control(self):
        if not self.control_path:
            return
        try:
            os.unlink(self.control_path)
        except FileNotFoundError:
            pass
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ctl.bind(self.control_path)
        self._ctl.listen(4)
        self._ctl.setblocking(False)
        self.sel.register(self._ctl, selectors.EVENT_READ, self._on_control_accept)

    def _on_control_accept(self):
        conn, _ = self._ctl.accept()
        conn.setblocking(True)
        conn.settimeout(2)
        try:
            request = json.loads(conn.makefile("r").readline() or "{}")
            reply = self.handle(request)
        except (ValueError, OSError) as exc:
            reply = {"ok": False, "error": str(exc)}
        try:
            conn.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            pass
        conn.close()

    def handle(self, request):
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "line_noise":       # bytes on the board's TX line, as a bad cable or a motor nearby puts there
            data = request.get("hex")
            try:
                noise = bytes.fromhex(data) if isinstance(data, str) and len(data) <= 8192 else None
            except ValueError:
                noise = None
            if not noise:
                return {"ok": False, "error": "hex: give 1 to 4096 bytes as hex"}
            os.write(self.uart_master, noise)
            return {"ok": True, "bytes": len(noise)}
        if cmd == "truth":            # what the world had done by an earlier instant of its clock
            t_us = request.get("t_us")
            if isinstance(t_us, bool) or not isinstance(t_us, int) or not 0 <= t_us <= self._world_now_us():
                return {"ok": False, "error": "t_us: give the world's microseconds, from 0 to now"}
            return {"ok": True, "world": self.world.truth(t_us)}
        if cmd == "power_cut":
            truth = self.world.truth(self._world_now_us())   # as the power went: what a board could have counted
            self.power_cut()
            return {"ok": True, "world": truth}
        if cmd == "set":
            ok = self.world.set_param(request.get("model"), request.get("param"), request.get("value"))
            return {"ok": ok} if ok else {"ok": False, "error": "no such model parameter"}
        if cmd == "power_on":         # a board started off (--off) is switched on
            if self.vm is not None or self.asleep is not None:
                return {"ok": False, "error": "the board is on already"}
            self.power_on("power_on")
            return {"ok": True}
        if cmd == "stop":
            self.running = False
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}: use status, truth, power_cut, power_on, line_noise, set or stop"}

    def status(self):
        return {"board": self.board.name, "role": self.role, "uart": self.uart_path, "console": self.console_path,
                "flash": self.flash_path, "vm_pid": self.vm.pid if self.vm else None, "repl": self.repl_mode,
                "resets": dict(self.resets), "sleeps": self.sleeps, "asleep": self.asleep is not None,
                "speed": self.speed, "unique_id": self.unique_id,
                # the world's clock and this boot's board clock at one instant: their difference maps a
                # reading's t_board_s onto the world's time (truth(t_us) at the instant a reading ended)
                "board_us": self._board_us(world_us := self._world_now_us()),
                "world": self.world.truth(world_us)}

    # -- the loop --------------------------------------------------------------------
    def run(self):
        self.sel.register(self.console_master, selectors.EVENT_READ, self._on_console)
        self._open_control()
        if self.powered:
            self.power_on("power_on")
        self.log("board_ready", uart=self.uart_path, console=self.console_path, control=self.control_path,
                 flash=self.flash_path, heap=self.board.heapsize_option(self.vm_name), speed=self.speed,
                 vm=self.vm_name,
                 start_ticks_ms=self.start_ticks_ms, pid=os.getpid())
        try:
            while self.running:
                for key, _ in self.sel.select(timeout=self._select_timeout_s()):
                    key.data()
                if self.vm is not None and (self.exit_code is not None or self.vm.poll() is not None):
                    self._on_vm_exit()
                self._step_world()
                self._check_wake()
                self._check_watchdog()
                self._check_console_hold()
        finally:
            self.running = False
            self._teardown_vm()
            if self._ctl is not None:
                self._ctl.close()
                try:
                    os.unlink(self.control_path)
                except FileNotFoundError:
                    pass
            self.log("board_stopped")


def prepare_flash(board, role, flash_path, install_app=False):
    """Create the image if missing (or refresh its app); refuse one of the wrong size.

    The image is the board's flash: commissioning writes /device.key into it in place, so it is made
    (or, given an image others can read, e.g. a `prapa build` output, narrowed to) mode 0600."""
    path = Path(flash_path)
    if path.exists():
        image.check_existing(board, path)
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        if install_app:
            image.install_app(board, role, path)
        return False
    image.write_atomically(path, image.build(board, role, "virtual"))
    return True
