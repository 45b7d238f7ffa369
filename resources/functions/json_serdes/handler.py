"""json_serdes (vSwarm): parses a JSON document and serialises it again.

The document is generated at build time; the canonical serialisation's digest was recorded
then, and the round trip must give the same document back."""
import hashlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)
DOC_PATH = os.path.join(HERE, "document.json")


def canonical(doc) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def handler(body: bytes) -> bytes:
    with open(DOC_PATH, encoding="utf-8") as f:
        text = f.read()
    doc = json.loads(text)
    out = canonical(doc)
    if json.loads(out) != doc:
        raise ValueError("the serialised document does not parse back to the same document")
    digest = hashlib.sha256(out.encode()).hexdigest()
    if digest != EXPECTED["canonical_sha256"]:
        raise ValueError(f"canonical sha256 {digest}, expected {EXPECTED['canonical_sha256']}")
    return f"ok json_serdes {len(text)} bytes in, {len(out)} bytes out, sha256 {digest[:16]}".encode()
