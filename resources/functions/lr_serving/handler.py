"""lr_serving (vSwarm): sentiment of a product review by a TF-IDF + logistic regression
model (scikit-learn) trained at build time and loaded once.

The default review's label and probability were recorded at build time."""
import json
import os
import pickle

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "model.pickle"), "rb") as f:
    VECTORIZER, MODEL = pickle.load(f)
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)


def handler(body: bytes) -> bytes:
    review = body.decode("utf-8", "replace").strip() or EXPECTED["review"]
    features = VECTORIZER.transform([review])
    label = int(MODEL.predict(features)[0])
    positive = float(MODEL.predict_proba(features)[0][1])
    if review == EXPECTED["review"]:
        if label != EXPECTED["label"] or abs(positive - EXPECTED["positive"]) > 1e-6:
            raise ValueError(f"predicted {label} ({positive:.6f}), expected {EXPECTED['label']} ({EXPECTED['positive']:.6f})")
    sentiment = "positive" if label == 1 else "negative"
    return f"ok lr_serving {sentiment} p={positive:.4f}".encode()
