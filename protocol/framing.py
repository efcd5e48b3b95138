# Byte-stream framing for UART and RS-485 (UDP and ESP-NOW carry one frame per
# datagram and skip this layer).
#
#   wire:  COBS( addr | frame | crc16 ) 0x00
#
# - COBS makes 0x00 a delimiter that never occurs inside a frame, so a reader
#   resynchronises at the next 0x00 after garbage, line noise or half a frame.
# - addr is the RS-485 drop (1-247); 0 is the gateway; 255 reaches every drop.
# - crc16 is CRC-16/CCITT-FALSE (big-endian) over addr | frame: it drops line
#   noise before any decryption work. Authenticity is the AEAD's job, not this.
# - A frame is at most MAX_FRAME bytes so the same frames fit ESP-NOW.
# Nothing here allocates per byte or per frame: encode_into writes into the
# caller's buffer and Reader decodes in place into its own.
from protocol._compat import const

MAX_FRAME = const(250)
ADDR_GATEWAY = const(0)
ADDR_BROADCAST = const(255)
_RAW_MAX = const(MAX_FRAME + 3)            # addr + frame + crc
MAX_WIRE = const(_RAW_MAX + 3)             # COBS overhead (2 for 253 bytes) + delimiter


def _table():
    t = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else c << 1
        t.append(c & 0xFFFF)
    return tuple(t)


_CRC_TABLE = _table()


def crc16(buf, start, end):
    c = 0xFFFF
    t = _CRC_TABLE
    for i in range(start, end):
        c = ((c << 8) & 0xFF00) ^ t[(c >> 8) ^ buf[i]]
    return c


def encode_into(out, addr, frame, flen):
    """COBS-encode addr | frame[:flen] | crc16, plus the 0x00 delimiter, into out.

    out must hold MAX_WIRE bytes; returns the number of bytes to send.
    """
    if flen > MAX_FRAME or flen < 1:
        raise ValueError("frame must be 1..%d bytes" % MAX_FRAME)
    crc = 0xFFFF
    t = _CRC_TABLE
    code_at, o, code = 0, 1, 1
    for i in range(flen + 3):
        if i == 0:
            b = addr
        elif i <= flen:
            b = frame[i - 1]
        elif i == flen + 1:
            b = crc >> 8
        else:
            b = crc & 0xFF
        if i <= flen:
            crc = ((crc << 8) & 0xFF00) ^ t[(crc >> 8) ^ b]
        if b == 0:
            out[code_at] = code
            code_at, o, code = o, o + 1, 1
        else:
            out[o] = b
            o += 1
            code += 1
            if code == 0xFF:
                out[code_at] = code
                code_at, o, code = o, o + 1, 1
    out[code_at] = code
    out[o] = 0
    return o + 1


class Reader:
    """Turns a byte stream into frames for `my_addr`, counting what it drops.

    feed() calls on_frame(addr, buf, length) for each good frame; buf is the
    reader's own buffer, valid only during the call.
    """

    REASONS = ("noise", "crc", "too_long", "not_for_us")

    def __init__(self, on_frame, my_addr=ADDR_GATEWAY, accept_any=False):
        self.on_frame = on_frame
        self.my_addr = my_addr
        self.accept_any = accept_any
        self._buf = bytearray(MAX_WIRE)
        self._n = 0
        self._overflow = False
        self.frames = 0
        self.dropped = {r: 0 for r in self.REASONS}

    def feed(self, data, length=-1):
        if length < 0:
            length = len(data)
        for i in range(length):
            b = data[i]
            if b:
                if self._n < MAX_WIRE:
                    self._buf[self._n] = b
                    self._n += 1
                else:
                    self._overflow = True
                continue
            if self._overflow:
                self.dropped["too_long"] += 1
            elif self._n:
                self._frame()
            self._n = 0
            self._overflow = False

    def _frame(self):
        buf, n = self._buf, self._n
        # COBS decode in place: output never runs ahead of input.
        r, w = 0, 0
        while r < n:
            code = buf[r]
            if r + code > n:
                self.dropped["noise"] += 1
                return
            r += 1
            for _ in range(code - 1):
                buf[w] = buf[r]
                w += 1
                r += 1
            if code < 0xFF and r < n:
                buf[w] = 0
                w += 1
        if w < 4:
            self.dropped["noise"] += 1
            return
        if crc16(buf, 0, w - 2) != (buf[w - 2] << 8) | buf[w - 1]:
            self.dropped["crc"] += 1
            return
        addr = buf[0]
        if not self.accept_any and addr != self.my_addr and addr != ADDR_BROADCAST:
            self.dropped["not_for_us"] += 1
            return
        self.frames += 1
        # Shift the frame to the front without allocating a view per frame.
        for i in range(w - 3):
            buf[i] = buf[i + 1]
        self.on_frame(addr, buf, w - 3)
