# AES-CCM with a 13-byte nonce and an 8-byte tag (COSE AES-CCM-16-64-128,
# RFC 3610 with L=2, M=8), built from AES-ECB because that (with CBC) is all
# the ESP32's cryptolib offers:
# - the CBC-MAC is CBC with a zero IV over B0 | AAD blocks | message blocks;
#   it runs here as chained ECB calls on one 16-byte state block (X = E(X ^ B)),
#   which is the same computation without a cipher object per frame (cryptolib
#   cannot reset a CBC IV);
# - the keystream is AES-ECB of the counter blocks A0..An.
# Buffers are given with offsets instead of slices, so sealing and opening
# allocate nothing (proven under micropython.heap_lock() in the tests).
try:
    from cryptolib import aes
except ImportError:   # CPython (gateway, tests)
    from protocol._cryptolib_cpython import aes

from protocol._compat import const

_ECB = const(1)
NONCE_LEN = const(13)
TAG_LEN = const(8)
MAX_MSG = const(255)
MAX_AAD = const(32)


class AuthError(ValueError):
    pass


class Ccm:
    """One key's AES-CCM-16-64-128, with its work blocks preallocated."""

    def __init__(self, key):
        if len(key) != 16:
            raise ValueError("key must be 16 bytes (AES-128)")
        self._ecb = aes(bytes(key), _ECB)
        self._x = bytearray(16)      # CBC-MAC state
        self._a = bytearray(16)      # counter block
        self._s = bytearray(16)      # keystream block

    def _mac(self, nonce, aad, aoff, alen, msg, moff, mlen):
        """CBC-MAC of B0 | AAD | message; T is left in _x[0:8]."""
        x, ecb = self._x, self._ecb
        x[0] = (0x40 if alen else 0) | ((TAG_LEN - 2) // 2) << 3 | 1
        for i in range(13):
            x[1 + i] = nonce[i]
        x[14], x[15] = mlen >> 8, mlen & 0xFF
        ecb.encrypt(x, x)
        if alen:
            x[0] ^= alen >> 8
            x[1] ^= alen & 0xFF
            if self._absorb(aad, aoff, alen, 2):
                ecb.encrypt(x, x)
        if self._absorb(msg, moff, mlen, 0):
            ecb.encrypt(x, x)

    def _absorb(self, data, off, n, i):
        """XOR data[off:off+n] into the MAC state from byte i, encrypting each full block;
        return the fill of the last, partial block (0: none to pad and encrypt)."""
        x, ecb = self._x, self._ecb
        for j in range(n):
            x[i] ^= data[off + j]
            i += 1
            if i == 16:
                ecb.encrypt(x, x)
                i = 0
        return i

    def _block(self, nonce, counter):
        """Keystream block S_counter into _s."""
        a = self._a
        a[0] = 1
        for i in range(13):
            a[1 + i] = nonce[i]
        a[14], a[15] = counter >> 8, counter & 0xFF
        self._ecb.encrypt(a, self._s)

    def _crypt(self, nonce, src, soff, dst, doff, n):
        """dst[doff:doff+n] = src[soff:soff+n] ^ S1 | S2 | ... (CTR mode)."""
        s = self._s
        for j in range(n):
            if j & 15 == 0:
                self._block(nonce, 1 + (j >> 4))
            dst[doff + j] = src[soff + j] ^ s[j & 15]

    @staticmethod
    def _check(nonce, alen, mlen):
        if len(nonce) != NONCE_LEN:
            raise ValueError("nonce must be 13 bytes")
        if alen > MAX_AAD or mlen > MAX_MSG:
            raise ValueError("frame too large for CCM here: aad <= 32, message <= 255 bytes")

    def seal_into(self, nonce, aad, msg, mlen, out, aad_len=-1, out_off=0):
        """Write ciphertext | tag (mlen + 8 bytes) at out[out_off:]; return that length.

        aad[0:aad_len] is authenticated; it may be the start of out (the header)."""
        alen = len(aad) if aad_len < 0 else aad_len
        self._check(nonce, alen, mlen)
        self._mac(nonce, aad, 0, alen, msg, 0, mlen)
        self._crypt(nonce, msg, 0, out, out_off, mlen)
        self._block(nonce, 0)
        x, s = self._x, self._s
        for i in range(TAG_LEN):
            out[out_off + mlen + i] = x[i] ^ s[i]
        return mlen + TAG_LEN

    def open_into(self, nonce, aad, sealed, slen, out, aad_len=-1, sealed_off=0):
        """Check the tag of sealed[sealed_off:sealed_off+slen] and write the plaintext
        into out; return its length or raise AuthError (out is then zeroed)."""
        mlen = slen - TAG_LEN
        if mlen < 0:
            raise AuthError("shorter than the tag")
        alen = len(aad) if aad_len < 0 else aad_len
        self._check(nonce, alen, mlen)
        self._crypt(nonce, sealed, sealed_off, out, 0, mlen)
        self._mac(nonce, aad, 0, alen, out, 0, mlen)
        self._block(nonce, 0)
        x, s = self._x, self._s
        diff = 0
        for i in range(TAG_LEN):
            diff |= (x[i] ^ s[i]) ^ sealed[sealed_off + mlen + i]
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
