# The board's uplink frame counter, reserved on flash BLOCK at a time.
#
# The file holds the bound below which counters may have been used. A boot
# starts at that bound and writes bound + BLOCK (atomically, by rename)
# before the first frame; so a power cut at any instant skips at most a
# block and never repeats a counter (a repeated counter would reuse a CCM
# nonce and let a replay through).
import persist
from protocol.secure import COUNTER_MAX


class FlashCounters:
    BLOCK = 256

    def __init__(self, path="frame_ctr", block=BLOCK):
        self.path, self.block = path, block
        self.value = self.bound = persist.read_int(path, 0)
        self._reserve()

    def _reserve(self):
        bound = self.bound + self.block
        persist.write_int(self.path, bound)
        self.bound = bound

    def next(self):
        if self.value >= self.bound:
            self._reserve()
        if self.value > COUNTER_MAX:
            raise OverflowError("frame counter exhausted: provision a new key")
        v = self.value
        self.value += 1
        return v
