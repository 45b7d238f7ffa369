"""rnn_serving (vSwarm): generates a sequence with an LSTM (PyTorch) whose seeded weights
were made at build time and are loaded once.

The sequence generated from the default start was recorded at build time."""
import json
import os

import torch

from model import ALPHABET, CharLstm, generate

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = CharLstm()
MODEL.load_state_dict(torch.load(os.path.join(HERE, "weights.pt")))
MODEL.eval()
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)


def handler(body: bytes) -> bytes:
    start = body.decode("utf-8", "replace").strip() or EXPECTED["start"]
    if not start or any(c not in ALPHABET for c in start):
        raise ValueError(f"the start {start!r} has characters outside the alphabet")
    text = generate(MODEL, start, EXPECTED["length"])
    if start == EXPECTED["start"] and text != EXPECTED["text"]:
        raise ValueError(f"generated {text!r}, expected {EXPECTED['text']!r}")
    return f"ok rnn_serving {text}".encode()
