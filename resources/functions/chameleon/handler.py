"""chameleon (vSwarm): renders an HTML table with the Chameleon template engine.

The table's cells are made from the request's seed; the rendered page's digest for the
default seed was computed at build time (prepare.py), so a wrong render is an error."""
import hashlib
import json
import os

from chameleon import PageTemplate

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "table.pt"), encoding="utf-8") as f:
    TEMPLATE = PageTemplate(f.read())
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)

ROWS, COLS = EXPECTED["rows"], EXPECTED["cols"]


def table(seed: int):
    return [[f"r{r}c{c}:{(seed * 7919 + r * 131 + c * 17) % 100003}" for c in range(COLS)] for r in range(ROWS)]


def render(seed: int) -> str:
    return TEMPLATE(title=f"table {seed}", rows=table(seed))


def handler(body: bytes) -> bytes:
    seed = int(body.decode() or EXPECTED["seed"])
    page = render(seed)
    digest = hashlib.sha256(page.encode()).hexdigest()
    cells = page.count("<td>")
    if cells != ROWS * COLS:
        raise ValueError(f"rendered {cells} cells, expected {ROWS * COLS}")
    if seed == EXPECTED["seed"] and digest != EXPECTED["sha256"]:
        raise ValueError(f"rendered page sha256 {digest}, expected {EXPECTED['sha256']}")
    return f"ok chameleon {ROWS}x{COLS} table, {len(page)} bytes, sha256 {digest[:16]}".encode()
