"""Build time: trains the TF-IDF + logistic regression sentiment model on a generated corpus
of product reviews, pickles it, and records the default review's prediction."""
import json
import pickle
import random

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

rng = random.Random(2021)
good = ["great", "excellent", "love", "perfect", "fast", "reliable", "recommend", "happy", "sturdy", "bright"]
bad = ["broken", "terrible", "slow", "refund", "awful", "cheap", "noisy", "returned", "disappointed", "leaks"]
neutral = ["the", "product", "arrived", "box", "it", "was", "and", "with", "a", "this", "after", "week", "battery", "size"]


def review(label):
    words = [rng.choice(neutral) for _ in range(rng.randrange(8, 30))]
    words += [rng.choice(good if label else bad) for _ in range(rng.randrange(1, 5))]
    words += [rng.choice(bad if label else good) for _ in range(rng.randrange(0, 2))]
    rng.shuffle(words)
    return " ".join(words)


labels = [i % 2 for i in range(20000)]
texts = [review(label) for label in labels]
vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2)
features = vectorizer.fit_transform(texts)
model = LogisticRegression(max_iter=1000, random_state=0).fit(features, labels)
with open("model.pickle", "wb") as f:
    pickle.dump((vectorizer, model), f)
default = "the battery arrived fast and it was excellent, I love this product and recommend it"
x = vectorizer.transform([default])
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"review": default, "label": int(model.predict(x)[0]), "positive": float(model.predict_proba(x)[0][1])}, f)
print(f"lr_serving: trained on {len(texts)} reviews, {len(vectorizer.vocabulary_)} features")
