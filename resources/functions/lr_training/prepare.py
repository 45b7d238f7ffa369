"""Build time: a generated review data set (train.csv, test.csv: label,text) and the
accuracy the training reaches on it with the image's own scikit-learn."""
import csv
import json
import random

rng = random.Random(5150)
good = ["great", "excellent", "love", "perfect", "fast", "reliable", "recommend", "happy", "sturdy", "bright", "comfortable", "quiet"]
bad = ["broken", "terrible", "slow", "refund", "awful", "cheap", "noisy", "returned", "disappointed", "leaks", "flimsy", "late"]
neutral = [f"w{i}" for i in range(400)] + ["the", "product", "arrived", "box", "it", "was", "and", "with", "a", "this"]


def review(label):
    words = [rng.choice(neutral) for _ in range(rng.randrange(10, 40))]
    words += [rng.choice(good if label else bad) for _ in range(rng.randrange(0, 4))]
    words += [rng.choice(bad if label else good) for _ in range(rng.randrange(0, 3))]
    rng.shuffle(words)
    return " ".join(words)


for name, n in (("train.csv", 3000), ("test.csv", 1000)):
    with open(name, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for i in range(n):
            label = rng.randrange(2)
            w.writerow([label, review(label)])

# handler reads expected.json when imported: a placeholder until the real figures exist.
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"features": 0, "accuracy": 0.0}, f)
import handler  # noqa: E402  (the same training the function runs)

n, features, accuracy = handler.train_and_score()
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"features": features, "accuracy": accuracy}, f)
print(f"lr_training: {n} reviews, {features} features, accuracy {accuracy:.4f}")
