"""A large working set: 32 MiB of pseudo-random data, made by the first invocation and kept
(so a snapshot taken after it holds the data), read in full by every invocation. Returns the
hex SHA-256 of the data followed by the body."""
import hashlib
import random

DATA = None


def handler(body: bytes) -> bytes:
    global DATA
    if DATA is None:
        DATA = random.Random(42).randbytes(32 << 20)
    h = hashlib.sha256(DATA)
    h.update(body)
    return h.hexdigest().encode()
