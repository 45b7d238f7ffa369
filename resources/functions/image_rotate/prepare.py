"""Build time: a deterministic 1024x768 picture (shapes over noise) as PNG, and the digest of
its pixels rotated by a quarter turn."""
import hashlib
import json
import random

from PIL import Image, ImageDraw

W, H = 1024, 768
rng = random.Random(7)
img = Image.frombytes("RGB", (W, H), bytes(rng.randrange(256) for _ in range(W * H * 3)))
draw = ImageDraw.Draw(img)
for _ in range(60):
    x, y = rng.randrange(W), rng.randrange(H)
    r = rng.randrange(10, 120)
    colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
img.save("input.png")
rotated = img.rotate(90, expand=True)
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"rotated90_sha256": hashlib.sha256(rotated.tobytes()).hexdigest()}, f)
print(f"image_rotate: {W}x{H} input.png")
