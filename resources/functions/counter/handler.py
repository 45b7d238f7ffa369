"""Keeps a counter in the worker's memory: each invocation returns the next value. A snapshot
taken between invocations must resume the count where it stood."""

COUNT = 0


def handler(body: bytes) -> bytes:
    global COUNT
    COUNT += 1
    return str(COUNT).encode()
