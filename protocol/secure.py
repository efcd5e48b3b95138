# The secure frame: header (authenticated, in clear) | AES-CCM(payload) | tag.
#
#   header  = version u8 | flags u8 | device_id u32 | counter u32 | msg_type u8   (11 bytes, big-endian)
#   flags   = bit 0: direction (0 board -> gateway, 1 gateway -> board)
#   nonce   = device_id u32 | direction u8 | 0 u32 | counter u32                 (13 bytes)
#
# A (key, nonce) pair must never repeat, so each direction's counter strictly
# increases for the life of the key: the board reserves counters on flash in
# blocks (one write per BLOCK frames) and starts each boot at the reserved
# bound, so a power cut can skip counters but never reuse one. The receiver
# keeps a sliding window: it refuses a counter it has seen, one older than the
# window and one that jumps absurdly far ahead; it moves the window only after
# the tag is verified, and counts every refusal by reason.
from protocol._compat import const

from protocol.ccm import TAG_LEN, AuthError, Ccm

VERSION = const(1)
HEADER_LEN = const(11)
OVERHEAD = const(19)        # HEADER_LEN + the 8-byte CCM tag
UPLINK = const(0)
DOWNLINK = const(1)
WINDOW = const(64)
MAX_JUMP = const(1 << 24)
COUNTER_MAX = 0xFFFFFFFF   # not a const: above a 32-bit small int
REASONS = ("short", "version", "direction", "unknown_device", "replay", "too_old", "future", "auth")


class Reject(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def pack_header(buf, direction, device_id, counter, msg_type):
    buf[0] = VERSION
    buf[1] = direction & 1
    for i in range(4):
        buf[2 + i] = (device_id >> (24 - 8 * i)) & 0xFF
        buf[6 + i] = (counter >> (24 - 8 * i)) & 0xFF
    buf[10] = msg_type


def parse_header(frame, flen):
    """(version, direction, device_id, counter, msg_type); raises Reject('short')."""
    if flen < OVERHEAD:
        raise Reject("short")
    device_id = (frame[2] << 24) | (frame[3] << 16) | (frame[4] << 8) | frame[5]
    counter = (frame[6] << 24) | (frame[7] << 16) | (frame[8] << 8) | frame[9]
    return frame[0], frame[1] & 1, device_id, counter, frame[10]


def device_of(frame, flen):
    """The device id of a frame (to pick its key), or Reject('short')."""
    if flen < OVERHEAD:
        raise Reject("short")
    return (frame[2] << 24) | (frame[3] << 16) | (frame[4] << 8) | frame[5]


def nonce_into(nonce, device_id, direction, counter):
    for i in range(4):
        nonce[i] = (device_id >> (24 - 8 * i)) & 0xFF
        nonce[5 + i] = 0
        nonce[9 + i] = (counter >> (24 - 8 * i)) & 0xFF
    nonce[4] = direction


class Sealer:
    """Seals frames for one (key, device, direction); `counters` hands out counters."""

    def __init__(self, key, device_id, direction, counters):
        self.ccm = Ccm(key)
        self.device_id, self.direction, self.counters = device_id, direction, counters
        self._nonce = bytearray(13)
        self.sent = 0

    def seal_into(self, msg_type, payload, plen, out):
        """Write a whole secure frame into out; return its length."""
        counter = self.counters.next()
        pack_header(out, self.direction, self.device_id, counter, msg_type)
        nonce_into(self._nonce, self.device_id, self.direction, counter)
        n = self.ccm.seal_into(self._nonce, out, payload, plen, out, HEADER_LEN, HEADER_LEN)
        self.sent += 1
        return HEADER_LEN + n


class ReplayWindow:
    """The highest counter verified and a bitmap of the WINDOW below it."""

    __slots__ = ("top", "bits")

    def __init__(self, top=-1):
        self.top, self.bits = top, 0

    def check(self, counter):
        if self.top < 0 or counter > self.top:
            if self.top >= 0 and counter - self.top > MAX_JUMP:
                return "future"
            return None
        if self.top - counter >= WINDOW:
            return "too_old"
        if (self.bits >> (self.top - counter)) & 1:
            return "replay"
        return None

    def accept(self, counter):
        if self.top < 0 or counter > self.top:
            shift = counter - self.top if self.top >= 0 else WINDOW
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)


class Opener:
    """Verifies and decrypts frames from one peer (key, device, direction)."""

    def __init__(self, key, device_id, direction, window=None):
        self.ccm = Ccm(key)
        self.device_id, self.direction = device_id, direction
        self.window = window or ReplayWindow()
        self._nonce = bytearray(13)
        self.rejected = {r: 0 for r in REASONS}
        self.accepted = 0

    def open_into(self, frame, flen, out):
        """Return (msg_type, counter, payload length) with the payload in out, or raise Reject."""
        try:
            version, direction, device_id, counter, msg_type = parse_header(frame, flen)
            if version != VERSION:
                raise Reject("version")
            if direction != self.direction:
                raise Reject("direction")
            if device_id != self.device_id:
                raise Reject("unknown_device")
            why = self.window.check(counter)
            if why:
                raise Reject(why)
            nonce_into(self._nonce, device_id, direction, counter)
            try:
                n = self.ccm.open_into(self._nonce, frame, frame, flen - HEADER_LEN, out, HEADER_LEN, HEADER_LEN)
            except AuthError:
                raise Reject("auth")
        except Reject as r:
            self.rejected[r.reason] += 1
            raise
        self.window.accept(counter)
        self.accepted += 1
        return msg_type, counter, n


class MemoryCounters:
    """Counters held in RAM (the gateway persists its own in its store)."""

    def __init__(self, start=0):
        self.value = start

    def next(self):
        if self.value > COUNTER_MAX:
            raise OverflowError("frame counter exhausted: provision a new key")
        v = self.value
        self.value += 1
        return v
