"""The board's console lines, read one way by every host tool and test.

firmware/runtime.py prints a small contract on the console (the REPL's UART):

  banner  prapa <fw> board=<name> role=<role> boot=<n> reset=<cause> heap_free=<n> heap_budget=<n>
  status  prapa device=<id> log=<used>/<capacity> torn=<n> key=value ...   (the role's status())
  idle    prapa idle: config invalid: <field>: <problem>; fix: <fix>
  fault   prapa fault: <what>

Each has a compiled pattern for one line (str: BANNER, STATUS, IDLE, FAULT) and
one for a byte stream that ends at the line's end, so a half-arrived line never
matches (bytes: BANNER_BYTES, ...: pexpect/pytest-embedded's dut.expect), and a
parse_* function returning a plain dict or None. ConsoleReader collects the
lines of a console port (pyserial: a USB port or a virtual board's pty).
"""

import os
import re
import threading
import time

from protocol.errors import BoardError

_BANNER = (r"prapa (?P<firmware>\S+) board=(?P<board>\S+) role=(?P<role>\S+) boot=(?P<boot>\d+) "
           r"reset=(?P<reset>\S+) heap_free=(?P<heap_free>\d+) heap_budget=(?P<heap_budget>\d+)")
_STATUS = (r"prapa device=(?P<device_id>\d+) log=(?P<log_used>\d+)/(?P<log_capacity>\d+) torn=(?P<torn>\d+)"
           r"(?: (?P<role>[^\r\n]*))?")
_IDLE = r"prapa idle: config invalid: (?P<field>\S+): (?P<problem>[^\r\n]*?); fix: (?P<fix>[^\r\n]*)"
_FAULT = r"prapa fault: (?P<what>[^\r\n]*)"

BANNER, STATUS, IDLE, FAULT = (re.compile(p) for p in (_BANNER, _STATUS, _IDLE, _FAULT))
BANNER_BYTES, STATUS_BYTES, IDLE_BYTES, FAULT_BYTES = (re.compile((p + r"\r?\n").encode())
                                                       for p in (_BANNER, _STATUS, _IDLE, _FAULT))
_INTS = {"boot", "heap_free", "heap_budget", "device_id", "log_used", "log_capacity", "torn"}
_KEY_VALUE = re.compile(r"(\w+)=(\S+)")
WAIT_FIX = "watch the console (mpremote connect PORT repl): is the board powered and running the prapa app?"


def _text(line):
    return line.decode(errors="replace") if isinstance(line, (bytes, bytearray)) else line


def _fields(pattern, line):
    m = pattern.search(_text(line))
    if m is None:
        return None
    return {k: int(v) if k in _INTS else v for k, v in m.groupdict().items()}


def _number(value):
    try:
        return int(value)
    except ValueError:
        return value


def parse_banner(line):
    """{"firmware", "board", "role", "boot", "reset", "heap_free", "heap_budget"} (numbers as ints), or None."""
    return _fields(BANNER, line)


def parse_status(line):
    """{"device_id", "log_used", "log_capacity", "torn"} and the role's key=values (ints where they are), or None."""
    fields = _fields(STATUS, line)
    if fields is None:
        return None
    for k, v in parse_key_values(fields.pop("role") or "").items():
        fields.setdefault(k, v)
    return fields


def parse_key_values(text):
    """{key: value} of every key=value in text (ints where they are): the role's status() as the
    board prints it, on the status line or in answer to a query."""
    return {k: _number(v) for k, v in _KEY_VALUE.findall(_text(text))}


def parse_idle(line):
    """{"field", "problem", "fix"} of a board that stays idle on a bad config, or None."""
    return _fields(IDLE, line)


def parse_fault(line):
    """{"what"} of a fault the firmware reported, or None."""
    return _fields(FAULT, line)


class ConsoleReader:
    """The lines a console port prints, kept in `lines` (str, stripped) as they arrive.

    port: a port name (opened here, closed by close()) or an open pyserial object (the caller's,
    e.g. mpremote's transport.serial; left open). follow=True reads on a thread from the start,
    so nothing is lost while the caller does other things (lines survive a virtual board's
    power cut); follow=False reads only inside wait_for, so another user of the same serial
    object (mpremote's raw REPL) is never robbed of its bytes in between.
    """

    def __init__(self, port, baudrate=115200, follow=True):
        import serial
        self._errors = (OSError, serial.SerialException)
        if isinstance(port, (str, os.PathLike)):
            self.serial, self._owned = serial.Serial(os.fspath(port), baudrate, timeout=0.05), True
        else:
            self.serial, self._owned = port, False
        self.port = getattr(self.serial, "port", None) or "console"
        self.lines = []
        self._partial = b""
        self._changed = threading.Condition()
        self.running = True
        self._thread = None
        if follow:
            self._thread = threading.Thread(target=self._follow, daemon=True, name=f"console {self.port}")
            self._thread.start()

    # -- reading -------------------------------------------------------------------------------
    def _take(self, data):
        *done, self._partial = (self._partial + data).split(b"\n")
        if done:
            with self._changed:
                self.lines.extend(x.decode(errors="replace").strip() for x in done)
                self._changed.notify_all()

    def _follow(self):
        while self.running:
            try:
                data = self.serial.read(self.serial.in_waiting or 1)   # waits at most the port's timeout
            except self._errors:
                time.sleep(0.01)
                continue
            self._take(data)

    def _poll(self):
        try:
            waiting = self.serial.in_waiting
            data = self.serial.read(waiting) if waiting else b""
        except self._errors as e:
            raise BoardError(self.port, f"the console stopped answering ({e})",
                             "check the USB cable and that no other program holds the port") from None
        if data:
            self._take(data)
        else:
            time.sleep(0.01)

    # -- looking -------------------------------------------------------------------------------
    @staticmethod
    def _matcher(what):
        if callable(what) and not isinstance(what, re.Pattern):
            return what
        rx = re.compile(what) if isinstance(what, str) else what
        return rx.search

    def search(self, what, after=0, before=None):
        """The first (index, result) among lines[after:before] where what matches, else None.

        what: a regex (str or compiled str pattern; the result is its Match) or a parser such as
        parse_status (the result is what it returns, when truthy)."""
        match = self._matcher(what)
        with self._changed:
            lines = self.lines[after:before]
        for i, line in enumerate(lines, after):
            result = match(line)
            if result:
                return i, result
        return None

    def wait_for(self, what, after=0, timeout=20):
        """(index, result) of the first line from lines[after] on that matches, as search();
        waits up to timeout seconds for it, then raises BoardError naming the port and the last lines."""
        end = time.monotonic() + timeout
        checked = after
        while True:
            with self._changed:
                seen = len(self.lines)
            found = self.search(what, after=checked, before=seen)
            if found:
                return found
            checked = max(checked, seen)
            left = end - time.monotonic()
            if left <= 0:
                break
            if self._thread is not None:
                with self._changed:
                    if len(self.lines) <= checked:
                        self._changed.wait(min(left, 0.2))
            else:
                self._poll()
        shown = getattr(what, "pattern", None) or getattr(what, "__name__", None) or repr(what)
        raise BoardError(self.port, f"no console line matching {shown} within {timeout:g} s "
                         f"(last lines: {self.lines[-8:]})", WAIT_FIX.replace("PORT", str(self.port)))

    def text(self):
        """Every line seen so far, one per line."""
        with self._changed:
            return "\n".join(self.lines)

    def close(self):
        """Stop reading (idempotent); closes the port only when it was opened here."""
        if not self.running:
            return
        self.running = False
        if self._thread is not None:
            self._thread.join(2)
        if self._owned:
            self.serial.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
