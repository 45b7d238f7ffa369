"""Returns the guest's clocks: `MONOTONIC_SECONDS WALL_SECONDS` (checks that time runs in a
restored guest)."""
import time


def handler(body: bytes) -> bytes:
    return f"{time.monotonic():.6f} {time.time():.6f}".encode()
