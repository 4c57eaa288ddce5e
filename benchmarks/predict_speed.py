"""Inference as `medseg predict` runs it: a fresh process, a model loaded from a checkpoint, through
`Predictor`, with and without `medseg.engine.runtime.tune_allocator` (which the command line
applies to predict, evaluate and visualize).

    python benchmarks/predict_speed.py                  # default model at 256×256, batch 16
    python benchmarks/predict_speed.py --repeats 3 --batches 6
    python benchmarks/predict_speed.py --train --size 160   # training steps instead (why train
                                                            # keeps glibc's defaults)

Each row is a new Python process that loads the checkpoint and segments `--batches` batches of
random 256×256 images (TTA none); the first batch is the cold one a short `predict` pays, the
median of the others the pace of a long one. Medians over `--repeats` processes. "warm" is
glibc's default allocator after two training steps in the same process: the state in which
`benchmarks/speed.py` times inference, against which predict's pace is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
if sys.argv[2] == "tuned":
    from medseg.engine.runtime import tune_allocator
    assert tune_allocator(), "glibc's mallopt is not available here"
import numpy as np
from medseg.prediction.predictor import Predictor
rng = np.random.default_rng(0)
size, batch, batches = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
predictor = Predictor.from_checkpoint(sys.argv[1], tta="none")
if sys.argv[2] == "warm":  # benchmarks/speed.py's state: two training steps before inference
    import torch
    predictor.model.train()
    batch_tensor = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        predictor.model(batch_tensor).mean().backward()
    predictor.model.zero_grad(set_to_none=True)
    predictor.model.eval()
seconds = []
for _ in range(batches):
    started = time.perf_counter()
    predictor.probabilities(images)
    seconds.append(time.perf_counter() - started)
print(json.dumps([s / batch * 1000 for s in seconds]))
"""


CHILD_TRAIN = """
import json, sys, time
if sys.argv[2] == "tuned":
    from medseg.engine.runtime import tune_allocator
    assert tune_allocator(), "glibc's mallopt is not available here"
import torch
from medseg.config import build_config
from medseg.engine.train import build_optimizer
from medseg.losses import DiceBCELoss
from medseg.model import DeepLabV3Plus
torch.manual_seed(0)
size, batch, batches = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
config = build_config(overrides={"model.pretrained": False})
model = DeepLabV3Plus.from_config(config.model).to(memory_format=torch.channels_last)
optimizer, loss_fn = build_optimizer(model, config), DiceBCELoss()
images = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
masks = (torch.rand(batch, 1, size, size) > 0.5).float()
seconds = []
for _ in range(batches):
    started = time.perf_counter()
    loss = loss_fn(model(images), masks)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    seconds.append(time.perf_counter() - started)
print(json.dumps([s / batch * 1000 for s in seconds]))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="time training steps instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = untrained_checkpoint(Path(folder), args.size)
        modes = ("default", "tuned") if args.train else ("default", "tuned", "warm")
        rows = {mode: _measure(mode, checkpoint, args) for mode in modes}
    print(("training steps" if args.train else "inference") + f" at {args.size}×{args.size}")
    print(f"{'allocator':<10} {'first batch ms/img':>20} {'later batches ms/img':>22}")
    for mode, (first, later) in rows.items():
        print(f"{mode:<10} {first:>20.1f} {later:>22.1f}")
    (first_default, later_default), (first_tuned, later_tuned) = rows["default"], rows["tuned"]
    print(
        f"tuned against default: first batch ×{first_default / first_tuned:.2f}, "
        f"later batches ×{later_default / later_tuned:.2f}"
    )
    if "warm" in rows:
        later_warm = rows["warm"][1]
        print(
            f"tuned (as predict runs) against warm (in-process, as speed.py): first batch "
            f"{first_tuned / later_warm - 1:+.0%}, later batches {later_tuned / later_warm - 1:+.0%}"
        )
    print(json.dumps({mode: {"first": f, "later": later} for mode, (f, later) in rows.items()}))
    return 0


def _measure(mode: str, checkpoint: Path, args) -> tuple[float, float]:
    firsts, laters = [], []
    for _ in range(args.repeats):
        command = [
            sys.executable,
            "-c",
            CHILD_TRAIN if args.train else CHILD,
            str(checkpoint),
            mode,
        ]
        command += [str(args.size), str(args.batch), str(args.batches)]
        environment = {**os.environ, "MEDSEG_TUNE_MALLOC": "1"}
        output = subprocess.run(
            command, capture_output=True, text=True, check=True, env=environment
        )
        per_image = json.loads(output.stdout.strip().splitlines()[-1])
        firsts.append(per_image[0])
        laters.append(statistics.median(per_image[1:]))
    return statistics.median(firsts), statistics.median(laters)


def untrained_checkpoint(folder: Path, size: int) -> Path:
    """An untrained default network at ``size`` (weights do not change the speed)."""
    from medseg.config import build_config
    from medseg.engine.checkpoint import save_checkpoint
    from medseg.model import DeepLabV3Plus

    config = build_config(
        overrides={"data.image_size": size, "model.pretrained": False, "data.augment": "default"}
    )
    model = DeepLabV3Plus.from_config(config.model)
    path = folder / "default.pt"
    state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 0, "metrics": {}}
    save_checkpoint(path, state)
    return path


if __name__ == "__main__":
    sys.exit(main())
