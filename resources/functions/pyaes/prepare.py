"""Build time: a deterministic message and the digest of its AES-CTR ciphertext."""
import hashlib
import json
import random

import pyaes

rng = random.Random(1234)
words = ["serverless", "snapshot", "prefetch", "working", "set", "page", "fault", "guest", "memory", "cold"]
message = " ".join(rng.choice(words) for _ in range(2000)).encode()[:12 * 1024]
key = bytes(rng.randrange(256) for _ in range(32))
ciphertext = pyaes.AESModeOfOperationCTR(key).encrypt(message)
with open("message.bin", "wb") as f:
    f.write(message)
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"key": key.hex(), "ciphertext_sha256": hashlib.sha256(ciphertext).hexdigest()}, f)
print(f"pyaes: {len(message)}-byte message")
