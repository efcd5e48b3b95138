"""protocol/cbor.py: RFC 8949 deterministic CBOR, the same bytes as cbor2 on
the gateway, with the board's copy running in the real MicroPython VM."""

import math

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cbor
from hil_tests.support import vm

# Values inside the profile: keys of one map are all unsigned ints or all text.
ints = st.integers(-(2**64), 2**64 - 1)
floats = st.floats(allow_nan=False, width=64)
scalars = st.one_of(ints, floats, st.binary(max_size=40), st.text(max_size=20), st.booleans(), st.none())


def _maps(children):
    return st.one_of(st.dictionaries(st.integers(0, 2**32), children, max_size=5),
                     st.dictionaries(st.text(max_size=8), children, max_size=5))


values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=5), _maps(c)), max_leaves=20)


def to_cbor2(v):
    if isinstance(v, cbor.Tag):
        return cbor2.CBORTag(v.tag, to_cbor2(v.value))
    if isinstance(v, list):
        return [to_cbor2(x) for x in v]
    if isinstance(v, dict):
        return {k: to_cbor2(x) for k, x in v.items()}
    return v


@settings(max_examples=400, deadline=None)
@given(values)
def test_same_bytes_as_cbor2_and_both_decode_each_other(v):
    ours = cbor.encode(v)
    theirs = cbor2.dumps(to_cbor2(v), canonical=True)
    assert ours == theirs
    assert cbor.decode(theirs) == v
    assert cbor2.loads(ours) == v


def test_board_codec_in_the_real_vm_makes_the_same_bytes(tmp_path):
    """Hypothesis values, encoded by cbor2; the VM decodes and re-encodes each.
    Also each value as a literal the VM evaluates and encodes without our decoder."""
    samples = []

    @settings(max_examples=300, deadline=None)
    @given(values)
    def collect(v):
        samples.append(v)

    collect()
    blobs = [cbor2.dumps(to_cbor2(v), canonical=True) for v in samples]
    literal_ok = [v for v in samples if "inf" not in repr(v) and "nan" not in repr(v)]
    stdin = "\n".join(b.hex() for b in blobs) + "\n"
    out = vm.run("import sys\nfrom protocol import cbor\n"
                 "for line in sys.stdin:\n"
                 "    b = bytes.fromhex(line.strip())\n"
                 "    print(cbor.encode(cbor.decode(b)).hex())\n", stdin=stdin)
    assert out.split() == [b.hex() for b in blobs]
    for i in range(0, len(literal_ok), 25):       # a script of 300 literals does not fit the board's heap
        chunk = literal_ok[i:i + 25]
        script = "from protocol import cbor\n" + "".join(f"print(cbor.encode({v!r}).hex())\n" for v in chunk)
        assert vm.run(script).split() == [cbor2.dumps(v, canonical=True).hex() for v in chunk]


# RFC 8949 Appendix A examples inside the profile (no indefinite lengths, no
# bignums, no undefined/unassigned simple values, no mixed-type map keys).
APPENDIX_A = [
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"), (100, "1864"), (1000, "1903e8"),
    (1000000, "1a000f4240"), (1000000000000, "1b000000e8d4a51000"), (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"), (-1, "20"), (-10, "29"), (-100, "3863"), (-1000, "3903e7"),
    (0.0, "f90000"), (-0.0, "f98000"), (1.0, "f93c00"), (1.1, "fb3ff199999999999a"), (1.5, "f93e00"),
    (65504.0, "f97bff"), (100000.0, "fa47c35000"), (3.4028234663852886e38, "fa7f7fffff"), (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"), (0.00006103515625, "f90400"), (-4.0, "f9c400"), (-4.1, "fbc010666666666666"),
    (math.inf, "f97c00"), (-math.inf, "f9fc00"), (False, "f4"), (True, "f5"), (None, "f6"),
    (cbor.Tag(1, 1363896240), "c11a514b67b0"), (cbor.Tag(1, 1363896240.5), "c1fb41d452d9ec200000"),
    (cbor.Tag(23, b"\x01\x02\x03\x04"), "d74401020304"), (cbor.Tag(32, "http://www.example.com"),
                                                       "d82076687474703a2f2f7777772e6578616d706c652e636f6d"),
    (b"", "40"), (b"\x01\x02\x03\x04", "4401020304"), ("", "60"), ("a", "6161"), ("IETF", "6449455446"),
    ('"\\', "62225c"), ("\u00fc", "62c3bc"), ("\u6c34", "63e6b0b4"), ("\U00010151", "64f0908591"),
    ([], "80"), ([1, 2, 3], "83010203"), ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"), ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    ({"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}, "a56161614161626142616361436164614461656145"),
]


@pytest.mark.parametrize("value, hexed", APPENDIX_A, ids=[h for _, h in APPENDIX_A])
def test_rfc8949_appendix_a(value, hexed):
    assert cbor.encode(value).hex() == hexed
    decoded = cbor.decode(bytes.fromhex(hexed))
    assert decoded == value and type(decoded) is type(value)


def test_rfc8949_appendix_a_in_the_vm():
    script = "from protocol import cbor\nimport sys\nfor line in sys.stdin:\n" \
             "    b = bytes.fromhex(line.strip())\n    print(cbor.encode(cbor.decode(b)).hex())\n"
    hexes = [h for _, h in APPENDIX_A]
    assert vm.run(script, stdin="\n".join(hexes) + "\n").split() == hexes


@pytest.mark.parametrize("hexed, reason", [
    ("", "truncated"), ("18", "truncated"), ("1a0000", "truncated"), ("62c3", "truncated"),
    ("0000", "trailing"), ("1817", "non-preferred"), ("190017", "non-preferred"), ("5f4100ff", "indefinite"),
    ("9f01ff", "indefinite"), ("bf6161 01ff".replace(" ", ""), "indefinite"),
    ("a201020102", "duplicate"), ("a203040102", "order"), ("a201026161 03".replace(" ", ""), "more than one type"),
    ("fa3fc00000", "shortest"), ("fb3ff8000000000000", "shortest"), ("f7", "simple"), ("f0", "simple"),
    ("1c", "reserved"), ("62ff00", "UTF-8"), ("9b0000000100000000", "cannot fit"),
    ("5b0000000100000000", "truncated"), ("bb0000000100000000", "cannot fit"), ("1b00000000ffffffff", "non-preferred"),
    ("81" * 20 + "00", "nesting"),
])
def test_strict_decoder_rejects_with_a_reason(hexed, reason):
    with pytest.raises(cbor.CBORError, match=reason):
        cbor.decode(bytes.fromhex(hexed))


def test_encode_into_writes_the_same_bytes_without_allocating_in_the_vm():
    out = vm.run(
        "import micropython\nfrom protocol import cbor\n"
        "buf = bytearray(64)\nblob = b'\\x01\\x02\\x03'\noff = 0\n"
        "micropython.heap_lock()\n"
        "off = cbor.put_head(buf, 0, 4, 4)\n"
        "off = cbor.encode_into(buf, off, 1000)\n"
        "off = cbor.encode_into(buf, off, -24)\n"
        "off = cbor.encode_into(buf, off, 65536)\n"
        "off = cbor.encode_into(buf, off, blob)\n"
        "micropython.heap_unlock()\n"
        "print(bytes(buf[:off]).hex())\n")
    assert out.strip() == cbor2.dumps([1000, -24, 65536, b"\x01\x02\x03"], canonical=True).hex()
