"""Connects to the host over vsock: the body is `PORT\\nDATA`; the function connects to host
CID 2 port PORT (reapvm hands the connection to whoever listens on `uds_path_PORT`), sends
DATA, shuts its sending side, and returns everything the host sent back until it closed.
A refused connection raises (HTTP 500 naming the error)."""

import socket


def handler(body: bytes) -> bytes:
    port_line, _, data = body.partition(b"\n")
    port = int(port_line)
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect((socket.VMADDR_CID_HOST, port))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)
