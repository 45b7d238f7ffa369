"""Reads the whole of /dev/vdb (or the device named in the body) after dropping the guest's
page cache, and returns `BYTES SECONDS`: the guest-side block read throughput."""
import os
import time


def handler(body: bytes) -> bytes:
    device = body.decode().strip() or "/dev/vdb"
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    total = 0
    start = time.monotonic()
    fd = os.open(device, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
    finally:
        os.close(fd)
    return f"{total} {time.monotonic() - start:.6f}".encode()
