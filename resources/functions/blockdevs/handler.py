"""Lists the guest's virtio block devices: `NAME SECTORS ro|rw` per line."""
import os


def handler(body: bytes) -> bytes:
    lines = []
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith("vd"):
            continue
        with open(f"/sys/block/{name}/size") as f:
            sectors = f.read().strip()
        with open(f"/sys/block/{name}/ro") as f:
            mode = "ro" if f.read().strip() == "1" else "rw"
        lines.append(f"{name} {sectors} {mode}")
    return "\n".join(lines).encode()
