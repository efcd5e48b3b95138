"""gateway.receiver.FastReceiver against the reference protocol.link.Receiver, frame for frame.

Both get the same bytes (two instances, the same keys); each records its on_message and on_refused
calls in one log, in order, and the logs, the counts by reason, .accepted and every device's replay
window must be identical after every step. The inputs: valid messages of every type and role, the
schema generator's wrong and damaged payloads, bit flips, truncations, replays, old and future
counters, wrong direction and version, unknown devices, max_devices, garbage and 0x00 bursts, streams
cut at every byte, oversized frames, non-canonical CBOR sealed with a good tag, and the fuzz corpus."""

import json
import random
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import receiver as R
from gateway.receiver import FastReceiver
from protocol import cbor, framing, link, secure
from protocol import messages as M
from protocol.examples import DEVICE_ID, EXAMPLES, KEY
from tests.protocol import message_gen as gen

OTHER_ID, OTHER_KEY = 0x00002002, bytes(range(16, 32))
STRANGER_ID = 0x00003003                     # no key
KEYS = {DEVICE_ID: KEY, OTHER_ID: OTHER_KEY}
for _i in range(10):
    KEYS[0x00005000 + _i] = bytes([_i + 1]) * 16
CORPUS = Path(__file__).resolve().parent.parent / "protocol" / "corpus" / "found.json"


# -- two receivers, one log each ---------------------------------------------------------------------
class Side:
    """One receiver and what it told its callbacks."""

    def __init__(self, cls, handler, with_refused, **kw):
        self.log = []

        def on_message(d, c, t, m):
            self.log.append(("message", d, c, t, repr(m), _types(m)))      # repr: nan is itself
            return handler(d, c, t, m)

        def on_refused(d, reason, e):
            self.log.append(("refused", d, reason, type(e).__name__, str(e), e.reason))

        self.r = cls(secure.UPLINK, KEYS.get, on_message, on_refused=on_refused if with_refused else None, **kw)

    def call(self, fn, arg):
        """fn(arg); an exception out of a receiver (a bug: the link promises none) is logged, to agree on too."""
        try:
            fn(arg)
        except Exception as e:
            self.log.append(("raised", type(e).__name__, str(e)))

    def state(self):
        peers = {d: (type(op.window).__name__, op.window.top, op.window.bits, op.rejected, op.accepted)
                 for d, op in self.r.openers.items()}
        return self.log, self.r.counts, self.r.accepted, peers


def _types(m):
    """m's shape with its types, so 1 and True, or a list and a tuple, never compare equal."""
    if type(m) is dict:
        return ("dict", [(_types(k), _types(v)) for k, v in m.items()])
    if type(m) is list:
        return ("list", [_types(v) for v in m])
    return type(m).__name__


def accept_all(_d, _c, _t, _m):
    return None


class Pair:
    def __init__(self, handler=accept_all, with_refused=True, **kw):
        self.ref = Side(link.Receiver, handler, with_refused, **kw)
        self.fast = Side(FastReceiver, handler, with_refused, **kw)

    def feed(self, data):
        for side in (self.ref, self.fast):
            side.call(side.r.feed, data)
        self.check()

    def datagram(self, frame):
        for side in (self.ref, self.fast):
            side.call(side.r.datagram, frame)
        self.check()

    def check(self):
        assert self.fast.state() == self.ref.state()

    @property
    def counts(self):
        return self.ref.r.counts

    @property
    def log(self):
        return self.ref.log


def established(**kw):
    """A pair that has verified frame 1000 of DEVICE_ID already (as the gateway after a restart)."""
    p = Pair(**kw)
    p.datagram(seal(ack_payload(), counter=1000))
    return p


# -- frames -------------------------------------------------------------------------------------
def seal(payload, counter, msg_type=M.ACK, device_id=DEVICE_ID, key=None, direction=secure.UPLINK):
    """A secure frame carrying any payload bytes under a good tag."""
    s = secure.Sealer(key or KEYS.get(device_id, KEY), device_id, direction, secure.MemoryCounters(counter))
    out = bytearray(secure.OVERHEAD + len(payload))
    return bytes(out[:s.seal_into(msg_type, payload, len(payload), out)])


def cobs_wire(frame, addr=framing.ADDR_GATEWAY):
    """addr | frame | crc16, COBS-encoded, with its delimiter (any length, unlike framing.encode_into)."""
    raw = bytes([addr]) + frame
    crc = framing.crc16(raw, 0, len(raw))
    raw += bytes((crc >> 8, crc & 0xFF))
    out, block = bytearray(), bytearray()
    for b in raw:
        if b:
            block.append(b)
            if len(block) == 254:
                out += bytes([255]) + block
                block = bytearray()
        else:
            out += bytes([len(block) + 1]) + block
            block = bytearray()
    out += bytes([len(block) + 1]) + block
    return bytes(out) + b"\x00"


def wire(frame, addr=framing.ADDR_GATEWAY):
    buf = bytearray(framing.MAX_WIRE)
    w = bytes(buf[:framing.encode_into(buf, addr, frame, len(frame))])
    assert w == cobs_wire(frame, addr)
    return w


def ack_payload(boot=7, seq=129):
    return cbor.encode(M.ack(boot, seq))


def example_frames(start=2000):
    return [seal(cbor.encode(m), start + i, t) for i, (t, m) in enumerate(EXAMPLES)]


# -- valid messages, every type and role, both paths ----------------------------------------------
def test_every_example_agrees_and_the_fast_path_is_taken():
    p = established()
    for f in example_frames():
        p.datagram(f)
        p.feed(wire(f))                     # the same counter again: a replay
    assert p.ref.r.accepted == 1 + len(EXAMPLES) and p.counts["replay"] == len(EXAMPLES)
    for t, m in EXAMPLES:                   # not a vacuous agreement: cbor2 decoded these, not the reference
        assert R._fast_decode(t, cbor.encode(m)) == m


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(M.NAMES)), st.data()), min_size=1, max_size=6), st.booleans())
def test_valid_messages_of_every_type_and_role(items, serial):
    p = established()
    for i, (t, data) in enumerate(items):
        m = data.draw(gen.valid_message(t))
        payload = cbor2.dumps(m, canonical=True)
        if secure.OVERHEAD + len(payload) > framing.MAX_FRAME:
            continue
        f = seal(payload, 1001 + i, t)
        p.feed(wire(f)) if serial else p.datagram(f)
        accepted = p.log[-1][0] == "message"
        assert accepted == (gen.expected(t, payload) is None)          # the generator's own verdict
        if accepted and R._size(m, 0) > 0:         # no floats, no tags: cbor2 decoded it, not the reference
            assert R._fast_decode(t, payload) == m


@settings(max_examples=400, deadline=None)
@given(st.lists(gen.payloads(), min_size=1, max_size=5), st.booleans())
def test_generated_payloads_valid_wrong_and_damaged(items, serial):
    p = established()
    for i, (t, payload) in enumerate(items):
        f = seal(payload, 1001 + i, t)
        p.feed(wire(f)) if serial else p.datagram(f)


@settings(max_examples=400, deadline=None)
@given(gen.payloads())
def test_fast_decode_is_the_reference_or_defers_to_it(item):
    t, payload = item
    m = R._fast_decode(t, payload)
    if m is not None:
        assert M.decode(t, payload) == m and _types(M.decode(t, payload)) == _types(m)


# -- damage: bit flips, truncation, oversize ---------------------------------------------------------
def test_every_bit_flip_of_a_frame_and_of_its_wire():
    f = seal(cbor.encode(EXAMPLES[1][1]), 1001, M.READINGS)
    w = wire(f)
    p = established()
    for i in range(len(f) * 8):
        bad = bytearray(f)
        bad[i // 8] ^= 1 << (i % 8)
        p.datagram(bytes(bad))
    for i in range((len(w) - 1) * 8):
        bad = bytearray(w)
        bad[i // 8] ^= 1 << (i % 8)
        p.feed(bytes(bad) + b"\x00")        # a flip to 0x00 splits the run: the delimiter ends the rest
    assert p.counts["auth"] and p.counts["version"] and p.counts["crc"] and p.counts["noise"]
    p.datagram(f)
    assert p.log[-1][0] == "message"


def test_every_truncation_and_oversized_frames():
    f = seal(cbor.encode(EXAMPLES[5][1]), 1001, M.HEALTH)
    w = wire(f)
    p = established()
    for n in range(len(f) + 1):
        p.datagram(f[:n])
    for n in range(len(w)):
        p.feed(w[:n] + b"\x00")
    for n in (251, 252, 300, 1000):
        p.datagram(f + bytes(n - len(f)))
    p.feed(b"\x07" * 257 + b"\x00" + b"\x07" * 256 + b"\x00" + b"\x07" * 3000 + b"\x00")
    assert p.counts["too_long"] == 6 and p.counts["short"] == secure.OVERHEAD


def test_serial_frames_just_over_max_frame_are_treated_alike():
    """The stream reader keeps MAX_WIRE encoded bytes, so a sealed 251 or 252-byte frame can come
    through a UART where a datagram that long is too_long: both receivers must say the same."""
    p = established()
    for extra in (0, 1, 2, 3):
        payload = cbor.encode(M.ack(7, 1)) + bytes(231 - 5 + extra)     # trailing bytes: bad_payload
        f = seal(payload, 1100 + extra)
        p.feed(cobs_wire(f))
        p.datagram(f)
    assert p.counts["too_long"] >= 4


# -- the replay window and the header ------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(-80, 80), st.sampled_from([1 << 24, (1 << 24) + 1, 1 << 25, -(1 << 30)])),
                max_size=30), st.integers(0, 2**32 - 1))
def test_replays_old_and_future_counters(steps, start):
    p = Pair()
    counter = start
    for step in steps:
        counter = min(max(counter + step, 0), secure.COUNTER_MAX)
        f = seal(ack_payload(), counter)
        p.datagram(f) if step % 2 else p.feed(wire(f))


def test_a_forged_frame_does_not_move_the_window():
    p = established()
    f = bytearray(seal(ack_payload(), 5000))
    f[-1] ^= 1
    p.datagram(bytes(f))
    p.datagram(seal(ack_payload(), 1001))           # still within the window: the forgery moved nothing
    assert p.counts["auth"] == 1 and p.log[-1][2] == 1001


def test_wrong_version_direction_and_unknown_devices():
    p = established()
    f = bytearray(seal(ack_payload(), 1001))
    f[0] = 2
    p.datagram(bytes(f))
    f[0] = 1
    f[1] |= 0x80                                   # only bit 0 is the direction
    p.datagram(bytes(f))
    p.datagram(seal(ack_payload(), 1002, direction=secure.DOWNLINK))
    p.datagram(seal(ack_payload(), 1, device_id=STRANGER_ID, key=KEY))
    p.feed(wire(seal(ack_payload(), 1, device_id=OTHER_ID)))
    p.feed(wire(seal(ack_payload(), 2, device_id=OTHER_ID, key=KEY)))
    assert [p.counts[r] for r in ("version", "direction", "unknown_device", "auth")] == [1, 1, 1, 2]


def test_max_devices_and_saved_windows():
    saved = {0x00005001: (900, 5), 0x00005002: (-1, 0)}
    asked = []

    def window_for(d):
        asked.append(d)
        w = secure.ReplayWindow(saved.get(d, (-1, 0))[0])
        w.bits = saved.get(d, (-1, 0))[1]
        return w

    p = Pair(max_devices=3, window_for=window_for)
    for round_ in range(3):
        for i in range(6):
            d = 0x00005000 + i
            p.datagram(seal(ack_payload(), 900 + round_ * 10 + (i % 2), device_id=d))
    p.datagram(seal(ack_payload(), 1, device_id=STRANGER_ID, key=KEY))
    assert p.counts["unknown_device"] == 10 and len(p.fast.r.openers) == 3
    assert asked == [0x00005000, 0x00005000, 0x00005001, 0x00005001, 0x00005002, 0x00005002]   # each, once


# -- streams: garbage, bursts, any split ------------------------------------------------------------
def a_stream(rnd, frames):
    """Frames with garbage, 0x00 bursts, foreign addresses and broadcast between them."""
    out = b""
    for f in frames:
        kind = rnd.randrange(6)
        if kind == 0:
            out += bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 40)))
        elif kind == 1:
            out += b"\x00" * rnd.randrange(1, 20)
        elif kind == 2:
            out += wire(f, addr=rnd.choice([3, 247]))                      # not for us (but accept_any)
        elif kind == 3:
            out += wire(f, addr=framing.ADDR_BROADCAST)
        out += wire(f)
    return out


def split_feed(p, stream, cuts):
    prev = 0
    for c in sorted(cuts) + [len(stream)]:
        p.feed(stream[prev:c])
        prev = c


def test_a_stream_split_at_every_byte():
    rnd = random.Random(1)
    stream = a_stream(rnd, example_frames(1001)[:4]) + b"\x00\x00garbage"
    for cut in range(len(stream) + 1):
        for accept_any in (False, True):
            p = established(accept_any_addr=accept_any)
            split_feed(p, stream, [cut])
            p.feed(b"\x00")


def test_a_stream_fed_one_byte_at_a_time():
    rnd = random.Random(2)
    stream = a_stream(rnd, example_frames(1001))
    p = established()
    split_feed(p, stream, list(range(len(stream))))
    assert p.ref.r.accepted > 1


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 10**6), max_size=12), st.booleans())
def test_random_streams_random_cuts(seed, cuts, accept_any):
    rnd = random.Random(seed)
    frames = example_frames(1001 + rnd.randrange(3))
    rnd.shuffle(frames)
    stream = a_stream(rnd, frames)
    if rnd.random() < 0.5:                                   # plus hostile input, as the fuzz campaign makes
        stream = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(400))) + stream
    p = established(accept_any_addr=accept_any)
    split_feed(p, stream, [c % (len(stream) + 1) for c in cuts])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_random_bytes_in_any_chunks(data, cuts):
    p = established(accept_any_addr=True)
    split_feed(p, data, [c % (len(data) + 1) for c in cuts])
    p.datagram(data[:300])


def test_feed_with_a_length():
    w = wire(seal(ack_payload(), 1001))
    p = established()
    for r in (p.ref.r, p.fast.r):
        r.feed(bytearray(w) + b"junk", len(w))
        r.feed(memoryview(w), 5)
        r.feed(w[5:])                               # the same frame again: a replay
    p.check()
    assert p.ref.r.accepted == 2 and p.counts["replay"] == 1


# -- CBOR the profile refuses, under a good tag ----------------------------------------------------
# ack {0: 7, 1: x} with x encoded as shown: (hex of x or of the whole payload, the reference accepts it)
NON_CANONICAL = [
    ("a2 00 07 01 18 05", False),                      # a long-form int
    ("a2 00 07 01 19 0005", False),
    ("a2 00 07 01 1a 00000005", False),
    ("a2 00 07 01 1b 0000000000000005", False),
    ("a3 00 07 01 05 02 1b 0000000100000000", True),   # the same head where it is the shortest (key 2: unknown)
    ("a2 01 05 00 07", False),                         # unsorted keys
    ("b8 02 00 07 01 05", False),                      # a long-form map head
    ("bf 00 07 01 05 ff", False),                      # indefinite map
    ("a3 00 07 01 05 01 06", False),                   # a duplicate key
    ("a3 00 07 01 05 01 05", False),
    ("a2 00 07 01 05 00", False),                      # a trailing byte
    ("a2 00 07 01 f9 4500", False),                    # floats
    ("a2 00 07 01 fb 4014000000000000", False),
    ("a2 00 07 01 c2 41 05", False),                   # a bignum, shorter than its int would be ...
    ("a2 00 07 01 c2 43 010000", False),               # ... as long as the int's shortest form
    ("a2 00 07 01 1b 000000ff00000000", False),        # and longer than it, with the gap paid elsewhere:
    ("a2 00 07 01 c2 45 ff00000000", False),           # tag 2 of 5 bytes = 7 < 9
    ("a2 00 07 01 d8 1c 05", False),                   # shareable
    ("a2 00 07 01 d9 d9f7 05", False),                 # self-describe
    ("d9 d9f7 a2 00 07 01 05", False),
    ("d9 0100 a2 00 07 01 05", False),                 # stringref namespace
    ("a2 00 07 01 c1 05", False),                      # an epoch datetime
    ("a2 00 07 01 c0 74 323031332d30332d32315432303a30343a30305a", False),
    ("a2 00 07 01 f7", False),                         # undefined
    ("a2 00 07 01 f8 20", False),                      # a simple value
    ("a2 00 07 01 f4", False),                         # false where a uint goes: the rule refuses it
    ("a3 00 07 01 05 61 61 00", False),                # keys of two types
    ("a3 00 07 01 05 20 00", False),                   # a negative key beside uints
    ("a2 00 07 01 9f 05 ff", False),                   # indefinite array
    ("a3 00 07 01 05 02 7f 61 61 ff", False),          # indefinite text
    ("a3 00 07 01 05 02 5f 41 61 ff", False),          # indefinite bytes
    ("a3 00 07 01 05 02 62 c328", False),              # text that is not UTF-8
    ("a3 00 07 01 05 02 62 eda080", False),            # a UTF-16 surrogate in UTF-8
    ("a3 00 07 01 05 02 a2 62 6161 00 61 62 00", False),   # text keys: "aa" before "b" (not bytewise)
    ("a3 00 07 01 05 02 a2 61 62 00 62 6161 00", True),    # "b" before "aa": the profile's order
    ("a3 00 07 01 05 02 a2 61 61 00 61 61 00", False),     # duplicate text keys
    ("a3 00 07 01 05 02 a2 20 00 21 00", False),           # negative keys: keys are uints or text
    ("a3 00 07 01 05 02 a2 21 00 20 00", False),           # -2 before -1: ascending, but not bytewise
    ("a3 20 00 00 07 01 05", False),                       # -1, 0, 1: ascending, but of two major types
    ("a3 00 07 01 05 02 a2 f4 00 f5 00", False),           # false and true as keys
    ("a3 00 07 01 05 02 a1 41 61 00", False),              # a byte-string key
    ("a3 00 07 01 05 02 a1 c1 00 00", False),              # a tagged key (refused, no longer a TypeError)
    ("a3 00 07 01 05 02 a1 80 00", False),                 # an array key
    ("a3 00 07 01 05 02 3b ffffffffffffffff", True),       # -2**64
    ("a3 00 07 01 05 02 c3 49 010000000000000000", True),  # a big negative as a tag
    ("a3 00 07 01 05 02 " + "81" * 15 + "00", True),       # deep, but within 16
    ("a3 00 07 01 05 02 " + "81" * 16 + "00", False),      # too deep
    ("a3 00 07 01 05 02 " + "81" * 14 + "a1 00 00", True),
    ("a3 00 07 01 05 02 " + "81" * 15 + "a1 00 00", False),
]


def test_non_canonical_payloads_under_a_good_tag():
    p = established()
    for i, (hexed, accepted) in enumerate(NON_CANONICAL):
        payload = bytes.fromhex(hexed.replace(" ", ""))
        before = p.ref.r.accepted
        p.datagram(seal(payload, 1001 + i))
        if accepted == "raises":            # (unhashable cbor.Tag as a map key: out of M.decode, out of the link)
            assert p.log[-1][:2] == ("raised", "TypeError")
            continue
        assert (p.ref.r.accepted > before) == accepted, hexed      # the reference really says so
        fast = R._fast_decode(M.ACK, payload)
        if fast is not None:
            assert accepted and _types(fast) == _types(M.decode(M.ACK, payload))
    assert p.counts["bad_payload"] >= 20 and p.counts["invalid_ack"] >= 5


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_mutated_payloads_under_a_good_tag(example, data):
    """Byte-level edits of a valid payload: mostly CBOR of some sort, whatever the profile says of it."""
    t, m = example
    payload = bytearray(cbor.encode(m))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(payload)))
        how = data.draw(st.integers(0, 2))
        b = data.draw(st.integers(0, 255))
        if how == 0 and i < len(payload):
            payload[i] = b
        elif how == 1:
            payload.insert(i, b)
        elif i < len(payload):
            del payload[i]
    payload = bytes(payload[:231])
    p = established()
    p.datagram(seal(payload, 1001, t))
    p.feed(wire(seal(payload, 1002, t)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(EXAMPLES), st.randoms(use_true_random=False))
def test_other_encoders_of_the_same_message(example, rnd):
    """cbor2's own encodings (keys in insertion order, shuffled; value sharing; string references)."""
    t, m = example
    items = list(m.items())
    rnd.shuffle(items)
    p = established()
    for i, kw in enumerate(({}, {"canonical": True}, {"value_sharing": True}, {"string_referencing": True})):
        payload = cbor2.dumps(dict(items), **kw)
        if len(payload) <= 231:
            p.datagram(seal(payload, 1001 + i, t))


def test_no_other_cbor2_tag_decodes_to_a_plain_value():
    """The length check is sound only if every tag cbor2 turns into an int, text, bytes, bool, None,
    list or dict is refused by _PLAIN_TAGS: any other comes back as an object _size refuses."""
    contents = [b"\x05", b"\x43\x01\x00\x00", b"\x61a", b"\x82\x01\x02", b"\xa1\x01\x02", b"\x40", b"\xf6"]
    for tag in list(range(0, 70000)) + [2**32 - 1, 2**32, 2**64 - 1]:
        head = bytearray(9)
        head = bytes(head[:cbor.put_head(head, 0, 6, tag)])
        for c in contents:
            try:
                obj = cbor2.loads(head + c, semantic_decoders=R._PLAIN_TAGS)
            except Exception:
                continue
            assert R._size(obj, 0) < 0, (tag, c.hex(), obj)


# -- handlers ------------------------------------------------------------------------------------------
def test_handler_errors_and_refusals_and_no_on_refused():
    def handler(_d, c, _t, _m):
        if c % 3 == 0:
            raise RuntimeError("a bug")
        return "invalid_readings" if c % 3 == 1 else None

    for with_refused in (True, False):
        p = established(handler=handler, with_refused=with_refused)
        for i, f in enumerate(example_frames(1001)):
            p.datagram(f)
        p.datagram(seal(b"\xa0", 1100))              # bad_payload: on_refused (when given)
        p.datagram(seal(ack_payload(), 1101, 42))    # unknown_type
        assert p.counts["handler_error"] and p.counts["unknown_type"] == 1


# -- the fuzz corpus -----------------------------------------------------------------------------------
def test_the_fuzz_corpus_through_both():
    entries = json.loads(CORPUS.read_text())
    p = established()
    q = established()
    for i, e in enumerate(entries):
        payload = bytes.fromhex(e["payload"])[:231]
        f = seal(payload, 1001 + i, e["type"])
        p.datagram(f)
        q.feed(wire(f))
        p.datagram(payload)                          # the same bytes as a (broken) frame
        q.feed(payload + b"\x00")
    assert sum(p.counts.values()) >= len(entries)


@pytest.mark.parametrize("key", [bytes(24), bytes(32), bytes(15)])
def test_a_key_of_the_wrong_length_fails_alike(key):
    """protocol.ccm.Ccm takes AES-128 keys only; AESCCM would take 24 or 32 bytes: both must raise."""
    f = seal(ack_payload(), 1)
    errors = []
    for cls in (link.Receiver, FastReceiver):
        r = cls(secure.UPLINK, lambda d: key, accept_all)
        with pytest.raises(ValueError) as e:
            r.datagram(f)
        errors.append(type(e.value))
    assert errors[0] is errors[1]


# -- exceptions out of the link (callers' bugs) ----------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_an_exception_out_of_a_callback_leaves_both_readers_alike(seed):
    """framing.Reader keeps its half-decoded buffer and drops the rest of the chunk when a callback
    raises; the next frames then meet that buffer. FastReceiver must do the very same."""
    rnd = random.Random(seed)

    def handler(_d, c, _t, _m):
        if c % 5 == 0:
            return "not a reason"                       # a KeyError in both
        return None

    def on_refused_raising(*_a):
        raise RuntimeError("on_refused broke")

    p = established(handler=handler)
    if seed % 2:
        for side in (p.ref, p.fast):
            side.r.on_refused = on_refused_raising
    frames = [seal(ack_payload(), 1005), seal(b"\xa0", 1006)] + example_frames(1007)   # 1005: the handler raises
    stream = a_stream(rnd, frames)
    split_feed(p, stream, [rnd.randrange(len(stream) + 1) for _ in range(rnd.randrange(6))])
    p.feed(a_stream(rnd, example_frames(1100)))
    assert any(e[0] == "raised" for e in p.log)


def test_after_an_exception_the_stale_buffer_counts_to_the_byte():
    def handler(_d, c, _t, _m):
        if c == 1001:
            return "not a reason"                          # a KeyError out of feed() in both readers
        return None

    w = wire(seal(ack_payload(), 1001))
    n = len(w) - 1
    reasons = set()
    for extra in range(framing.MAX_WIRE - n - 4, framing.MAX_WIRE - n + 3):
        p = established(handler=handler)
        p.feed(w + b"\x07" * extra)                        # raises at the delimiter, drops the rest
        p.feed(b"\x07" * extra + b"\x00")
        p.feed(wire(seal(ack_payload(), 1002)))
        reasons |= {r for r, k in p.counts.items() if k}
    assert {"too_long", "noise"} <= reasons


# -- the framing layer alone: full COBS blocks (code 0xFF), which frames with a header rarely make -----------
@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=253), st.binary(min_size=240, max_size=253).map(
    lambda b: bytes(x or 1 for x in b))), min_size=1, max_size=4), st.integers(0, 2**32 - 1))
def test_stream_reader_delivers_what_framing_reader_delivers(frames, seed):
    rnd = random.Random(seed)
    stream = b"".join(cobs_wire(f[1:], addr=f[0]) if rnd.random() < 0.8 else f + b"\x00" for f in frames)
    if rnd.random() < 0.3:
        i = rnd.randrange(len(stream))
        stream = stream[:i] + bytes([stream[i] ^ (1 << rnd.randrange(8))]) + stream[i + 1:]
    accept_any = rnd.random() < 0.5
    cuts = sorted(rnd.randrange(len(stream) + 1) for _ in range(3)) + [len(stream)]
    got, readers = [], []
    for cls in (framing.Reader, R.StreamReader):
        out = []
        r = cls(lambda a, buf, n, out=out: out.append((a, bytes(buf[:n]))), accept_any=accept_any)
        prev = 0
        for c in cuts:
            r.feed(stream[prev:c])
            prev = c
        got.append(out)
        readers.append(r)
    assert got[1] == got[0]
    assert readers[1].dropped == readers[0].dropped and readers[1].frames == readers[0].frames
