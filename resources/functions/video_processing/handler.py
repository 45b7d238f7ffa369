"""video_processing (vSwarm): turns every frame of a video grey with OpenCV and writes the
result as a new video.

The video is generated at build time; its frame count, size and per-frame mean grey levels
were recorded then (compared within one grey level: decoders may round differently)."""
import json
import os

import cv2

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)


def grey_means(path: str, out_path: str):
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open {path}")
    writer = None
    means = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if writer is None:
            fourcc = cv2.VideoWriter_fourcc(*"MJPG")
            writer = cv2.VideoWriter(out_path, fourcc, 25.0, (grey.shape[1], grey.shape[0]), isColor=False)
            if not writer.isOpened():
                raise ValueError(f"OpenCV cannot write {out_path}")
        writer.write(grey)
        means.append(float(grey.mean()))
    capture.release()
    if writer is not None:
        writer.release()
    return means


def handler(body: bytes) -> bytes:
    out_path = "/tmp/video_processing-out.avi"
    if os.path.exists(out_path):
        os.remove(out_path)  # the size check below must see this invocation's output
    means = grey_means(os.path.join(HERE, "input.avi"), out_path)
    size = os.path.getsize(out_path) if os.path.exists(out_path) else 0
    if len(means) != EXPECTED["frames"]:
        raise ValueError(f"{len(means)} frames, expected {EXPECTED['frames']}")
    worst = max(abs(m - e) for m, e in zip(means, EXPECTED["means"]))
    if worst > 1.0 or size == 0:
        raise ValueError(f"grey levels off by {worst:.2f}, output {size} bytes")
    return f"ok video_processing {len(means)} frames, output {size} bytes".encode()
