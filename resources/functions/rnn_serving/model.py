"""The LSTM of rnn_serving: a character-level name generator (as vSwarm's rnn_serving)."""
import torch
from torch import nn

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;'-"
END = len(ALPHABET)  # the end-of-name symbol
HIDDEN = 256


class CharLstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET) + 1, 64)
        self.lstm = nn.LSTM(64, HIDDEN, num_layers=2, batch_first=True)
        self.out = nn.Linear(HIDDEN, len(ALPHABET) + 1)

    def forward(self, x, state=None):
        y, state = self.lstm(self.embed(x), state)
        return self.out(y), state


def generate(model: CharLstm, start: str, length: int) -> str:
    """Greedy generation: the most likely next character (END excluded), `length` times."""
    text = start
    state = None
    x = torch.tensor([[ALPHABET.index(c) for c in start]])
    with torch.no_grad():
        for _ in range(length):
            logits, state = model(x, state)
            nxt = int(logits[0, -1, :END].argmax())
            text += ALPHABET[nxt]
            x = torch.tensor([[nxt]])
    return text
