# Arithmetic on counts and times that wrap at 2**30, as an ESP32's ticks do.
#
# A 32-bit board's small ints end at 2**30: one step past it is a big int, which
# allocates (and raises under heap_lock). So every sum and difference here stays a
# small int on the way, and the sampling path, the HALs' clocks and their pulse
# counts use these two instead of `(a + b) & mask` (whose a + b is already past it).
# Arguments are in 0 .. 2**30 - 1; wadd's b may also be down to -2**29.
from micropython import const

PERIOD_MASK = const((1 << 30) - 1)
_HALF = const(1 << 29)


def wdiff(a, b):
    """a - b, the short way round the wrap: -2**29 .. 2**29 - 1."""
    d = a - b
    if d >= _HALF:
        return d - PERIOD_MASK - 1
    if d < -_HALF:
        return d + PERIOD_MASK + 1
    return d


def wadd(a, b):
    """(a + b) mod 2**30."""
    if b < 0:                          # a step back is a step forward by 2**30 - |b|
        b = b + PERIOD_MASK + 1
    return a + b if a <= PERIOD_MASK - b else a - PERIOD_MASK - 1 + b
