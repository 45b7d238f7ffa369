"""Returns N deterministic bytes (N is the request body, in decimal): the host checks what
it receives against the same generator."""


def blob(n: int) -> bytes:
    pattern = bytes(range(256)) * 4096  # 1 MiB
    whole, rest = divmod(n, len(pattern))
    return pattern * whole + pattern[:rest]


def handler(body: bytes) -> bytes:
    n = int(body.decode().strip())
    if n < 0 or n > 256 << 20:
        raise ValueError(f"size {n} out of range")
    return blob(n)
