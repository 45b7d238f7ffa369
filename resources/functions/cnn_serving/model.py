"""The CNN of cnn_serving: a small image classifier (3x128x128 -> 10 classes)."""
import torch
from torch import nn

CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, len(CLASSES)))

    def forward(self, x):
        return self.classifier(self.features(x))


def to_tensor(img) -> torch.Tensor:
    """A PIL RGB image as a normalised 1x3xHxW float tensor."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = data.reshape(img.size[1], img.size[0], 3).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) / 0.25).unsqueeze(0)
