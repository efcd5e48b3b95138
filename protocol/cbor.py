# CBOR for prapa: RFC 8949 with the section 4.2.1 core deterministic encoding.
#
# Runs unchanged on MicroPython (the board) and CPython (the gateway, which
# cross-checks it against cbor2). The profile (see SPEC.md):
# - preferred serialization: shortest heads, floats in the shortest of
#   half/single/double that keeps the value; definite lengths only;
# - map keys sorted by their encoded bytes, no duplicates, and all keys of one
#   map of one major type (then cbor2's length-first "canonical" order and
#   RFC 8949's bytewise order agree, so both sides make the same bytes);
# - integers up to 64 bits; tags (Tag); simple values false, true, null.
# decode() is strict: anything outside the profile raises CBORError naming
# the offset, and no length is trusted beyond the bytes present, so a hostile
# length never allocates.
import struct

from protocol._compat import const

MAX_DEPTH = const(16)
# True on a board whose floats are IEEE single precision (the ESP32 port): it cannot hold every
# double, so it decodes a double that is not a single to the nearest single (see _double_fits).
SINGLE_FLOATS = 1.0 + 2.0 ** -30 == 1.0
_SINGLE_EXP_MIN = const(1023 - 126)   # a double's biased exponent that a normal single can carry
_SINGLE_EXP_MAX = const(1023 + 127)
_U64 = (1 << 64) - 1
_N64 = -(1 << 64)      # precomputed: arithmetic on big ints allocates


class CBORError(ValueError):
    pass


class Tag:
    __slots__ = ("tag", "value")

    def __init__(self, tag, value):
        self.tag, self.value = tag, value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


# -- allocation-free writers for the board's hot path ---------------------------
def put_head(buf, off, major, value):
    """Write a head (major type, argument) at off; return the new offset."""
    mt = major << 5
    if value < 24:
        buf[off] = mt | value
        return off + 1
    if value < 0x100:
        buf[off] = mt | 24
        buf[off + 1] = value
        return off + 2
    if value < 0x10000:
        buf[off] = mt | 25
        buf[off + 1] = value >> 8
        buf[off + 2] = value & 0xFF
        return off + 3
    if value < 0x100000000:
        buf[off] = mt | 26
        for i in range(4):
            buf[off + 4 - i] = (value >> (8 * i)) & 0xFF
        return off + 5
    buf[off] = mt | 27
    for i in range(8):
        buf[off + 8 - i] = (value >> (8 * i)) & 0xFF
    return off + 9


def put_int(buf, off, value):
    if value >= 0:
        return put_head(buf, off, 0, value)
    return put_head(buf, off, 1, -1 - value)


def put_uints_le(buf, off, raw, pos, widths):
    """Each little-endian unsigned column of raw from pos (their byte widths in `widths`, a bytes) as a
    CBOR uint; return the new offset. A flash record's columns go onto the wire without being unpacked
    into a tuple first (struct.unpack_from's allocates): nothing is allocated for values below 2**30,
    where a 32-bit board's small ints end."""
    for w in widths:
        v = 0
        i = pos + w - 1
        while i >= pos:
            v = (v << 8) | raw[i]
            i -= 1
        off = put_head(buf, off, 0, v)
        pos += w
    return off


def put_bytes(buf, off, data):
    n = len(data)
    off = put_head(buf, off, 2, n)
    buf[off:off + n] = data
    return off + n


def encode_into(buf, off, obj):
    """Encode obj into the preallocated buf at off; return the new offset.

    Integers, byte strings and array/map heads allocate nothing; use them from
    the sampling path. Other values go through encode() and are copied.
    """
    t = type(obj)
    if t is int and _N64 <= obj <= _U64:
        return put_int(buf, off, obj)
    if t is bytes or t is bytearray or t is memoryview:
        return put_bytes(buf, off, obj)
    data = encode(obj)
    buf[off:off + len(data)] = data
    return off + len(data)


# -- encoder ---------------------------------------------------------------------
def _float(out, x):
    if x != x:
        out.extend(b"\xf9\x7e\x00")
        return
    for head, fmt in ((0xF9, ">e"), (0xFA, ">f")):
        try:
            packed = struct.pack(fmt, x)
        except (OverflowError, ValueError):
            continue
        if struct.unpack(fmt, packed)[0] == x:
            out.append(head)
            out.extend(packed)
            return
    out.append(0xFB)
    out.extend(struct.pack(">d", x))


def _encode(out, obj, depth):
    if depth > MAX_DEPTH:
        raise CBORError("nesting deeper than %d" % MAX_DEPTH)
    if obj is False:
        out.append(0xF4)
    elif obj is True:
        out.append(0xF5)
    elif obj is None:
        out.append(0xF6)
    elif isinstance(obj, int):
        if not _N64 <= obj <= _U64:
            raise CBORError("integer %d does not fit 64 bits" % obj)
        head = bytearray(9)
        out.extend(head[:put_int(head, 0, obj)])
    elif isinstance(obj, float):
        _float(out, obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _head(out, 2, len(obj))
        out.extend(obj)
    elif isinstance(obj, str):
        data = obj.encode()
        _head(out, 3, len(data))
        out.extend(data)
    elif isinstance(obj, (list, tuple)):
        _head(out, 4, len(obj))
        for item in obj:
            _encode(out, item, depth + 1)
    elif isinstance(obj, dict):
        pairs = []
        major = -1
        for k, v in obj.items():
            kb = bytearray()
            _encode(kb, k, depth + 1)
            if major >= 0 and kb[0] >> 5 != major:
                raise CBORError("map keys of more than one type; use all integers >= 0 or all text")
            major = kb[0] >> 5
            pairs.append((bytes(kb), v))
        pairs.sort(key=lambda p: p[0])
        _head(out, 5, len(pairs))
        for kb, v in pairs:
            out.extend(kb)
            _encode(out, v, depth + 1)
    elif isinstance(obj, Tag):
        _head(out, 6, obj.tag)
        _encode(out, obj.value, depth + 1)
    else:
        raise CBORError("cannot encode %s" % type(obj).__name__)


def _head(out, major, value):
    head = bytearray(9)
    out.extend(head[:put_head(head, 0, major, value)])


def encode(obj):
    out = bytearray()
    _encode(out, obj, 0)
    return bytes(out)


# -- decoder ---------------------------------------------------------------------
class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data):
        self.data, self.pos, self.end = data, 0, len(data)

    def fail(self, what):
        raise CBORError("%s at offset %d" % (what, self.pos))

    def take(self, n):
        if n > self.end - self.pos:
            self.fail("truncated: %d bytes announced, %d left" % (n, self.end - self.pos))
        p = self.pos
        self.pos = p + n
        return self.data[p:p + n]

    def head(self):
        start = self.pos
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, info
        if info > 27:
            self.pos = start
            self.fail("indefinite length or reserved head 0x%02x" % initial)
        n = 1 << (info - 24)
        value = int.from_bytes(self.take(n), "big")
        if major != 7:
            smallest = 24 if n == 1 else 1 << (4 * n)
            if value < smallest:
                self.pos = start
                self.fail("non-preferred (longer than needed) head")
        return major, info, value


def _decode(r, depth):
    if depth > MAX_DEPTH:
        r.fail("nesting deeper than %d" % MAX_DEPTH)
    start = r.pos
    major, info, value = r.head()
    if major == 0:
        return value
    if major == 1:
        return -1 - value
    if major == 2:
        return bytes(r.take(value))
    if major == 3:
        try:
            return str(r.take(value), "utf-8")
        except UnicodeError:
            r.pos = start
            r.fail("text string is not UTF-8")
    if major == 4:
        if value > r.end - r.pos:
            r.fail("array of %d items cannot fit the %d bytes left" % (value, r.end - r.pos))
        return [_decode(r, depth + 1) for _ in range(value)]
    if major == 5:
        if value * 2 > r.end - r.pos:
            r.fail("map of %d pairs cannot fit the %d bytes left" % (value, r.end - r.pos))
        out = {}
        prev = None
        for _ in range(value):
            kstart = r.pos
            key = _decode(r, depth + 1)
            kbytes = bytes(r.data[kstart:r.pos])
            if prev is not None:
                if kbytes[0] >> 5 != prev[0] >> 5:
                    r.pos = kstart
                    r.fail("map keys of more than one type")
                if kbytes == prev:
                    r.pos = kstart
                    r.fail("duplicate map key")
                if kbytes < prev:
                    r.pos = kstart
                    r.fail("map keys not in deterministic order")
            prev = kbytes
            if not (type(key) is str or (type(key) is int and key >= 0)):
                r.pos = kstart                  # a tag, bytes, float, array... (a tag is not even hashable)
                r.fail("map key is not a uint or text")
            out[key] = _decode(r, depth + 1)
        return out
    if major == 6:
        return Tag(value, _decode(r, depth + 1))
    # major 7: simple values and floats
    if info == 20:
        return False
    if info == 21:
        return True
    if info == 22:
        return None
    if info in (25, 26, 27):
        raw = r.data[r.pos - (1 << (info - 24)):r.pos]
        if info == 27 and SINGLE_FLOATS:
            fits = _double_fits(raw)
            if fits < 0:
                r.pos = start
                r.fail("float beyond this board's single precision range")
            if fits == 0:                        # not a single: the nearest single is all a board holds
                return struct.unpack(">d", raw)[0]
        x = struct.unpack((">e", ">f", ">d")[info - 25], raw)[0]
        if bytes(r.data[start:r.pos]) != encode(x):
            r.pos = start
            r.fail("float not in its shortest form")
        return x
    r.pos = start
    r.fail("unsupported simple value %d" % value)


def _double_fits(raw):
    """For a single-precision board, from a double's 8 bytes: 1 if a single holds it exactly (it
    must then have been sent in its shortest form), 0 if it is finite and within the singles' range
    but not a single (decoded to the nearest single), -1 if finite and beyond that range (refused:
    it would become infinity)."""
    e = ((raw[0] & 0x7F) << 4) | (raw[1] >> 4)
    low = (raw[4] & 0x1F) | raw[5] | raw[6] | raw[7]      # the mantissa bits a single has no room for
    if e == 0x7FF:                                        # infinity or NaN: half precision carries them
        return 1
    if e > _SINGLE_EXP_MAX:
        return -1
    if e == 0 and not any(raw[1:]):
        return 1                                          # zero
    if low or e < _SINGLE_EXP_MIN:
        return 0
    return 1


def decode(data):
    """Decode exactly one item that fills data; raise CBORError otherwise."""
    r = _Reader(data)
    obj = _decode(r, 0)
    if r.pos != r.end:
        r.fail("%d trailing bytes" % (r.end - r.pos))
    return obj
