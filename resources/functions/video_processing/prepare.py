"""Build time: a deterministic 320x240 MJPG video of moving shapes (input.avi) and the
per-frame mean grey levels that the image's own OpenCV reads from it."""
import json
import os

import cv2
import numpy as np

FRAMES, W, H = 75, 320, 240
writer = cv2.VideoWriter("input.avi", cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (W, H))
if not writer.isOpened():
    raise SystemExit("OpenCV cannot write an MJPG video here")
rng = np.random.default_rng(11)
background = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
for i in range(FRAMES):
    frame = background.copy()
    cv2.circle(frame, ((i * 5) % W, H // 2), 30, (0, 0, 255), -1)
    cv2.rectangle(frame, (W - (i * 3) % W - 40, 20), (W - (i * 3) % W, 60), (0, 255, 0), -1)
    cv2.putText(frame, f"frame {i}", (10, H - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
    writer.write(frame)
writer.release()

# handler reads expected.json when imported: a placeholder until the real figures exist.
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"frames": 0, "means": []}, f)
import handler  # noqa: E402  (the same decoding the function runs)

means = handler.grey_means("input.avi", "/tmp/video_processing-prepare.avi")
os.remove("/tmp/video_processing-prepare.avi")
with open("expected.json", "w", encoding="utf-8") as f:
    json.dump({"frames": len(means), "means": means}, f)
print(f"video_processing: {len(means)} frames of {W}x{H}")
