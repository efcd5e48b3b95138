# Counts edges of a digital input that held their new level for filter_us.
#
# Shared by both HALs so the virtual board and the ESP32 debounce alike: the
# ESP32's PCNT glitch filter stops at ~12.8 us, far short of a reed switch's
# 5 ms of contact bounce, so longer filters run here, fed by pin edges.
# Times are HAL ticks_us (wrapping at 2**30); the count wraps at 2**30 too (a
# small int on a 32-bit board: firmware/ticks.py), so nothing here allocates, ever.
from ticks import wadd, wdiff


class EdgeCounter:
    __slots__ = ("active", "filter_us", "count", "_stable", "_pending", "_since")

    def __init__(self, level_now, active_level, filter_us):
        self.active = active_level
        self.filter_us = filter_us
        self.count = 0
        self._stable = level_now
        self._pending = level_now
        self._since = 0

    def settle(self, now_us):
        if self._pending != self._stable:
            held = wdiff(now_us, self._since)
            if held >= self.filter_us:
                self._stable = self._pending
                if self._stable == self.active:
                    self.count = wadd(self.count, 1)

    def edge(self, level, t_us):
        self.settle(t_us)
        self._pending = level
        self._since = t_us
        if self.filter_us == 0:
            self.settle(t_us)
