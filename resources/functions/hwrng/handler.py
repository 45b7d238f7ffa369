"""Reads N bytes (the body, in decimal; default 64) from /dev/hwrng, the entropy device, and
returns `SOURCE N HEX`: the kernel's current hardware RNG (e.g. `virtio_rng.0`) and the
bytes. Without an entropy device the read fails (HTTP 500 naming why)."""


def handler(body: bytes) -> bytes:
    n = int(body.decode().strip() or "64")
    if n <= 0 or n > 4096:
        raise ValueError(f"size {n} out of range (1 to 4096)")
    with open("/sys/class/misc/hw_random/rng_current") as f:
        source = f.read().strip()
    with open("/dev/hwrng", "rb") as f:
        data = f.read(n)
    return f"{source} {len(data)} {data.hex()}".encode()
