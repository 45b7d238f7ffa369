"""Reads the microVM metadata service (MMDS) from inside the guest, as a program on a
Firecracker guest does. The body is JSON: `path` (the resource), optionally `address`
(default 169.254.169.254), `token_ttl` (MMDS V2: first ask `PUT /latest/api/token` for a
session token with this lifetime and send it with the GET), `token` (send this token
instead) and `accept` (the Accept header). Returns JSON: the GET's `status` and `body`,
and the token request's `token_status` and `token`."""

import http.client
import json


def request(address, method, path, headers):
    conn = http.client.HTTPConnection(address, 80, timeout=60)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def handler(body: bytes) -> bytes:
    ask = json.loads(body)
    address = ask.get("address", "169.254.169.254")
    answer = {}
    headers = {}
    token = ask.get("token")
    if "token_ttl" in ask:
        status, token = request(
            address,
            "PUT",
            "/latest/api/token",
            {"X-metadata-token-ttl-seconds": str(ask["token_ttl"])},
        )
        answer["token_status"] = status
        answer["token"] = token
    if token is not None:
        headers["X-metadata-token"] = token
    if "accept" in ask:
        headers["Accept"] = ask["accept"]
    answer["status"], answer["body"] = request(address, "GET", ask["path"], headers)
    return json.dumps(answer).encode()
