"""Build time: seeded CNN weights (weights.pt), a generated 128x128 picture (input.png), and
the class probabilities the image's own PyTorch gives for it."""
import json
import random

import torch
from PIL import Image, ImageDraw

from model import SmallCnn, to_tensor

torch.set_num_threads(1)
torch.manual_seed(0)
model = SmallCnn()
model.eval()
torch.save(model.state_dict(), "weights.pt")

rng = random.Random(3)
img = Image.new("RGB", (128, 128), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
draw = ImageDraw.Draw(img)
for _ in range(12):
    x, y, r = rng.randrange(128), rng.randrange(128), rng.randrange(4, 30)
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
img.save("input.png")
with torch.no_grad():
    probabilities = torch.softmax(model(to_tensor(img)), dim=1)[0]
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"label": int(probabilities.argmax()), "probabilities": [float(p) for p in probabilities]}, f)
print(f"cnn_serving: class {int(probabilities.argmax())}, p={float(probabilities.max()):.4f}")
