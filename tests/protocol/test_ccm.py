"""protocol/ccm.py: AES-CCM-16-64-128 from ECB + CBC, identical to the
gateway's cryptography AESCCM, with the board's copy in the real VM."""

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ccm import AuthError, Ccm
from hil_tests.support import vm

# RFC 3610 section 8, Packet Vector #1 (M=8, L=2: this profile exactly).
RFC3610_1 = dict(key=bytes(range(0xC0, 0xD0)), nonce=bytes.fromhex("00000003020100A0A1A2A3A4A5"),
                 aad=bytes(range(8)), msg=bytes(range(8, 0x1F)),
                 sealed=bytes.fromhex("588C979A61C663D2F066D0C2C0F989806D5F6B61DAC38417E8D12CFDF926E0"))

# Packet Vectors #2 and #3 (same key, 8-byte header; 24- and 25-byte payloads).
RFC3610_MORE = [
    (bytes.fromhex("00000004030201A0A1A2A3A4A5"), bytes(range(8)), bytes(range(8, 0x20)),
     bytes.fromhex("72C91A36E135F8CF291CA894085C87E3CC15C439C9E43A3BA091D56E10400916")),
    (bytes.fromhex("00000005040302A0A1A2A3A4A5"), bytes(range(8)), bytes(range(8, 0x21)),
     bytes.fromhex("51B1E5F44A197D1DA46B0F8E2D282AE871E838BB64DA8596574ADAA76FBD9FB0C5")),
]

keys, nonces = st.binary(min_size=16, max_size=16), st.binary(min_size=13, max_size=13)
aads, msgs = st.binary(max_size=32), st.binary(max_size=250)


def test_rfc3610_packet_vector_1():
    v = RFC3610_1
    assert Ccm(v["key"]).seal(v["nonce"], v["aad"], v["msg"]) == v["sealed"]
    assert Ccm(v["key"]).open(v["nonce"], v["aad"], v["sealed"]) == v["msg"]


def test_rfc3610_packet_vectors_2_and_3_on_both_sides():
    key = RFC3610_1["key"]
    for nonce, aad, msg, sealed in RFC3610_MORE:
        assert Ccm(key).seal(nonce, aad, msg) == sealed
    script = "from protocol.ccm import Ccm\n" + "".join(
        f"print(Ccm({key!r}).seal({n!r}, {a!r}, {m!r}).hex())\n" for n, a, m, _s in RFC3610_MORE)
    assert vm.run(script).split() == [s.hex() for *_x, s in RFC3610_MORE]


@settings(max_examples=300, deadline=None)
@given(keys, nonces, aads, msgs)
def test_same_ciphertext_as_cryptography_aesccm(key, nonce, aad, msg):
    ours = Ccm(key).seal(nonce, aad, msg)
    assert ours == AESCCM(key, tag_length=8).encrypt(nonce, msg, aad)
    assert Ccm(key).open(nonce, aad, ours) == msg


@settings(max_examples=100, deadline=None)
@given(keys, nonces, aads, msgs.filter(len), st.data())
def test_any_flipped_bit_is_refused(key, nonce, aad, msg, data):
    sealed = bytearray(Ccm(key).seal(nonce, aad, msg))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthError):
        Ccm(key).open(nonce, aad, bytes(sealed))


def test_board_ccm_in_the_real_vm_matches_aesccm():
    cases = []

    @settings(max_examples=150, deadline=None)
    @given(keys, nonces, aads, msgs)
    def collect(key, nonce, aad, msg):
        cases.append((key, nonce, aad, msg))

    collect()
    stdin = "".join(" ".join(x.hex() or "-" for x in c) + "\n" for c in cases)
    out = vm.run("import sys\nfrom protocol.ccm import Ccm\n"
                 "h = lambda s: b'' if s == '-' else bytes.fromhex(s)\n"
                 "for line in sys.stdin:\n"
                 "    k, n, a, m = (h(x) for x in line.split())\n"
                 "    s = Ccm(k).seal(n, a, m)\n"
                 "    assert Ccm(k).open(n, a, s) == m\n"
                 "    print(s.hex())\n", stdin=stdin)
    assert out.split() == [AESCCM(k, tag_length=8).encrypt(n, m, a).hex() for k, n, a, m in cases]


def test_vm_refuses_a_forged_tag_and_leaves_no_plaintext():
    v = RFC3610_1
    forged = bytearray(v["sealed"])
    forged[-1] ^= 1
    out = vm.run("from protocol.ccm import Ccm, AuthError\n"
                 f"c = Ccm({v['key']!r})\nout = bytearray(64)\n"
                 "try:\n"
                 f"    c.open_into({v['nonce']!r}, {v['aad']!r}, {bytes(forged)!r}, {len(forged)}, out)\n"
                 "    print('ACCEPTED')\n"
                 "except AuthError:\n"
                 "    print('REFUSED', out == bytearray(64))\n")
    assert out.split() == ["REFUSED", "True"]
