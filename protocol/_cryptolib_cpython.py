# cryptolib.aes for CPython: the MicroPython API (ECB and CBC only, as on an
# ESP32) over `cryptography`, so protocol/ccm.py runs unchanged on the gateway
# and in tests. The gateway's own AEAD uses cryptography's AESCCM; tests prove
# the two agree byte for byte.
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MODE_ECB = 1
MODE_CBC = 2


class aes:  # noqa: N801  (MicroPython's name)
    def __init__(self, key, mode, iv=None):
        if mode == MODE_ECB:
            self._ctx = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()
        elif mode == MODE_CBC:
            self._ctx = Cipher(algorithms.AES(bytes(key)), modes.CBC(bytes(iv or bytes(16)))).encryptor()
        else:
            raise ValueError("mode must be 1 (ECB) or 2 (CBC): the ESP32 has no other")

    def encrypt(self, data, out=None):
        result = self._ctx.update(bytes(data))
        if out is None:
            return result
        out[:len(result)] = result
        return None
