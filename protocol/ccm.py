# AES-CCM with a 13-byte nonce and an 8-byte tag (COSE AES-CCM-16-64-128,
# RFC 3610 with L=2, M=8), built from AES-ECB and AES-CBC because that is all
# the ESP32's cryptolib offers:
# - the CBC-MAC is AES-CBC with a zero IV over B0 | AAD blocks | message
#   blocks, keeping the last block;
# - the keystream is one AES-ECB call over the counter blocks A0..An.
# Messages are at most 250 bytes (one ESP-NOW frame), so every buffer is
# sized once by the caller and reused: seal_into/open_into allocate only the
# two cipher objects per frame.
try:
    from cryptolib import aes
except ImportError:   # CPython (gateway, tests)
    from protocol._cryptolib_cpython import aes

from protocol._compat import const

_ECB = const(1)
_CBC = const(2)
NONCE_LEN = const(13)
TAG_LEN = const(8)
MAX_MSG = const(255)
MAX_AAD = const(32)
_BLOCKS = const(18)          # enough for B0 + AAD (<= 32 B) + message (<= 255 B)
_ZERO_IV = bytes(16)


class AuthError(ValueError):
    pass


class Ccm:
    """One key's AES-CCM-16-64-128, with work buffers preallocated."""

    def __init__(self, key):
        if len(key) != 16:
            raise ValueError("key must be 16 bytes (AES-128)")
        self.key = bytes(key)
        self._ecb = aes(self.key, _ECB)
        self._mac_in = bytearray(16 * _BLOCKS)
        self._mac_out = bytearray(16 * _BLOCKS)
        self._ctr = bytearray(16 * _BLOCKS)
        self._ks = bytearray(16 * _BLOCKS)

    def _mac(self, nonce, aad, msg, mlen):
        """The CBC-MAC T (first 8 bytes of the last CBC block), left in _mac_out."""
        b = self._mac_in
        alen = len(aad)
        b[0] = (0x40 if alen else 0) | ((TAG_LEN - 2) // 2) << 3 | 1
        b[1:14] = nonce
        b[14], b[15] = mlen >> 8, mlen & 0xFF
        n = 16
        if alen:
            b[16], b[17] = alen >> 8, alen & 0xFF
            b[18:18 + alen] = aad
            end = 18 + alen
            pad = (16 - end % 16) % 16
            b[end:end + pad] = _ZERO_IV[:pad]
            n = end + pad
        b[n:n + mlen] = msg[:mlen]
        end = n + mlen
        pad = (16 - end % 16) % 16
        b[end:end + pad] = _ZERO_IV[:pad]
        n = end + pad
        cbc = aes(self.key, _CBC, _ZERO_IV)
        mv = memoryview(self._mac_out)
        cbc.encrypt(memoryview(b)[:n], mv[:n])
        return n - 16

    def _keystream(self, nonce, mlen):
        """S0 | S1 | ... in _ks: one ECB call over the counter blocks."""
        blocks = 1 + (mlen + 15) // 16
        c = self._ctr
        for i in range(blocks):
            o = 16 * i
            c[o] = 1
            c[o + 1:o + 14] = nonce
            c[o + 14], c[o + 15] = i >> 8, i & 0xFF
        n = 16 * blocks
        self._ecb.encrypt(memoryview(c)[:n], memoryview(self._ks)[:n])

    def _check(self, nonce, aad, mlen):
        if len(nonce) != NONCE_LEN:
            raise ValueError("nonce must be 13 bytes")
        if len(aad) > MAX_AAD or mlen > MAX_MSG:
            raise ValueError("frame too large for CCM here: aad <= 32, message <= 255 bytes")

    def seal_into(self, nonce, aad, msg, mlen, out):
        """Write ciphertext | tag (mlen + 8 bytes) into out; return that length."""
        self._check(nonce, aad, mlen)
        last = self._mac(nonce, aad, msg, mlen)
        self._keystream(nonce, mlen)
        ks, t = self._ks, self._mac_out
        for i in range(mlen):
            out[i] = msg[i] ^ ks[16 + i]
        for i in range(TAG_LEN):
            out[mlen + i] = t[last + i] ^ ks[i]
        return mlen + TAG_LEN

    def open_into(self, nonce, aad, sealed, slen, out):
        """Check the tag and write the plaintext into out; return its length or raise AuthError."""
        mlen = slen - TAG_LEN
        if mlen < 0:
            raise AuthError("shorter than the tag")
        self._check(nonce, aad, mlen)
        self._keystream(nonce, mlen)
        ks = self._ks
        for i in range(mlen):
            out[i] = sealed[i] ^ ks[16 + i]
        last = self._mac(nonce, aad, out, mlen)
        t = self._mac_out
        diff = 0
        for i in range(TAG_LEN):
            diff |= (t[last + i] ^ ks[i]) ^ sealed[mlen + i]
        if diff:
            for i in range(mlen):
                out[i] = 0
            raise AuthError("tag mismatch")
        return mlen

    def seal(self, nonce, aad, msg):
        out = bytearray(len(msg) + TAG_LEN)
        self.seal_into(nonce, aad, msg, len(msg), out)
        return bytes(out)

    def open(self, nonce, aad, sealed):
        out = bytearray(max(len(sealed) - TAG_LEN, 0))
        n = self.open_into(nonce, aad, sealed, len(sealed), out)
        return bytes(out[:n])
