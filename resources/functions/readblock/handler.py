"""Reads the whole of /dev/vdb (or the device named in the body) after dropping the guest's
page cache, and returns `BYTES SECONDS`: the guest-side block read throughput. With the body
`sha256 DEVICE` it returns `BYTES SHA256` of the device's whole content instead."""
import hashlib
import os
import time


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def read_all(device: str, each) -> int:
    total = 0
    fd = os.open(device, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            each(chunk)
    finally:
        os.close(fd)
    return total


def handler(body: bytes) -> bytes:
    words = body.decode().split()
    drop_caches()
    if words[:1] == ["sha256"]:
        h = hashlib.sha256()
        total = read_all(words[1] if len(words) > 1 else "/dev/vdb", h.update)
        return f"{total} {h.hexdigest()}".encode()
    device = words[0] if words else "/dev/vdb"
    start = time.monotonic()
    total = read_all(device, lambda chunk: None)
    return f"{total} {time.monotonic() - start:.6f}".encode()
