# HAL backend for a real ESP32: the only firmware module that imports machine
# and esp32. Same surface as hal_virtual.py.
#
# Deep sleep: machine.deepsleep() ends the program; the chip boots again with
# reset cause DEEPSLEEP_RESET. What the runtime carries through it sits in
# machine.RTC().memory(), which this HAL empties at any other boot (the ESP32
# keeps that RAM through a soft or watchdog reset too; the contract is "a deep
# sleep only"), and rtc_ms() is the RTC's clock (it keeps running asleep, where
# ticks_ms() starts again from 0).
import gc
import json
import time

import esp32
import machine
from micropython import const

from datagram import Datagrams
from edge_counter import EdgeCounter
from ticks import wadd

TICKS_PERIOD = const(1 << 30)
_PCNT_FILTER_MAX_US = const(12)
_TRIGGER_US = const(10)          # the JSN-SR04T starts a ping on a 10 us high pulse
_SONAR_BAUD = const(9600)
_FRAME_MAX_AGE_MS = const(1000)  # an A02YYUW sends ~10 frames/s: an older one is no reading

_CAUSE = {
    machine.PWRON_RESET: "power_on",
    machine.HARD_RESET: "hard_reset",
    machine.WDT_RESET: "watchdog",
    machine.SOFT_RESET: "soft_reset",
    machine.DEEPSLEEP_RESET: "deepsleep",
}


class InputPin:
    __slots__ = ("_pin",)
    IRQ_FALLING = machine.Pin.IRQ_FALLING
    IRQ_RISING = machine.Pin.IRQ_RISING

    def __init__(self, gpio, pull_up):
        self._pin = machine.Pin(gpio, machine.Pin.IN, machine.Pin.PULL_UP if pull_up else None)

    def value(self):
        return self._pin.value()

    def irq(self, handler=None, trigger=3):
        self._pin.irq(handler=(lambda _p: handler(self)) if handler else None, trigger=trigger)


class OutputPin:
    __slots__ = ("_pin",)

    def __init__(self, gpio, value):
        self._pin = machine.Pin(gpio, machine.Pin.OUT, value=value)

    def value(self, level=None):
        if level is None:
            return self._pin.value()
        self._pin.value(1 if level else 0)

    def on(self):
        self._pin.value(1)

    def off(self):
        self._pin.value(0)


class PulseCounter:
    """The PCNT unit when its glitch filter is enough; otherwise pin IRQs into
    the shared software filter (a reed switch bounces for milliseconds)."""

    _next_unit = 0

    def __init__(self, hal, gpio, active_level, filter_us):
        self.hal = hal
        pin = machine.Pin(gpio, machine.Pin.IN, machine.Pin.PULL_UP)
        if filter_us <= _PCNT_FILTER_MAX_US:
            unit = PulseCounter._next_unit
            PulseCounter._next_unit += 1
            edge = machine.Counter.FALLING if active_level == 0 else machine.Counter.RISING
            self._pcnt = machine.Counter(unit, pin, edge=edge, filter_ns=filter_us * 1000)
            self._pcnt_total = 0
            self._edges = None
        else:
            self._pcnt = None
            self._edges = EdgeCounter(pin.value(), active_level, filter_us)
            pin.irq(handler=self._irq, trigger=machine.Pin.IRQ_RISING | machine.Pin.IRQ_FALLING, hard=True)

    def _irq(self, pin):
        self._edges.edge(pin.value(), time.ticks_us())

    def count(self):
        """Pulses counted, wrapping at 2**30 (a small int: the caller takes differences)."""
        if self._pcnt is not None:
            # value(0) reads and clears the PCNT count in one call, so the hardware count stays small
            self._pcnt_total = wadd(self._pcnt_total, self._pcnt.value(0))
            return self._pcnt_total
        self._edges.settle(time.ticks_us())
        return self._edges.count


class Adc:
    __slots__ = ("_adc",)

    def __init__(self, gpio):
        self._adc = machine.ADC(machine.Pin(gpio), atten=machine.ADC.ATTN_11DB)

    def read_uv(self):
        return self._adc.read_uv()


class SonarEcho:
    """JSN-SR04T (trigger/echo): a 10 us trigger pulse, then the echo's high time. Allocates nothing;
    blocks up to timeout_us (call it from a task, not the hard timer)."""

    __slots__ = ("_trig", "_echo")

    def __init__(self, trig_gpio, echo_gpio):
        self._trig = machine.Pin(trig_gpio, machine.Pin.OUT, value=0)
        self._echo = machine.Pin(echo_gpio, machine.Pin.IN)

    def ping_us(self, timeout_us):
        self._trig.value(1)
        time.sleep_us(_TRIGGER_US)
        self._trig.value(0)
        t = machine.time_pulse_us(self._echo, 1, timeout_us)
        return t if t >= 0 else -1        # -2: no echo started, -1: it outlasted the timeout


class SonarUart:
    """A02YYUW (UART, 9600 baud): frames 0xFF, H, L, SUM with SUM = (0xFF + H + L) & 0xFF, distance
    H * 256 + L mm, about ten a second. read_mm() takes what the UART holds into a preallocated
    buffer and returns the newest valid frame's distance if it is under a second old, else -1;
    allocates nothing. UART1's TX must go somewhere harmless (its default, GPIO10, is the WROOM's
    flash): it drives the sensor's RX, its mode line (idle high: the processed output)."""

    __slots__ = ("_uart", "_buf", "_frame", "_n", "_mm", "_at")

    def __init__(self, rx_gpio, tx_gpio):
        self._uart = machine.UART(1, baudrate=_SONAR_BAUD, rx=rx_gpio, tx=tx_gpio, timeout=0, rxbuf=256)
        self._buf = bytearray(32)
        self._frame = bytearray(4)
        self._n = 0                       # bytes of the frame in progress
        self._mm = -1
        self._at = 0

    def read_mm(self):
        buf, f = self._buf, self._frame
        n = self._uart.readinto(buf) or 0
        while n:
            for i in range(n):
                b = buf[i]
                if self._n == 0:
                    if b == 0xFF:
                        f[0] = b
                        self._n = 1
                    continue
                f[self._n] = b
                self._n += 1
                if self._n == 4:
                    if (0xFF + f[1] + f[2]) & 0xFF == f[3]:
                        self._mm = (f[1] << 8) | f[2]
                        self._at = time.ticks_ms()
                        self._n = 0
                    else:                     # resynchronise on the next 0xFF within the bad frame
                        k = 1
                        while k < 4 and f[k] != 0xFF:
                            k += 1
                        for j in range(k, 4):
                            f[j - k] = f[j]
                        self._n = 4 - k
            n = self._uart.readinto(buf) or 0
        if self._mm < 0 or time.ticks_diff(time.ticks_ms(), self._at) > _FRAME_MAX_AGE_MS:
            return -1
        return self._mm


class Uart:
    """The data link UART; with an RS-485 transceiver the driver-enable pin is
    raised only while transmitting (UART's rts pin in RS-485 half-duplex mode)."""

    def __init__(self, link):
        self._uart = machine.UART(link["uart_id"], baudrate=link["baudrate"], tx=link["uart_tx"],
                                  rx=link["uart_rx"], rts=link["rs485_de"], timeout=0, txbuf=1024, rxbuf=1024)
        self.dropped_tx = 0

    def any(self):
        return self._uart.any()

    def readinto(self, buf):
        return self._uart.readinto(buf) or 0

    def write(self, buf):
        return self._uart.write(buf) or 0


class Watchdog:
    __slots__ = ("_wdt",)

    def __init__(self, timeout_ms):
        self._wdt = machine.WDT(timeout=timeout_ms)

    def feed(self):
        self._wdt.feed()


class Periodic:
    """A hard timer; the callback runs in interrupt context and must not allocate."""

    _next_id = 0

    def __init__(self, hal, period_ms, callback):
        self.late_max_us, self.runs, self.late_us = 0, 0, 0
        self.period_us = period_ms * 1000
        self._due = -1
        self._timer = machine.Timer(Periodic._next_id)
        Periodic._next_id += 1
        self._cb = callback
        self._timer.init(period=period_ms, mode=machine.Timer.PERIODIC, callback=self._run, hard=True)

    def _run(self, _t):
        # late_us: how far this run is behind its schedule (the jitter a role may record).
        now = time.ticks_us()
        if self._due < 0:
            self._due = now
        late = time.ticks_diff(now, self._due)
        self.late_us = late if late > 0 else 0
        if self.late_us > self.late_max_us:
            self.late_max_us = self.late_us
        self._due = time.ticks_add(self._due, self.period_us)
        self.runs += 1
        self._cb(self)

    def stop(self):
        self._timer.deinit()


class StrokeOutput:
    """One fixed-length pulse a call on a GPIO, ended by a one-shot hard timer: a metering pump's
    external contact input makes one stroke per pulse. pulse() never blocks and allocates nothing
    (the timer's callback is bound once); a pulse asked for while one is high is refused (False)."""

    _next_id = 3                 # hardware timers 0..2 belong to Periodic

    def __init__(self, gpio, width_ms):
        self._pin = machine.Pin(gpio, machine.Pin.OUT, value=0)
        self._width_ms = width_ms
        self._timer = machine.Timer(StrokeOutput._next_id)
        StrokeOutput._next_id -= 1
        self._end_cb = self._end
        self.high = 0

    def _end(self, _t):
        self._pin.value(0)
        self.high = 0

    def pulse(self):
        if self.high:
            return False
        self.high = 1
        self._pin.value(1)
        self._timer.init(period=self._width_ms, mode=machine.Timer.ONE_SHOT, callback=self._end_cb, hard=True)
        return True

    def off(self):
        self._timer.deinit()
        self._pin.value(0)
        self.high = 0


class Wifi(Datagrams):
    """Datagrams once the station interface has joined the network (its own background work)."""

    def __init__(self, ssid, password, host, port):
        import network
        super().__init__(host, port)
        self.wlan = network.WLAN(network.STA_IF)
        self.wlan.active(True)
        self.wlan.connect(ssid, password)

    def ready(self):
        return self.wlan.isconnected() and super().ready()


class Hal:
    platform = "esp32"

    def __init__(self):
        with open("/board.json") as f:
            self.board = json.load(f)
        self._bdev = None
        self._uart = None
        if machine.reset_cause() != machine.DEEPSLEEP_RESET:
            machine.RTC().memory(b"")     # RTC memory is a deep sleep's only: see the module's note

    def ticks_us(self):
        return time.ticks_us()

    def ticks_ms(self):
        return time.ticks_ms()

    def link_ticks_ms(self):
        """Same as ticks_ms here; the virtual board separates the two when it runs fast."""
        return time.ticks_ms()

    @staticmethod
    def ticks_diff(a, b):
        return time.ticks_diff(a, b)

    @staticmethod
    def ticks_add(t, delta):
        return time.ticks_add(t, delta)

    def virtual_us(self):
        return time.ticks_us()

    def sleep_ms(self, ms):
        time.sleep_ms(ms)

    def asleep_ms(self, ms):
        import asyncio
        return asyncio.sleep_ms(ms)

    def pin_in(self, gpio, pull_up=True):
        return InputPin(gpio, pull_up)

    def pin_out(self, gpio, value=0):
        return OutputPin(gpio, value)

    def counter(self, gpio, active_level=0, filter_us=0):
        return PulseCounter(self, gpio, active_level, filter_us)

    def stroke_output(self, gpio, width_ms):
        return StrokeOutput(gpio, width_ms)

    def adc(self, gpio):
        return Adc(gpio)

    def sonar_echo(self, trig_gpio, echo_gpio):
        return SonarEcho(trig_gpio, echo_gpio)

    def sonar_uart(self, rx_gpio, tx_gpio=-1):
        """tx_gpio: where UART1's TX goes, the sensor's RX (mode) line; -1: the role's trig_out terminal,
        which the trigger/echo sensor would use (a drain board has one sensor or the other)."""
        if tx_gpio < 0:
            tx_gpio = self.board["role_pins"]["trig_out"]
        return SonarUart(rx_gpio, tx_gpio)

    def uart(self):
        if self._uart is None:
            self._uart = Uart(self.board["link"])
        return self._uart

    def udp(self, host, port, wifi):
        """wifi: (ssid, password) from the board's /wifi.key, never from its config."""
        if wifi is None:
            raise OSError("no Wi-Fi credentials: write /wifi.json as {\"ssid\": ..., \"password\": ...}")
        return Wifi(wifi[0], wifi[1], host, port)

    def flash_bdev(self):
        if self._bdev is None:
            self._bdev = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")[0]
        return self._bdev

    def watchdog(self, timeout_ms):
        return Watchdog(timeout_ms)

    def periodic(self, period_ms, callback):
        return Periodic(self, period_ms, callback)

    def reset_cause(self):
        return _CAUSE.get(machine.reset_cause(), "brownout")

    def unique_id(self):
        return machine.unique_id()

    def reset(self):
        machine.reset()

    def deep_sleep(self, ms, wake_gpio=-1):
        """Sleep ms (0: until the wake pin), or until wake_gpio is pulled low (an RTC GPIO: the rain
        gauge's reed switch to GND); the chip then boots with reset cause "deepsleep". Never returns.
        A wake pin already low (a bucket stopped on the reed) is not armed: it would wake the board
        again at once, for ever."""
        if self._uart is not None:
            try:
                self._uart._uart.flush()      # the last frame leaves the UART's FIFO before power goes
            except (AttributeError, OSError):
                time.sleep_ms(20)
        if wake_gpio >= 0:
            pin = machine.Pin(wake_gpio, machine.Pin.IN, machine.Pin.PULL_UP)
            if pin.value():
                esp32.wake_on_ext0(pin, esp32.WAKEUP_ALL_LOW)
        machine.deepsleep(ms)

    @staticmethod
    def rtc_memory(data=None):
        """Bytes kept through a deep sleep (b"" after any other reset): get, or set (at most 2 KB)."""
        if data is None:
            return machine.RTC().memory()
        machine.RTC().memory(data)

    @staticmethod
    def wake_pin():
        """True when this boot is a deep-sleep wake that the wake gpio going low caused."""
        return machine.reset_cause() == machine.DEEPSLEEP_RESET and machine.wake_reason() == machine.EXT0_WAKE

    @staticmethod
    def rtc_ms():
        """Milliseconds on the RTC's clock, which runs through deep sleep (ticks_ms() does not), wrapping
        at 2**30; a power cut restarts it. Allocates (a 64-bit time): not for the sampling path."""
        return (time.time_ns() // 1000000) & 0x3FFFFFFF

    def soft_reset(self):
        machine.soft_reset()

    def heap_free_bytes(self):
        return gc.mem_free()

    def heap_budget_bytes(self):
        return self.board["heap_budget_bytes"]

    def pump(self):
        pass

    async def background(self):
        # Timers and IRQs are hardware here; nothing to step.
        return
