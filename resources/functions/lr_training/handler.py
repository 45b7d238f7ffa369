"""lr_training (vSwarm): trains a TF-IDF + logistic regression sentiment model (scikit-learn)
on a review data set generated at build time, then checks it on held-out reviews.

The held-out accuracy must reach what the same training reached at build time."""
import csv
import json
import os

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)


def load(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [r[1] for r in rows], [int(r[0]) for r in rows]


def train_and_score():
    texts, labels = load(os.path.join(HERE, "train.csv"))
    test_texts, test_labels = load(os.path.join(HERE, "test.csv"))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2)
    model = LogisticRegression(max_iter=1000, random_state=0).fit(vectorizer.fit_transform(texts), labels)
    accuracy = float(model.score(vectorizer.transform(test_texts), test_labels))
    return len(texts), len(vectorizer.vocabulary_), accuracy


def handler(body: bytes) -> bytes:
    n, features, accuracy = train_and_score()
    if features != EXPECTED["features"] or abs(accuracy - EXPECTED["accuracy"]) > 0.005:
        raise ValueError(f"{features} features, accuracy {accuracy:.4f}; expected {EXPECTED['features']}, {EXPECTED['accuracy']:.4f}")
    return f"ok lr_training {n} reviews, {features} features, accuracy {accuracy:.4f}".encode()
