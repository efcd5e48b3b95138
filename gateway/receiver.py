"""The gateway's receive path: protocol.link.Receiver's contract on cbor2 and cryptography's AESCCM.

protocol/ stays the reference (it runs on the board too); this module is its fast twin for the
gateway, and tests/gateway/test_receiver_agreement.py feeds both the same bytes and requires the same
outcome frame for frame: the same on_message and on_refused calls, the same counts by reason.

How each layer keeps the reference's semantics:
- framing: the stream is cut at its 0x00 delimiters with bytes.split and each block decoded by
  slicing (no per-byte Python loop), with framing.Reader's limits and drop reasons: a run of more
  than MAX_WIRE bytes is too_long, a bad COBS block or a run under 4 decoded bytes is noise, then crc,
  then the address filter. A frame split across feed() calls waits in a buffer of at most
  MAX_WIRE + 1 bytes.
- security: secure.Opener's checks in its order (short, version, direction, the replay window),
  then AESCCM with the same nonce and the 11-byte header as AAD; InvalidTag is "auth". The window
  is a secure.ReplayWindow, moved only after the tag verifies, so saved windows stay compatible.
- payload: cbor2.loads (refusing indefinite lengths, duplicate keys and the tags that decode to plain
  values) is trusted only when the result holds nothing but the profile's plain types (int within
  64 bits, text, bytes, bool, null, arrays, maps whose keys are all uints or all text in the
  profile's order) and the shortest encoding of that result is exactly as long as the payload: that
  proves shortest heads, no floats, no tags and no trailing bytes (see _size). Anything else, and
  every payload that breaks its message's rule, goes through the reference messages.decode, so
  refusals carry the reference's reason and text; validate.problem is the reference's own check.
"""

from binascii import crc_hqx as _crc16       # CRC-16/CCITT-FALSE from init 0xFFFF: framing.crc16

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from protocol import framing, link, secure, validate
from protocol import messages as M

REASONS = link.REASONS
MAX_WIRE_BYTES = framing.MAX_WIRE          # encoded bytes between delimiters that framing.Reader keeps
_U64 = (1 << 64) - 1
_N64 = -(1 << 64)
_ONE_BYTE = bytes(range(24))               # uints whose CBOR is their head alone
_OVERHEAD, _VERSION, _HEADER_LEN = secure.OVERHEAD, secure.VERSION, secure.HEADER_LEN
_MAX_PLAIN_DEPTH = 15                      # below cbor.MAX_DEPTH (16): deeper goes to the reference


class StreamReader:
    """framing.Reader's contract (on_frame(addr, frame, length) per good frame; .frames; .dropped by
    Reader.REASONS), working on whole chunks: frame is a bytes object of exactly length bytes."""

    REASONS = framing.Reader.REASONS

    def __init__(self, on_frame, my_addr=framing.ADDR_GATEWAY, accept_any=False):
        self.on_frame = on_frame
        self.my_addr = my_addr
        self.accept_any = accept_any
        self._pending = b""                # the run since the last delimiter, cut at MAX_WIRE + 1 bytes
        self._stale = b""
        self.frames = 0
        self.dropped = {r: 0 for r in self.REASONS}

    def feed(self, data, length=-1):
        if length >= 0:
            short = length > len(data)
            data = bytes(data[:length])
        else:
            short = False
            data = bytes(data)
        runs = data.split(b"\x00")
        if len(runs) == 1:
            self._pending = (self._pending + data)[:MAX_WIRE_BYTES + 1]
        else:
            first = self._pending + runs[0] if self._pending else runs[0]
            self._pending = b""
            try:
                if first:
                    self._run(first)
                for run in filter(None, runs[1:-1]):
                    self._run(run)
            except BaseException:
                self._pending = self._stale
                raise
            self._pending = runs[-1][:MAX_WIRE_BYTES + 1]
        if short:       # the reference reads data[i] past the end: the same IndexError, after the bytes present
            raise IndexError("index out of range")

    def _run(self, run):
        """One delimited run of non-zero bytes."""
        n = len(run)
        if n > MAX_WIRE_BYTES:
            self.dropped["too_long"] += 1
            return
        raw = _cobs_decode(run)
        if raw is None:
            self.dropped["noise"] += 1
            return
        w = len(raw)
        if w < 4:
            self.dropped["noise"] += 1
            return
        if _crc16(raw[:-2], 0xFFFF) != (raw[-2] << 8) | raw[-1]:
            self.dropped["crc"] += 1
            return
        addr = raw[0]
        if not self.accept_any and addr != self.my_addr and addr != framing.ADDR_BROADCAST:
            self.dropped["not_for_us"] += 1
            return
        self.frames += 1
        try:
            self.on_frame(addr, raw[1:-2], w - 3)
        except BaseException:
            # Out of a callback (a bug upstream): framing.Reader then keeps its buffer as its in-place decode
            # left it and the rest of the chunk unread, and the next run goes after that buffer; so here.
            self._stale = raw[1:-2] + raw[-3:] + run[w:]
            raise


def _cobs_decode(run):
    """A run decoded as framing.Reader decodes it, or None when a code points past its end. Each code
    byte says how many bytes follow up to the next zero, which is implied, except after a full block
    (code 0xFF) and at the end."""
    n = len(run)
    blocks = []
    r = 0
    full = False
    while r < n:
        code = run[r] or 1                  # 0 only in a buffer left by a callback's exception: as the reference
        end = r + code
        if end > n:
            return None
        blocks.append(run[r + 1:end])
        full = full or code == 0xFF
        r = end
    if not full:
        return b"\x00".join(blocks)
    out = []
    r = 0
    for block in blocks:
        code = run[r] or 1
        r += code
        out.append(block)
        if code < 0xFF and r < n:
            out.append(b"\x00")
    return b"".join(out)


class Peer:
    """One device's AEAD and replay window: what Receiver.openers holds (secure.Opener's .window,
    .rejected and .accepted; the gateway saves .window)."""

    __slots__ = ("aead", "device_id", "direction", "window", "nonce_head", "rejected", "accepted")

    def __init__(self, key, device_id, direction, window=None):
        if len(key) != 16:
            raise ValueError("key must be 16 bytes (AES-128)")     # as protocol.ccm.Ccm: AESCCM would take 24 or 32
        self.aead = AESCCM(bytes(key), tag_length=secure.TAG_LEN)
        self.device_id, self.direction = device_id, direction
        self.window = window or secure.ReplayWindow()
        self.nonce_head = device_id.to_bytes(4, "big") + bytes((direction, 0, 0, 0, 0))   # nonce minus the counter
        self.rejected = {r: 0 for r in secure.REASONS}
        self.accepted = 0


class FastReceiver(link.Receiver):
    """protocol.link.Receiver's constructor and contract, argument for argument: every frame ends as one
    count (accepted, or refused under one of REASONS); on_message(device_id, counter, msg_type, message)
    and on_refused(device_id, reason, MessageError) are called exactly when and as the reference calls
    them. feed() and counts come from the reference; the framing reader, the openers and the frame's
    path are this module's."""

    def __init__(self, direction, key_for, on_message, my_addr=framing.ADDR_GATEWAY, accept_any_addr=False,
                 max_devices=64, window_for=None, on_refused=None):
        super().__init__(direction, key_for, on_message, my_addr, accept_any_addr, max_devices, window_for,
                         on_refused)
        self._reader = StreamReader(self._on_frame, my_addr, accept_any_addr)

    def datagram(self, frame):
        """One secure frame from UDP or ESP-NOW (as bytes: the frame's path slices and joins it)."""
        super().datagram(bytes(frame))

    def _opener(self, device_id):
        op = self.openers.get(device_id)
        if op is None:
            key = self.key_for(device_id)
            if key is None or len(self.openers) >= self.max_devices:
                return None
            op = Peer(key, device_id, self.direction, self.window_for(device_id) if self.window_for else None)
            self.openers[device_id] = op
        return op

    def _reject(self, op, reason):
        op.rejected[reason] += 1
        self._refused[reason] += 1

    def _on_frame(self, _addr, frame, n):
        if n < _OVERHEAD:
            self._refused["short"] += 1
            return
        device_id = int.from_bytes(frame[2:6], "big")
        op = self.openers.get(device_id) or self._opener(device_id)
        if op is None:
            self._refused["unknown_device"] += 1
            return
        if frame[0] != _VERSION:
            return self._reject(op, "version")
        if frame[1] & 1 != op.direction:
            return self._reject(op, "direction")
        counter_bytes = frame[6:10]
        counter = int.from_bytes(counter_bytes, "big")
        window = op.window
        why = window.check(counter)
        if why:
            return self._reject(op, why)
        try:
            payload = op.aead.decrypt(op.nonce_head + counter_bytes, frame[_HEADER_LEN:], frame[:_HEADER_LEN])
        except InvalidTag:
            return self._reject(op, "auth")
        window.accept(counter)
        op.accepted += 1
        msg_type = frame[10]
        message = _fast_decode(msg_type, payload)
        if message is None:
            try:
                message = M.decode(msg_type, payload)
            except M.MessageError as e:
                self._refuse_message(device_id, e)
                return
        self._deliver(device_id, counter, msg_type, message)


def _refuse_tag(_decoder):
    raise ValueError("a tag the profile decoder keeps as a Tag")


# cbor2's built-in tags that decode to a plain value: bignums (2, 3), string and value references (25, 29),
# their namespaces and the self-describe wrapper (256, 28, 55799). 25, 29 and a bignum can take fewer
# bytes than the plain value's own encoding, which the length check below could not see, so all are
# refused here. (test_receiver_agreement checks no other tag of cbor2's yields a plain value.)
_PLAIN_TAGS = {tag: _refuse_tag for tag in (2, 3, 25, 28, 29, 256, 55799)}


def _fast_decode(msg_type, payload):
    """The message messages.decode would return, or None when only the reference can say (not in the
    profile as far as this check can prove, or breaking its rule: the reference then raises)."""
    rules = _RULES.get(msg_type)
    if rules is None:
        return None
    try:
        m = _loads(payload, semantic_decoders=_PLAIN_TAGS, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception:                       # any refusal: the reference names it
        return None
    if type(m) is not dict or _size(m, 0) != len(payload) or _problem(m, rules) is not None:
        return None
    return m


_RULES, _loads, _problem = M.RULES, cbor2.loads, validate.problem


def _head(value):
    """Bytes of the shortest head for value (0..2**64-1)."""
    return 1 if value < 24 else 2 if value < 0x100 else 3 if value < 0x10000 else 5 if value < 0x100000000 else 9


def _size(obj, depth):
    """The bytes of obj's encoding in the profile, or -1 when obj holds anything but ints within 64 bits,
    text, bytes, bools, None, lists and maps whose keys are all uints ascending or all text in the
    profile's order (shorter first, then bytewise: its encoded bytes' order).

    Why a length proves the payload is in the profile: cbor2 refused indefinite lengths, duplicate
    keys and the tags that decode to plain values; every other data item takes at least the bytes of
    its shortest form, with no tag and no trailing byte, so a payload exactly this long has every
    head in its shortest form and nothing else in it. (Unsigned ints, the bulk, are sized inline.)"""
    t = type(obj)
    if t is int:
        if 0 <= obj <= _U64:
            return _head(obj)
        return _head(-1 - obj) if _N64 <= obj < 0 else -1
    if t is str:
        n = len(obj.encode())
        return _head(n) + n
    if t is bytes:
        n = len(obj)
        return _head(n) + n
    if t is bool or obj is None:
        return 1
    if depth >= _MAX_PLAIN_DEPTH:
        return -1
    depth += 1
    if t is list:
        n = len(obj)
        total = 1 if n < 24 else _head(n)
        try:
            small = bytes(obj)          # all ints (or bools) in 0..255, as a meter's rows: sized in C
        except (TypeError, ValueError):
            pass
        else:
            return total + n + len(small.translate(None, _ONE_BYTE))    # 24..255 take a second byte
        for v in obj:
            if type(v) is int and 0 <= v < 0x10000:
                total += 1 if v < 24 else 2 if v < 0x100 else 3
            else:
                n = _size(v, depth)
                if n < 0:
                    return -1
                total += n
        return total
    if t is not dict:
        return -1
    n = len(obj)
    total = 1 if n < 24 else _head(n)
    prev = None
    for k, v in obj.items():
        if type(k) is int:
            if k < 0 or k > _U64 or (prev is not None and (type(prev) is not int or k <= prev)):
                return -1
            prev = k
            total += 1 if k < 24 else _head(k)
        elif type(k) is str:
            kb = k.encode()
            kb = (len(kb), kb)
            if prev is not None and (type(prev) is not tuple or kb <= prev):
                return -1
            prev = kb
            total += _head(kb[0]) + kb[0]
        else:
            return -1
        if type(v) is int and 0 <= v < 0x10000:
            total += 1 if v < 24 else 2 if v < 0x100 else 3
        else:
            n = _size(v, depth)
            if n < 0:
                return -1
            total += n
    return total
