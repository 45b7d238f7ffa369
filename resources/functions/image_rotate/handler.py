"""image_rotate (vSwarm): rotates an image with Pillow and encodes the result as JPEG.

The image is generated at build time. The rotation is checked by rotating back (exact for
quarter turns) and against the rotated pixels' digest recorded at build time."""
import hashlib
import io
import json
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)
IMAGE_PATH = os.path.join(HERE, "input.png")


def rotate(img: Image.Image, degrees: int) -> Image.Image:
    return img.rotate(degrees, expand=True)


def handler(body: bytes) -> bytes:
    degrees = int(body.decode() or "90")
    if degrees % 90:
        raise ValueError(f"only quarter turns are checkable exactly, not {degrees} degrees")
    with Image.open(IMAGE_PATH) as img:
        img.load()
    rotated = rotate(img, degrees)
    if rotate(rotated, -degrees).tobytes() != img.tobytes():
        raise ValueError("rotating back did not give the image back")
    digest = hashlib.sha256(rotated.tobytes()).hexdigest()
    if degrees == 90 and digest != EXPECTED["rotated90_sha256"]:
        raise ValueError(f"rotated pixels sha256 {digest}, expected {EXPECTED['rotated90_sha256']}")
    out = io.BytesIO()
    rotated.save(out, format="JPEG", quality=85)
    w, h = rotated.size
    return f"ok image_rotate {degrees} degrees, {w}x{h}, jpeg {out.tell()} bytes, sha256 {digest[:16]}".encode()
