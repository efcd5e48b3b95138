# The virtual board's ROM state, shared by vboot.py, machine.py and hal_virtual.py
# inside MicroPython (the unix port), and the one table of the pipe between the
# world and the VM, which the host side (tools/sim/board.py) reads from here too.
try:
    from micropython import const
except ImportError:      # CPython: the host side of the pipe
    def const(x):
        return x

EXIT_HARD_RESET = const(90)
EXIT_SOFT_RESET = const(91)
# Pipe records, both ways: struct RECORD_FORMAT = (kind, gpio, reserved, value, t_us), t_us the
# board's virtual microseconds since its epoch, wrapped at 2**30 (a small int on a 32-bit VM).
RECORD_FORMAT = "<BBHiQ"
RECORD_BYTES = const(16)
K_LEVEL = const(1)       # world -> board: digital input level
K_ANALOG = const(2)      # world -> board: analog input, microvolts
K_OUTPUT = const(3)      # board -> world: digital output level
K_WDT = const(4)         # board -> bench: watchdog fed, value = timeout ms
K_BOOTED = const(5)      # ROM -> bench: the VM is running code

PARAMS = {}


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
