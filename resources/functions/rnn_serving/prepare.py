"""Build time: seeded LSTM weights (weights.pt) and the sequence the image's own PyTorch
generates from the default start."""
import json

import torch

from model import CharLstm, generate

torch.set_num_threads(1)
torch.manual_seed(1)
model = CharLstm()
# Larger weights than the default init make the greedy walk less repetitive.
with torch.no_grad():
    for p in model.parameters():
        p.mul_(6.0)
model.eval()
torch.save(model.state_dict(), "weights.pt")
start, length = "Ros", 48
text = generate(model, start, length)
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"start": start, "length": length, "text": text}, f)
print(f"rnn_serving: {start!r} -> {text!r}")
