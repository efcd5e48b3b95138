# HAL backend for the virtual board: the MicroPython unix port driven by the
# world simulator (tools/sim). Same surface as hal_esp32.py; roles never know
# which one they hold.
#
# Why it looks like this:
# - Board time is host CLOCK_MONOTONIC scaled by an integer speed factor and
#   offset so tests can start just before the wrap; ticks wrap at 2**30 like
#   an ESP32's, not at the unix port's 2**62.
# - The world sends 16-byte records on a pipe: (kind, gpio, value, t_us) with
#   t_us in board-relative virtual microseconds. Pin IRQs and counters see
#   each edge at its own time, so a handler reading ticks_us() gets the edge's
#   time, as an ISR on the board would.
# - Reading records, updating pins and counters allocate nothing: the sampling
#   path may call value() and count() under micropython.heap_lock().
# - The sonars are what the world makes of them: it sends the echo's round
#   trip (us) or the A02YYUW's distance (mm) as ANALOG records on their pins,
#   0 for no echo or no frame, and updates them every few world seconds.
# - Deep sleep ends the VM (a K_SLEEP record, then K_EXIT EXIT_DEEP_SLEEP); the
#   bench keeps the RTC memory (K_RTC records) and the board's clock through
#   the sleep, and boots it again with reset cause "deepsleep".
import sys
import time
from micropython import const

import _vboard  # the ROM: its table of the world pipe, RTC memory and deep sleep
from _vboard import K_ANALOG, K_LEVEL, K_OUTPUT, K_WDT
from _vboard import RECORD_BYTES as _REC
from edge_counter import EdgeCounter
from ticks import PERIOD_MASK as _TICKS_MASK
from ticks import wadd as _wadd
from ticks import wdiff as _wdiff

TICKS_PERIOD = const(1 << 30)
_GPIO_COUNT = const(49)
_HOST_WORD_BYTES = 8 if sys.maxsize > 0xFFFFFFFF else 4
_STEP_BOARD_US = const(1 << 29)    # board microseconds the clock advances by at most at a time (a small int)
_LOOK_MS = const(10)               # host ms between looks at the world pipe at most (background())
_TRIGGER_US = const(10)            # the sonar's trigger pulse


def _params():
    # The ROM (tools/sim/rom/vboot.py) leaves the bench's parameters here.
    return sys.modules["_vboard"].PARAMS


class _Listeners:
    __slots__ = ("by_gpio",)

    def __init__(self):
        self.by_gpio = [None] * _GPIO_COUNT

    def add(self, gpio, obj):
        if self.by_gpio[gpio] is None:
            self.by_gpio[gpio] = []
        self.by_gpio[gpio].append(obj)


class InputPin:
    __slots__ = ("hal", "gpio", "_handler", "_trigger")
    IRQ_FALLING = const(1)
    IRQ_RISING = const(2)

    def __init__(self, hal, gpio):
        self.hal, self.gpio, self._handler, self._trigger = hal, gpio, None, 0
        hal._listeners.add(gpio, self)

    def value(self):
        self.hal.pump()
        return self.hal._levels[self.gpio]

    def irq(self, handler=None, trigger=3):
        self._handler, self._trigger = handler, trigger

    def _edge(self, level, t_us):
        if self._handler is not None and self._trigger & (2 if level else 1):
            self._handler(self)


class OutputPin:
    __slots__ = ("hal", "gpio", "_level")

    def __init__(self, hal, gpio, value):
        self.hal, self.gpio, self._level = hal, gpio, -1
        self.value(value)

    def value(self, level=None):
        if level is None:
            return self._level
        level = 1 if level else 0
        if level != self._level:
            self._level = level
            self.hal._send(K_OUTPUT, self.gpio, level)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)


class StrokeOutput:
    """A fixed-length pulse a call (the ESP32's one-shot hard timer): both edges go to the world at
    once, the falling one stamped width_ms later in board time. Allocates nothing."""

    __slots__ = ("hal", "gpio", "width_us", "high_until")

    def __init__(self, hal, gpio, width_ms):
        self.hal, self.gpio, self.width_us = hal, gpio, width_ms * 1000
        self.high_until = -1
        hal._send(K_OUTPUT, gpio, 0)

    def pulse(self):
        hal = self.hal
        now = hal.virtual_us()
        if self.high_until >= 0 and _wdiff(self.high_until, now) > 0:
            return False
        self.high_until = _wadd(now, self.width_us)
        hal._send(K_OUTPUT, self.gpio, 1)
        hal._send(K_OUTPUT, self.gpio, 0, self.high_until)
        return True

    def off(self):
        self.high_until = -1


class PulseCounter:
    """Edges to `active_level` that held for filter_us (0: every edge, as the PCNT)."""

    __slots__ = ("hal", "gpio", "_edges")

    def __init__(self, hal, gpio, active_level, filter_us):
        self.hal, self.gpio = hal, gpio
        hal.pump()                              # the pin's level now (the power-on levels are records too)
        self._edges = EdgeCounter(hal._levels[gpio], active_level, filter_us)
        hal._listeners.add(gpio, self)

    def _edge(self, level, t_us):
        self._edges.edge(level, self.hal.ticks_us())

    def count(self):
        self.hal.pump()
        self._edges.settle(self.hal.ticks_us())
        return self._edges.count


class Adc:
    __slots__ = ("hal", "gpio")

    def __init__(self, hal, gpio):
        self.hal, self.gpio = hal, gpio

    def read_uv(self):
        self.hal.pump()
        return self.hal._analog_uv[self.gpio]


class SonarEcho:
    """A trigger/echo ultrasonic sensor (JSN-SR04T): ping_us() is the echo's high time in board us, -1
    when none came within timeout_us. The trigger pulse goes to the world as two outputs (optional
    for it: the echo it sends does not wait for one). Allocates nothing."""

    __slots__ = ("hal", "trig", "echo")

    def __init__(self, hal, trig_gpio, echo_gpio):
        self.hal, self.trig, self.echo = hal, trig_gpio, echo_gpio
        if trig_gpio >= 0:
            hal._send(K_OUTPUT, trig_gpio, 0)

    def ping_us(self, timeout_us):
        hal = self.hal
        if self.trig >= 0:
            now = hal.virtual_us()
            hal._send(K_OUTPUT, self.trig, 1, now)
            hal._send(K_OUTPUT, self.trig, 0, _wadd(now, _TRIGGER_US))
        hal.pump()
        echo_us = hal._analog_uv[self.echo]
        return echo_us if 0 < echo_us <= timeout_us else -1


class SonarUart:
    """A UART ultrasonic sensor (A02YYUW): read_mm() is the newest valid frame's distance in mm, -1
    when none. Allocates nothing."""

    __slots__ = ("hal", "rx")

    def __init__(self, hal, rx_gpio):
        self.hal, self.rx = hal, rx_gpio

    def read_mm(self):
        self.hal.pump()
        mm = self.hal._analog_uv[self.rx]
        return mm if mm > 0 else -1


class Uart:
    """The data link: the master side of the pty the gateway opens as a serial port.

    Writes never block: with nobody on the line, bytes are lost as on a wire.
    """

    __slots__ = ("_io", "_poll", "dropped_tx")

    def __init__(self, fd):
        import select
        self._io = open(fd, "r+b")
        self._poll = select.poll()
        self._poll.register(self._io, select.POLLIN)
        self.dropped_tx = 0

    def any(self):
        for _obj, ev in self._poll.ipoll(0):
            return 1 if ev & 1 else 0
        return 0

    def readinto(self, buf):
        if not self.any():
            return 0
        try:
            return self._io.readinto(buf) or 0
        except OSError:
            return 0

    def write(self, buf):
        try:
            n = self._io.write(buf)
        except OSError:
            n = 0
        if not n:
            self.dropped_tx += len(buf)
            return 0
        return n


class Watchdog:
    __slots__ = ("hal", "timeout_ms")

    def __init__(self, hal, timeout_ms):
        self.hal, self.timeout_ms = hal, timeout_ms
        self.feed()

    def feed(self):
        self.hal._send(K_WDT, 0, self.timeout_ms)


class Periodic:
    __slots__ = ("hal", "period_us", "callback", "next_us", "late_max_us", "late_us", "runs")

    def __init__(self, hal, period_ms, callback):
        self.hal, self.period_us, self.callback = hal, period_ms * 1000, callback
        self.next_us = _wadd(hal.virtual_us(), self.period_us)
        self.late_max_us, self.late_us, self.runs = 0, 0, 0

    def stop(self):
        if self in self.hal._timers:
            self.hal._timers.remove(self)


class Hal:
    platform = "virtual"

    def __init__(self):
        import json
        p = _params()
        with open("/board.json") as f:
            self.board = json.load(f)
        self.speed = p["speed"]
        # Host microseconds a step of _advance(): one step after a short while, a few after a deep sleep
        # or a soft reset (the clock carries on from the board's epoch, perhaps hours of host time ago).
        self._step_us = _STEP_BOARD_US // self.speed if self.speed < _STEP_BOARD_US else 1
        # Virtual time, advanced from the host's ticks_us in steps (board time = host time x speed):
        # _vt µs since the board's epoch (ticks_us is _start_us + _vt), _ms its ticks_ms (with _rem µs
        # towards the next ms), all wrapping at 2**30 (firmware/ticks.py). The bench gives the board's
        # time at power-on (board_us, a big int after a long run: reduced here, once) and this VM's
        # ticks_us() then (epoch_us): a soft reset or a deep sleep carries the board's clock on.
        board_us = p.get("board_us", 0)
        self._host_last = p["epoch_us"]
        self._vt = board_us & _TICKS_MASK
        self._start_us = (p["start_ticks_ms"] * 1000) & _TICKS_MASK
        self._ms = (p["start_ticks_ms"] + board_us // 1000) & _TICKS_MASK
        self._rem = board_us % 1000
        self._override = -1
        self._reset_cause = p["reset_cause"]
        self._uid = bytes.fromhex(p["unique_id"])
        self._levels = bytearray(b"\x01" * _GPIO_COUNT)
        self._analog_uv = [0] * _GPIO_COUNT
        self._listeners = _Listeners()
        self._timers = []
        self._rx = p["world_in"]
        self._tx = p["world_out"]
        self._rec = bytearray(_REC)
        self._held = 0          # records read but not yet due
        self._out = bytearray(_REC)
        import select
        self._poll = select.poll()
        self._poll.register(self._rx, select.POLLIN)
        self._uart = None
        self._bdev = p["bdev"]

    # -- clock ---------------------------------------------------------------
    def _advance(self):
        now = time.ticks_us()
        dt = time.ticks_diff(now, self._host_last)
        if dt <= 0:
            return
        self._host_last = now
        step_max = self._step_us
        while dt > 0:
            step = dt if dt < step_max else step_max
            dt -= step
            d = step * self.speed
            self._vt = _wadd(self._vt, d)
            r = self._rem + d
            self._ms = _wadd(self._ms, r // 1000)
            self._rem = r % 1000

    def virtual_us(self):
        """Board microseconds since its epoch, wrapping at 2**30 (at an edge's IRQ: the edge's time)."""
        if self._override >= 0:
            return self._override
        self._advance()
        return self._vt

    def ticks_us(self):
        return _wadd(self._start_us, self.virtual_us())

    def ticks_ms(self):
        self._advance()
        if self._override >= 0:                # inside a timer callback or an edge: its own time
            return _wadd(self._ms, _wdiff(self._override, self._vt) // 1000)
        return self._ms

    def link_ticks_ms(self):
        """Real milliseconds, for link timeouts: the gateway on the other end of
        the wire lives in real time even when the board's clock runs faster."""
        return time.ticks_ms() & _TICKS_MASK

    @staticmethod
    def ticks_diff(a, b):
        return _wdiff(a, b)

    @staticmethod
    def ticks_add(t, delta):
        return _wadd(t, delta)

    def sleep_ms(self, ms):
        time.sleep_ms(ms // self.speed)

    def asleep_ms(self, ms):
        import asyncio
        return asyncio.sleep_ms(ms // self.speed)

    # -- inputs and outputs --------------------------------------------------
    def pin_in(self, gpio, pull_up=True):
        return InputPin(self, gpio)

    def pin_out(self, gpio, value=0):
        return OutputPin(self, gpio, value)

    def counter(self, gpio, active_level=0, filter_us=0):
        return PulseCounter(self, gpio, active_level, filter_us)

    def stroke_output(self, gpio, width_ms):
        return StrokeOutput(self, gpio, width_ms)

    def adc(self, gpio):
        return Adc(self, gpio)

    def sonar_echo(self, trig_gpio, echo_gpio):
        return SonarEcho(self, trig_gpio, echo_gpio)

    def sonar_uart(self, rx_gpio, tx_gpio=-1):
        """tx_gpio: the sensor's mode line on an ESP32 (see hal_esp32.py); nothing here."""
        return SonarUart(self, rx_gpio)

    def uart(self):
        if self._uart is None:
            self._uart = Uart(_params()["uart_fd"])
        return self._uart

    def udp(self, host, port, wifi=None):
        """The data link as UDP datagrams from the host, where the ESP32 would use Wi-Fi."""
        from datagram import Datagrams
        return Datagrams(host, port)

    def flash_bdev(self):
        return self._bdev

    def watchdog(self, timeout_ms):
        return Watchdog(self, timeout_ms)

    def periodic(self, period_ms, callback):
        t = Periodic(self, period_ms, callback)
        self._timers.append(t)
        return t

    # -- system --------------------------------------------------------------
    def reset_cause(self):
        return self._reset_cause

    def unique_id(self):
        return self._uid

    def reset(self):
        sys.modules["machine"].reset()

    def deep_sleep(self, ms, wake_gpio=-1):
        """Sleep ms of board time (0: until the wake pin or a power cut), or until the world drives
        wake_gpio low; the board then boots with reset cause "deepsleep". Never returns."""
        _vboard.deep_sleep(ms, wake_gpio if wake_gpio >= 0 else _vboard.NO_WAKE_GPIO, self.virtual_us())

    @staticmethod
    def rtc_memory(data=None):
        """Bytes kept through a deep sleep and lost at any other reset (b"" then): get, or set."""
        return _vboard.rtc_memory(data)

    def wake_pin(self):
        """True when this boot is a deep-sleep wake that the wake gpio going low caused."""
        return self._reset_cause == "deepsleep" and bool(_params().get("wake_pin"))

    def rtc_ms(self):
        """Milliseconds on the clock that runs through deep sleep, wrapping at 2**30: here the board's
        own (the bench keeps its epoch across a sleep); a power cut restarts it."""
        return self.ticks_ms()

    def soft_reset(self):
        sys.modules["machine"].soft_reset()

    def heap_free_bytes(self):
        """Free heap in bytes as the ESP32 would count them (32-bit words)."""
        import gc
        return gc.mem_free() * 4 // _HOST_WORD_BYTES

    def heap_budget_bytes(self):
        return self.board["heap_budget_bytes"]

    # -- the world link --------------------------------------------------------
    def _send(self, kind, gpio, value, t=-1):
        """One record to the world; allocates nothing (one store a byte: a 4-tuple unpack would build a tuple)."""
        b = self._out
        b[0] = kind
        b[1] = gpio
        b[4] = value & 255
        b[5] = (value >> 8) & 255
        b[6] = (value >> 16) & 255
        b[7] = (value >> 24) & 255
        if t < 0:
            t = self.virtual_us()              # wrapped at 2**30: the bench unwraps it
        b[8] = t & 255
        b[9] = (t >> 8) & 255
        b[10] = (t >> 16) & 255
        b[11] = t >> 24
        self._tx.write(b)                       # bytes 2, 3 and 12..15 stay 0 from the start

    def pump(self):
        """Apply every world record that is due by now; never blocks, never allocates."""
        now = self.virtual_us()
        rec = self._rec
        while True:
            if self._held == 0:
                n = 0
                for _obj, ev in self._poll.ipoll(0):
                    if ev & 1:
                        n = self._rx.readinto(rec) or 0
                if n < _REC:
                    return
                self._held = 1
            t = rec[8] | (rec[9] << 8) | (rec[10] << 16) | (rec[11] << 24)   # board µs wrapped at 2**30
            if _wdiff(t, now) > 0:
                return
            self._held = 0
            gpio = rec[1]
            value = rec[4] | (rec[5] << 8) | (rec[6] << 16) | (rec[7] << 24)
            if rec[0] == K_LEVEL:
                self._apply_level(gpio, value, t)
            elif rec[0] == K_ANALOG:
                self._analog_uv[gpio] = value

    def _apply_level(self, gpio, level, t_us):
        if self._levels[gpio] == level:
            return
        self._levels[gpio] = level
        listeners = self._listeners.by_gpio[gpio]
        if listeners is None:
            return
        held = self._override
        self._override = t_us
        for obj in listeners:
            obj._edge(level, t_us)
        self._override = held

    async def background(self):
        """Runs the virtual board's 'hardware': world records, pin IRQs and hard timers.

        On the ESP32 hardware does this; here one task steps it when the next
        thing is due: a timer, the world record read and held, or at most
        _LOOK_MS host milliseconds after the last look at the world pipe (the
        bench writes each record LOOKAHEAD_HOST_S = 50 ms ahead of its time, so
        a record is always held before it is due), and never sooner than 1 ms.
        An idle board wakes ~100 times a host second instead of 1,000: what lets
        a town of them run on a small machine. A timer callback runs late when
        the VM is busy, and that lateness (in board time) is kept as
        late_max_us, the jitter a test reads. Allocates nothing.
        """
        import asyncio
        per_ms = self.speed * 1000             # board µs in a host ms
        rec = self._rec
        while True:
            self.pump()
            now = self.virtual_us()
            wait_ms = _LOOK_MS
            for t in self._timers:
                while _wdiff(now, t.next_us) >= 0:
                    late = _wdiff(now, t.next_us)
                    t.late_us = late
                    if late > t.late_max_us:
                        t.late_max_us = late
                    t.runs += 1
                    self._override = t.next_us     # the callback sees its scheduled time, as a hardware
                    t.callback(t)                  # timer's does; its lateness is in late_us
                    self._override = -1
                    t.next_us = _wadd(t.next_us, t.period_us)
                due_ms = _wdiff(t.next_us, now) // per_ms
                if due_ms < wait_ms:
                    wait_ms = due_ms
            if self._held:
                due_ms = _wdiff(rec[8] | (rec[9] << 8) | (rec[10] << 16) | (rec[11] << 24), now) // per_ms
                if due_ms < wait_ms:
                    wait_ms = due_ms
            await asyncio.sleep_ms(wait_ms if wait_ms > 1 else 1)
