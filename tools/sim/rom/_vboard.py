# The virtual board's ROM state, shared by vboot.py, machine.py and hal_virtual.py
# inside MicroPython (the unix port), and the one table of the pipe between the
# world and the VM, which the host side (tools/sim/board.py) reads from here too.
import sys

if sys.implementation.name == "micropython":
    from micropython import const
else:                    # CPython: the host side of the pipe (not the `micropython` package: a whole VM)
    def const(x):
        return x

EXIT_HARD_RESET = const(90)
EXIT_SOFT_RESET = const(91)
EXIT_DEEP_SLEEP = const(92)     # after a K_SLEEP record: the bench wakes the board (reset cause deepsleep)
# Pipe records, both ways: struct RECORD_FORMAT = (kind, gpio, reserved, value, t_us), t_us the
# board's virtual microseconds since its epoch, wrapped at 2**30 (a small int on a 32-bit VM).
RECORD_FORMAT = "<BBHiQ"
RECORD_BYTES = const(16)
K_LEVEL = const(1)       # world -> board: digital input level
K_ANALOG = const(2)      # world -> board: analog input, microvolts
K_OUTPUT = const(3)      # board -> world: digital output level
K_WDT = const(4)         # board -> bench: watchdog fed, value = timeout ms
K_BOOTED = const(5)      # ROM -> bench: the VM is running code
K_SLEEP = const(6)       # ROM -> bench: deep sleep; value = ms (0: until the wake pin or a power cut),
#                          gpio = the wake pin, low wakes (NO_WAKE_GPIO: none); reserved = 1 when t_us is
#                          the board time the sleep began, 0 when the bench should take its own clock
K_RTC = const(7)         # ROM -> bench: RTC memory, 4 bytes a record in value (little-endian, zero-padded),
#                          t_us = their byte offset, reserved = the memory's whole length; sent in order
#                          from offset 0 on every write (a length of 0: one record, the memory emptied)
K_EXIT = const(8)        # ROM -> bench: the VM ends with exit code value (a reset, a soft reset, a deep sleep);
#                          the bench ends it (a SystemExit from main.py would fall into the REPL -i gives)
NO_WAKE_GPIO = const(255)
RTC_MEMORY_MAX = const(2048)   # bytes, as an ESP32's machine.RTC().memory()

PARAMS = {}


def send(kind, gpio, reserved, value, t_us=0):
    """One record to the bench (machine.py's and hal_virtual.py's slow paths; the HAL's
    sampling path packs its own records without allocating)."""
    import struct
    PARAMS["world_out"].write(struct.pack(RECORD_FORMAT, kind, gpio, reserved, value, t_us))


def rtc_memory(data=None):
    """The RTC's slow memory: kept by the bench across a deep sleep, empty after any other reset
    (the bench passes it in PARAMS["rtc_memory"] as hex). Get -> bytes; set -> stored at once."""
    if data is None:
        if "rtc" not in PARAMS:
            PARAMS["rtc"] = bytes.fromhex(PARAMS.get("rtc_memory", ""))
        return PARAMS["rtc"]
    data = bytes(data)
    if len(data) > RTC_MEMORY_MAX:
        raise ValueError("buffer too long")
    PARAMS["rtc"] = data
    n = len(data)
    for off in range(0, n if n else 1, 4):
        word = int.from_bytes(data[off:off + 4] + bytes(4 - len(data[off:off + 4])), "little")
        send(K_RTC, 0, n, word - (1 << 32) if word >= 1 << 31 else word, off)


def end(code):
    """End the VM as a reset or a deep sleep ends a board's program: the bench ends the process on
    K_EXIT; without a bench (or from the REPL) SystemExit does. Never returns."""
    import sys
    import time
    if "world_out" in PARAMS:
        send(K_EXIT, 0, 0, code)
        time.sleep_ms(2000)          # the bench ends the VM here; nothing else runs meanwhile
    sys.exit(code)


def deep_sleep(ms, wake_gpio=NO_WAKE_GPIO, t_us=-1):
    """Tell the bench and end the VM: it wakes the board after ms of board time (0: never), or at
    once when the world drives wake_gpio low. Never returns."""
    ms = max(0, min(int(ms), 0x7FFFFFFF))
    send(K_SLEEP, wake_gpio if 0 <= wake_gpio < NO_WAKE_GPIO else NO_WAKE_GPIO, 1 if t_us >= 0 else 0, ms,
         t_us if t_us >= 0 else 0)
    end(EXIT_DEEP_SLEEP)


class FileBlockDevice:
    """The vfs partition as an image file, written through at once so that a
    SIGKILL leaves the bytes a power cut would leave on the chip."""

    def __init__(self, f, block_size, block_count):
        self.f, self.block_size, self.block_count = f, block_size, block_count
        self.writes = 0
        self.erases = 0
        self.erased = None       # per-block erase counts, once a benchmark asks (count_erases())

    def count_erases(self):
        import array
        self.erased = array.array("I", [0] * self.block_count)

    def readblocks(self, block, buf, offset=0):
        self.f.seek(block * self.block_size + offset)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, offset=None):
        self.f.seek(block * self.block_size + (offset or 0))
        self.f.write(buf)
        self.writes += 1

    def ioctl(self, op, arg):
        if op == 4:
            return self.block_count
        if op == 5:
            return self.block_size
        if op == 6:
            self.erases += 1
            if self.erased is not None:
                self.erased[arg] += 1
            return 0
        return None
