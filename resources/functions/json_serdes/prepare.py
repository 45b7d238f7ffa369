"""Build time: a deterministic JSON document of about 2 MB (nested records, as an API
response) and the digest of its canonical serialisation."""
import hashlib
import json
import random

rng = random.Random(99)
tags = ["alpha", "beta", "gamma", "delta", "kappa", "omega"]
doc = {
    "generated_by": "reapvm json_serdes prepare.py",
    "items": [
        {
            "id": i,
            "name": f"item-{i:05d}",
            "price": round(rng.uniform(0, 1000), 2),
            "in_stock": rng.random() < 0.7,
            "tags": rng.sample(tags, rng.randrange(1, 4)),
            "dimensions": {"w": rng.randrange(1, 100), "h": rng.randrange(1, 100), "d": rng.randrange(1, 100)},
            "reviews": [{"stars": rng.randrange(1, 6), "text": "x" * rng.randrange(5, 60)} for _ in range(rng.randrange(0, 4))],
        }
        for i in range(8000)
    ],
}
with open("document.json", "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)
canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"canonical_sha256": hashlib.sha256(canonical.encode()).hexdigest()}, f)
print(f"json_serdes: document of {len(canonical)} canonical bytes")
