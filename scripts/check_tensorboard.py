"""Read a kiln run's TensorBoard event file with TensorBoard's own reader (a development check).

    python3 -m venv target/tb && target/tb/bin/pip install tensorboard
    target/tb/bin/python scripts/check_tensorboard.py runs/<run>

Prints every scalar tag with its steps and values and every image tag with its size, and
checks that the scalars equal metrics.csv (as 32-bit floats).
"""
import csv
import struct
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run: Path) -> int:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    unit = next(iter(rows[0])) if rows else "epoch"
    bad = 0
    for tag in tags["scalars"]:
        events = acc.Scalars(tag)
        print(f"scalar {tag}: " + ", ".join(f"{e.step}={e.value:.6g}" for e in events))
        for e in events:
            want = float(rows[e.step - 1][tag])
            if struct.unpack("f", struct.pack("f", want))[0] != e.value:
                print(f"  mismatch at {unit} {e.step}: metrics.csv {want}, event {e.value}")
                bad += 1
    for tag in tags["images"]:
        for e in acc.Images(tag):
            print(f"image {tag} step {e.step}: {e.width}x{e.height}, {len(e.encoded_image_string)} bytes")
    missing = set(rows[0]) - {unit} - set(tags["scalars"]) if rows else set()
    if missing:
        print(f"columns without a scalar: {sorted(missing)}")
        bad += 1
    print("ok" if bad == 0 else f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
