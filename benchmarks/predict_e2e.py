"""`medseg predict` end to end against segmentation_models_pytorch doing the same work.

    pip install -e ".[bench]"                      # segmentation-models-pytorch
    python benchmarks/predict_e2e.py               # ISIC 2017 test/ (150 images), 256×256

Each side is a fresh process that reads every image of a folder, resizes it to 256×256,
normalises it, runs DeepLabv3+ ResNet-50 on batches of 16, thresholds the foreground
probability at 0.5 and writes a mask of the image's own size as PNG:

- medseg: the command line, ``medseg predict --checkpoint CKPT --input DIR --out OUT --tta
  none`` (its automatic precision: bf16 where the CPU computes it natively, else float32),
  with an untrained default network at 256×256 (weights do not change the speed);
- medseg, int8: the same network exported by ``medseg export --format onnx --quantize int8``
  (calibrated on the data root's train/ images), predicted through onnxruntime by the same
  command;
- smp: ``smp.DeepLabV3Plus("resnet50", encoder_weights=None)`` in float32, eval mode,
  ``torch.inference_mode``, the same steps written plainly (PIL decode, OpenCV resize, PNG).

Wall-clock seconds of each whole process, start-up and imports included (medians of
``--repeats`` runs); the ratio is smp's time over medseg's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hardware
from predict_speed import untrained_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "isic2017" / "test" / "images"
SIZE, BATCH = 256, 16

SMP = """
import sys
from pathlib import Path
import cv2, numpy as np, torch
import segmentation_models_pytorch as smp
from PIL import Image
source, out = Path(sys.argv[1]), Path(sys.argv[2])
model = smp.DeepLabV3Plus("resnet50", encoder_weights=None, classes=1).eval()
mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
paths = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".png"))
with torch.inference_mode():
    for first in range(0, len(paths), 16):
        batch = paths[first : first + 16]
        images = [np.asarray(Image.open(p).convert("RGB")) for p in batch]
        inputs = np.stack([(cv2.resize(i, (256, 256), interpolation=cv2.INTER_AREA) / 255 - mean) / std for i in images])
        logits = model(torch.from_numpy(inputs.transpose(0, 3, 1, 2)).float())
        for path, image, probability in zip(batch, images, torch.sigmoid(logits)[:, 0].numpy()):
            resized = cv2.resize(probability, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
            Image.fromarray(((resized > 0.5) * 255).astype(np.uint8)).save(out / f"{path.stem}_segmentation.png")
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    count = len(list(args.images.iterdir()))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = untrained_checkpoint(Path(folder), SIZE)
        int8 = _export_int8(checkpoint, args.images.parent.parent / "train", Path(folder))
        runs = {"medseg predict": checkpoint, "medseg predict, int8": int8}
        rows = {
            name: [_medseg(model, args.images, Path(folder)) for _ in range(args.repeats)]
            for name, model in runs.items()
        }
        rows["smp (fp32, plain)"] = [_smp(args.images, Path(folder)) for _ in range(args.repeats)]
    medians = {name: statistics.median(seconds) for name, seconds in rows.items()}
    print(f"{count} images of {args.images}, {SIZE}×{SIZE}, batch {BATCH}; {hardware()}")
    print(f"{'':<22} {'seconds':>8} {'images/s':>9}")
    for name, seconds in medians.items():
        print(f"{name:<22} {seconds:>8.1f} {count / seconds:>9.1f}")
    smp = medians["smp (fp32, plain)"]
    ratios = {name: smp / medians[name] for name in runs}
    for name, ratio in ratios.items():
        print(f"{name} against smp, end to end (process start to last PNG): ×{ratio:.2f}")
    print(json.dumps({"images": count, "seconds": medians, "ratios": ratios}))
    return 0


def _medseg(checkpoint: Path, images: Path, folder: Path) -> float:
    out = folder / "medseg-out"
    command = ["medseg", "predict", "--checkpoint", str(checkpoint), "--input", str(images)]
    command += ["--out", str(out), "--tta", "none", "--overwrite", "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def _export_int8(checkpoint: Path, calibration: Path, folder: Path) -> Path:
    """The checkpoint as int8 ONNX (`medseg export`), calibrated on ``calibration``."""
    out = folder / "int8"
    command = ["medseg", "export", "--checkpoint", str(checkpoint), "--format", "onnx"]
    command += ["--quantize", "int8", "--calibration", str(calibration), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    return out


def _smp(images: Path, folder: Path) -> float:
    out = folder / "smp-out"
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", SMP, str(images), str(out)], check=True, capture_output=True
    )
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
