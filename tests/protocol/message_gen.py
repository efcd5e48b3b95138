"""Messages for property tests, built from the schema: valid ones of every type, the same with one
field made wrong (wrong type, extreme integers, floats, NaN, text where ints go, too long or empty
text, wrong row shapes), whole-message faults (a key missing, text or negative keys beside the
integer ones, deep nesting, long arrays, not a map), byte-level damage and unknown types.

The verdict each should get comes from `expected()`: the profile decoder (protocol/cbor.py, tested
on its own against cbor2) and then `reference()`, the message rules written out again by hand from
schema.cddl and SPEC.md (not from protocol/messages.py RULES, which the generator only reads for
the keys and kinds it has to make), so the tests compare two statements of the schema."""

import math
import struct

import cbor2
from hypothesis import strategies as st

from protocol import cbor, roles, secure
from protocol import messages as M

U32 = 2**32 - 1
U64 = 2**64 - 1
MAX_PAYLOAD = 250 - secure.OVERHEAD
DOWNLINK_TYPES = (M.ACK, M.TIME_SYNC, M.CONFIG_PUSH, M.COMMAND)
UPLINK_TYPES = (M.HELLO, M.READINGS, M.ALARM, M.HEALTH, M.COMMAND_RESULT)
DOSER_WIDTH = len(roles.spec("doser").FIELDS)
WIDTH = {code: len(roles.spec(name).FIELDS) for code, name in enumerate(roles.ROLES) if code}   # 0: bare uints


# -- the reference: schema.cddl read again, one message at a time ------------------------------
def _uint(v, hi=U64, lo=0):
    return type(v) is int and lo <= v <= hi


def _int(v, lo=-(2**64), hi=U64):
    return type(v) is int and lo <= v <= hi


def _text(v, lo, hi):
    return type(v) is str and lo <= len(v.encode()) <= hi


def _text_map(v):
    return type(v) is dict and all(type(k) is str for k in v)


def _uint_map(v):
    return type(v) is dict and all(k in v and _uint(v[k]) for k in (0, 1, 2))


def _rows_fit(m):
    rows, role = m[6], m[4]
    if type(rows) is not list:
        return False
    for row in rows:
        if role == 0 and not _uint(row):
            return False
        if role in WIDTH and not (type(row) is list and len(row) == WIDTH[role] and all(_uint(c) for c in row)):
            return False
    n = len(rows)
    return n == 0 or (m[1] + n * m.get(10, 1) - 1 <= U32 and m[2] + (n - 1) * m[3] <= U32)


def _units(u):
    return (type(u) is dict and 0 in u and 1 in u and _text(u[0], 1, 8) and _int(u[1], -9, 9)
            and (2 not in u or _uint(u[2])))


_REQUIRED = {M.HELLO: 7, M.READINGS: 7, M.ALARM: 5, M.HEALTH: 9, M.ACK: 2, M.TIME_SYNC: 2, M.CONFIG_PUSH: 2,
             M.COMMAND: 3, M.COMMAND_RESULT: 2}
_OPTIONAL = {M.HELLO: {7: lambda v: _uint(v, U32), 8: lambda v: _uint(v, 254)},
             M.READINGS: {7: _uint, 8: lambda v: _uint(v, U32), 9: lambda v: _uint(v, 1),
                          10: lambda v: _uint(v, lo=2)},
             M.ALARM: {5: _int}, M.HEALTH: {9: _uint_map}, M.COMMAND_RESULT: {2: lambda v: _text(v, 0, 250)}}


def _required_ok(t, m):
    if t == M.HELLO:
        return (_uint(m[0], U32) and _text(m[1], 1, 32) and _text(m[2], 1, 32) and _uint(m[3], 2)
                and type(m[4]) is bytes and len(m[4]) == 8 and _uint(m[5], 1) and _uint(m[6], 6))
    if t == M.READINGS:
        return (_uint(m[0], U32) and _uint(m[1], U32) and _uint(m[2], U32) and _uint(m[3], 86400)
                and _uint(m[4], 2) and _units(m[5]))
    if t == M.ALARM:
        return _uint(m[0], U32) and _uint(m[1], U32) and _uint(m[2], U32) and _uint(m[3]) and type(m[4]) is bool
    if t == M.HEALTH:
        return (_uint(m[0], U32) and _uint(m[1], U32) and _uint(m[2]) and _uint(m[3]) and _uint(m[4])
                and _uint(m[5], 6) and _uint_map(m[6]) and _uint(m[7], 1000) and _uint(m[8]))
    if t == M.ACK:
        return _uint(m[0], U32) and _uint(m[1], U32)
    if t == M.TIME_SYNC:
        return _uint(m[0], U32 * 1000 + 999) and _uint(m[1], U32)
    if t == M.CONFIG_PUSH:
        return _uint(m[0]) and _text_map(m[1])
    if t == M.COMMAND:
        return _uint(m[0]) and _text(m[1], 1, 32) and _text_map(m[2])
    return _uint(m[0]) and type(m[1]) is bool


def reference(t, m):
    """None when the decoded message m of type t is valid, else the reason a receiver counts."""
    if t not in _REQUIRED:
        return "unknown_type"
    if type(m) is not dict or any(k not in m for k in range(_REQUIRED[t])):
        return "bad_payload"
    ok = _required_ok(t, m) and all(check(m[k]) for k, check in _OPTIONAL.get(t, {}).items() if k in m)
    if ok and t == M.READINGS:
        ok = _rows_fit(m)
    return None if ok else "invalid_" + M.NAMES[t]


def _beyond_single(v):
    if type(v) is float:
        return math.isfinite(v) and cbor._double_fits(struct.pack(">d", v)) < 0
    if isinstance(v, cbor.Tag):
        return _beyond_single(v.value)
    if type(v) is list:
        return any(_beyond_single(x) for x in v)
    if type(v) is dict:
        return any(_beyond_single(k) or _beyond_single(x) for k, x in v.items())
    return False


def expected(t, payload, single_floats=False):
    """The reason a receiver counts for payload under msg_type t, or None: accepted. single_floats:
    a board's decoder, which refuses a finite double beyond the singles' range (SPEC.md 4)."""
    if t not in _REQUIRED:
        return "unknown_type"
    try:
        m = cbor.decode(payload)
    except cbor.CBORError:
        return "bad_payload"
    if single_floats and _beyond_single(m):
        return "bad_payload"
    return reference(t, m)


# -- valid values, from the kinds of messages.RULES --------------------------------------------
def _uints(lo, hi):
    hi = U64 if hi is None else hi
    return st.one_of(st.sampled_from(sorted({lo, hi, min(lo + 1, hi)})), st.integers(lo, min(hi, 100000)),
                     st.integers(lo, hi))


def _texts(lo, hi):
    return st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=lo, max_size=hi).filter(
        lambda s: lo <= len(s.encode()) <= hi)


_floats = st.sampled_from([0.0, -0.0, 0.1, 1.5, 65504.0, 3.4e38, 1e300, -1e-300, math.inf, -math.inf, math.nan])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), U64), _floats, st.text(max_size=6),
                     st.binary(max_size=6), st.builds(lambda v: cbor2.CBORTag(1, v), st.integers(0, U32)))
_any = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                  st.dictionaries(st.text(max_size=4), c, max_size=3)),
                    max_leaves=6)
_text_maps = st.dictionaries(st.text(max_size=10), _any, max_size=4)


def _valid_value(kind, lo, hi):
    if kind == "u":
        return _uints(lo, hi)
    if kind == "i":
        return st.integers(-(2**64) if lo is None else lo, U64 if hi is None else hi)
    if kind == "t":
        return _texts(lo, hi)
    if kind == "y":
        return st.binary(min_size=lo, max_size=hi)
    if kind == "b":
        return st.booleans()
    if kind == "m":
        return _valid_map(lo)
    return _text_maps


@st.composite
def _valid_map(draw, rules):
    m = {}
    for key, _name, kind, lo, hi, required in rules:
        if kind == "r":
            continue
        if required or draw(st.booleans()):
            m[key] = draw(_valid_value(kind, lo, hi))
    return m


@st.composite
def _rows(draw, role):
    if role == 0:
        return draw(st.lists(_uints(0, None), max_size=20))
    return draw(st.lists(st.lists(st.integers(0, 65535), min_size=WIDTH[role], max_size=WIDTH[role]),
                         max_size=3))


@st.composite
def valid_message(draw, t):
    """A message of type t that schema.cddl and SPEC.md allow (a batch's seqs within a u32)."""
    m = draw(_valid_map(M.RULES[t]))
    if t == M.READINGS:
        m[6] = draw(_rows(m[4]))
        n = max(len(m[6]), 1)
        m[1] = min(m[1], U32 + 1 - n * m.get(10, 1)) if m.get(10, 1) * n <= U32 + 1 else m[1]
        m[2] = min(m[2], U32 - (n - 1) * m[3])
    return m


# -- faults --------------------------------------------------------------------------------------
_NOT_NUMBERS = [1.0, math.nan, -math.inf, "1", "", b"\x01", True, False, None, [1], {0: 1}, cbor2.CBORTag(2, b"\x01")]


def hostile(kind, lo, hi):
    """Values a key of this kind must refuse."""
    if kind == "u":
        out = [-1, -(2**64), 2**64, 2**70] + _NOT_NUMBERS + ([lo - 1] if lo > 0 else [])
        return out + ([hi + 1, 2**32] if hi is not None and hi < 2**32 else [hi + 1] if hi is not None else [])
    if kind == "i":
        out = [2**64, -(2**64) - 1, 0.5, math.nan, "0", True, None, [0]]
        return out + ([lo - 1, hi + 1, -(2**31), 2**31] if lo is not None else [])
    if kind == "t":
        out = [b"text", 5, None, True, ["a"], {"a": 1}, "x" * (hi + 1), "\u00e9" * (hi // 2 + 1)]
        return out + ([""] if lo > 0 else [])
    if kind == "y":
        return [b"\x00" * (lo - 1), b"\x00" * (hi + 1), "12345678", 0, None, [0] * lo]
    if kind == "b":
        return [0, 1, None, "true", 1.0]
    if kind == "m":
        return [5, [], "map", None, {}, {0: "x" * 9, 1: 1, 2: 1}, {"0": 1, "1": 1, "2": 1}, {0: -1, 1: 1.5, 2: True}]
    if kind == "s":
        return [5, [], "map", None, {1: 2}, b"map"]
    return [5, None, "rows", {}, [1.5], [-1], ["1"], [[1.5] * DOSER_WIDTH], [[1] * (DOSER_WIDTH - 1)],
            [[0] * (DOSER_WIDTH + 1)], [[1, 2, 3]], [True], [2**64], [[[[1]]]], [0] * 190, [[0] * 17]]


def _deep(n):
    v = 0
    for _ in range(n):
        v = [v]
    return v


@st.composite
def one_field_wrong(draw, t):
    """A valid message with one key (or one key of a map inside it) holding a value its rule refuses."""
    m = draw(valid_message(t))
    rules = M.RULES[t]
    key, _name, kind, lo, hi, _req = draw(st.sampled_from(rules))
    if kind == "m" and draw(st.booleans()):
        sub = dict(m.get(key) or draw(_valid_map(lo)))
        skey, _sn, skind, slo, shi, _sr = draw(st.sampled_from(lo))
        sub[skey] = draw(st.sampled_from(hostile(skind, slo, shi)))
        m[key] = sub
    else:
        m[key] = draw(st.sampled_from(hostile(kind, lo, hi)))
    return m


@st.composite
def whole_message_wrong(draw, t):
    """Faults of the message as a whole (most are the decoder's: a payload that is not this message)."""
    m = draw(valid_message(t))
    fault = draw(st.integers(0, 8))
    if fault == 0:
        del m[draw(st.sampled_from([k for k, *_r, req in M.RULES[t] if req]))]
    elif fault == 1:
        m[str(draw(st.sampled_from(sorted(m))))] = 0            # "1" beside 1: keys of two types
    elif fault == 2:
        m = {str(k): v for k, v in m.items()}                 # every key text
    elif fault == 3:
        m[-1] = 0                                             # a negative key beside the unsigned ones
    elif fault == 4:
        m[draw(st.integers(11, U64))] = draw(st.one_of(_any, st.just(_deep(draw(st.integers(14, 20))))))
    elif fault == 5:
        m = draw(st.sampled_from([[], [0, 1], 0, "hello", None, b"\xa0", 1.5, cbor2.CBORTag(24, b"\xa0")]))
    elif fault == 6:
        m[draw(st.integers(11, 40))] = [0] * draw(st.integers(100, 210))      # a long array nobody knows
    elif fault == 7:
        for k in [k for k, *_r, req in M.RULES[t] if not req]:
            m.pop(k, None)                                    # every optional key left out: still valid
    else:
        m[draw(st.integers(11, 2**32))] = draw(_any)          # an unknown key: ignored (a compatible change)
    return m


def _fit(payload):
    """A payload that no frame can carry is cut to the largest that one can: byte-level damage."""
    return payload if len(payload) <= MAX_PAYLOAD else payload[:MAX_PAYLOAD]


@st.composite
def payloads(draw, types=tuple(M.NAMES)):
    """(msg_type, payload bytes): valid, one field wrong, the whole message wrong, damaged bytes, or a
    type nobody knows; at most what one frame carries."""
    t = draw(st.sampled_from(types))
    how = draw(st.integers(0, 19))
    if how < 5:
        m = draw(valid_message(t))
    elif how < 13:
        m = draw(one_field_wrong(t))
    elif how < 17:
        m = draw(whole_message_wrong(t))
    else:
        m = draw(valid_message(t))
    payload = _fit(cbor2.dumps(m, canonical=True))
    if how == 17:                                             # damaged bytes
        i = draw(st.integers(0, len(payload) - 1))
        payload = draw(st.sampled_from([payload[:i], payload + b"\x00", payload[:i] + bytes([payload[i] ^ 0x20])
                                        + payload[i + 1:], b"\xbf" + payload[1:], b""]))
    elif how == 18:
        t = draw(st.sampled_from([0, 10, 42, 255]))
    return t, _fit(payload)


def good_readings(boot, seq, rows=(5, 7)):
    """A meter batch every receiver takes: the frame a board sends next."""
    return M.readings(boot, seq, 900, 900, 0, M.units("L", 0, 1000), list(rows), 100)
