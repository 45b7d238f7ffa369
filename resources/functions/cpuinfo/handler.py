"""Returns the first processor's block of /proc/cpuinfo: what the guest's CPU says it is
(vendor, family, model, stepping, flags), to check CPU templates."""


def handler(body: bytes) -> bytes:
    with open("/proc/cpuinfo") as f:
        return f.read().split("\n\n")[0].encode()
