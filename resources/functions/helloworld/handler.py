"""helloworld (vSwarm): greets whoever the request names."""


def handler(body: bytes) -> bytes:
    name = body.decode("utf-8", "replace").strip() or "world"
    return f"Hello, {name}!".encode()
