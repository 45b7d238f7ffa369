"""rnn_serving (vSwarm): generates a sequence with an LSTM (PyTorch) whose seeded weights
were made at build time and are loaded once.

The sequence generated from the default start was recorded at build time; a different one
is accepted only if the recorded one is still greedy up to near-ties (floating point differs
between CPUs)."""
import json
import os

import torch

from model import ALPHABET, END, CharLstm, generate

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = CharLstm()
MODEL.load_state_dict(torch.load(os.path.join(HERE, "weights.pt")))
MODEL.eval()
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)


def greedy_within_tolerance(start: str, text: str, tolerance: float = 1e-3) -> bool:
    """Whether `text` is what greedy generation from `start` gives, up to near-ties: another
    CPU's floating point may order two almost equal logits the other way."""
    with torch.no_grad():
        logits, state = MODEL(torch.tensor([[ALPHABET.index(c) for c in start]]))
        for c in text[len(start):]:
            step = logits[0, -1, :END]
            best, mine = float(step.max()), float(step[ALPHABET.index(c)])
            if best - mine > tolerance * max(1.0, abs(best)):
                return False
            logits, state = MODEL(torch.tensor([[ALPHABET.index(c)]]), state)
    return True


def handler(body: bytes) -> bytes:
    start = body.decode("utf-8", "replace").strip() or EXPECTED["start"]
    if not start or any(c not in ALPHABET for c in start):
        raise ValueError(f"the start {start!r} has characters outside the alphabet")
    text = generate(MODEL, start, EXPECTED["length"])
    if start == EXPECTED["start"] and text != EXPECTED["text"]:
        if len(text) != len(EXPECTED["text"]) or not greedy_within_tolerance(start, EXPECTED["text"]):
            raise ValueError(f"generated {text!r}, expected {EXPECTED['text']!r}")
    return f"ok rnn_serving {text}".encode()
