"""Returns the hex SHA-256 of the request body (checks data the host sends)."""
import hashlib


def handler(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest().encode()
