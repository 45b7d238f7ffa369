"""cnn_serving (vSwarm): classifies an image with a CNN (PyTorch) whose seeded weights were
made at build time and are loaded once.

The image is generated at build time; its class and class probabilities were recorded then."""
import json
import os

import torch
from PIL import Image

from model import CLASSES, SmallCnn, to_tensor

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = SmallCnn()
MODEL.load_state_dict(torch.load(os.path.join(HERE, "weights.pt")))
MODEL.eval()
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)


def handler(body: bytes) -> bytes:
    with Image.open(os.path.join(HERE, "input.png")) as img:
        x = to_tensor(img.convert("RGB"))
    with torch.no_grad():
        probabilities = torch.softmax(MODEL(x), dim=1)[0]
    label = int(probabilities.argmax())
    worst = max(abs(float(p) - e) for p, e in zip(probabilities, EXPECTED["probabilities"]))
    if label != EXPECTED["label"] or worst > 1e-4:
        raise ValueError(f"class {label}, probabilities off by {worst:.2e}; expected class {EXPECTED['label']}")
    return f"ok cnn_serving {CLASSES[label]} p={float(probabilities[label]):.4f}".encode()
