"""Writes the request body to /var/lib/reapvm-test/out.txt and syncs it to disk."""
import os

PATH = "/var/lib/reapvm-test/out.txt"


def handler(body: bytes) -> bytes:
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    with open(PATH, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    return f"wrote {len(body)} bytes to {PATH}".encode()
