"""reapvm function worker: imports one function's handler once, then serves invocations
framed on stdin/stdout. Request: u32 LE length + body. Response: u8 status (0 ok, 1 error)
+ u32 LE length + body (the handler's result, or the error message)."""
import importlib.util
import os
import struct
import sys
import traceback


def main():
    fn_dir = sys.argv[1]
    requests = sys.stdin.buffer
    responses = sys.stdout.buffer
    # print() in a handler must not corrupt the protocol: it goes to the console instead.
    sys.stdout = sys.stderr
    sys.path.insert(0, fn_dir)
    spec = importlib.util.spec_from_file_location("handler", os.path.join(fn_dir, "handler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.handler
    responses.write(b"R")
    responses.flush()
    while True:
        header = requests.read(4)
        if len(header) < 4:
            return
        (length,) = struct.unpack("<I", header)
        body = requests.read(length)
        if len(body) < length:
            return
        try:
            result = handler(body)
            if result is None:
                result = b""
            elif isinstance(result, str):
                result = result.encode()
            status = 0
        except Exception as e:  # the handler's failure is the invocation's answer
            traceback.print_exc()
            result = f"{type(e).__name__}: {e}".encode()
            status = 1
        responses.write(struct.pack("<BI", status, len(result)))
        responses.write(result)
        responses.flush()


if __name__ == "__main__":
    main()
