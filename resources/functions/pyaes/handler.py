"""pyaes (vSwarm): encrypts and decrypts a message with pure-Python AES (CTR mode).

The message is generated at build time; its ciphertext's digest was recorded then, so a
wrong encryption or decryption is an error."""
import hashlib
import json
import os

import pyaes

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "message.bin"), "rb") as f:
    MESSAGE = f.read()
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)
KEY = bytes.fromhex(EXPECTED["key"])


def encrypt(message: bytes) -> bytes:
    return pyaes.AESModeOfOperationCTR(KEY).encrypt(message)


def handler(body: bytes) -> bytes:
    rounds = int(body.decode() or "1")
    for _ in range(rounds):
        ciphertext = encrypt(MESSAGE)
        plaintext = pyaes.AESModeOfOperationCTR(KEY).decrypt(ciphertext)
        if plaintext != MESSAGE:
            raise ValueError("decryption did not give the message back")
    digest = hashlib.sha256(ciphertext).hexdigest()
    if digest != EXPECTED["ciphertext_sha256"]:
        raise ValueError(f"ciphertext sha256 {digest}, expected {EXPECTED['ciphertext_sha256']}")
    return f"ok pyaes {len(MESSAGE)} bytes x{rounds}, ciphertext sha256 {digest[:16]}".encode()
