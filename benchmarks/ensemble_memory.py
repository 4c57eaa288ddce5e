"""What an ensemble costs in memory and time: one model, five folds kept loaded, five folds
loaded one at a time for every batch (what `medseg.prediction.ensemble` does past its budget).

    python benchmarks/ensemble_memory.py                 # resnet50 at 256×256, batch 4, 5 folds
    python benchmarks/ensemble_memory.py --backbone resnet101 --folds 5

The folds are untrained networks (random weights hold as many bytes as trained ones) written as
``medseg train --folds K`` lays a k-fold run out. Each row is a fresh process that loads the
model or ensemble, predicts ``--batches`` batches of random images (TTA none, float32), and
reports its peak resident memory (ru_maxrss) and the seconds from loading to the last batch.
Writes benchmarks/results/ensemble-memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
import numpy as np
from medseg.formats.source import resolve_source
from medseg.prediction.ensemble import EnsemblePredictor
from medseg.prediction.predictor import Predictor
run, mode, size, batch, batches = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
options = {"precision": "fp32", "tta": "none"}
started = time.perf_counter()
if mode == "one model":
    predictor = Predictor.from_checkpoint(run + "/fold_0", **options)
else:
    def load(leaf, tta):
        return Predictor.from_checkpoint(leaf, precision="fp32", tta=tta)
    predictor = EnsemblePredictor.from_source(
        resolve_source(run), load, tta="none", keep_loaded=mode == "folds kept loaded"
    )
for _ in range(batches):
    predictor.probabilities(images)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - started}))
"""
MODES = ("one model", "folds kept loaded", "folds loaded per batch")


def make_run(folder: Path, *, backbone: str, size: int, folds: int) -> int:
    """A k-fold run of untrained networks; returns one network's weight bytes."""
    import torch

    from medseg.config import build_config
    from medseg.engine.checkpoint import save_checkpoint
    from medseg.model import DeepLabV3Plus

    overrides = {"model.backbone": backbone, "model.pretrained": False, "data.image_size": size}
    config = build_config(overrides=overrides)
    for fold in range(folds):
        torch.manual_seed(fold)
        model = DeepLabV3Plus.from_config(config.model)
        state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1}
        save_checkpoint(folder / f"fold_{fold}/checkpoints/best.pt", {**state, "metrics": {}})
    (folder / "splits.json").write_text(json.dumps([{"train": [], "val": []}] * folds))
    return sum(tensor.nbytes for tensor in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "cv"
        weights = make_run(run, backbone=args.backbone, size=args.size, folds=args.folds)
        for mode in MODES:
            command = [sys.executable, "-c", CHILD, str(run), mode, str(args.size),
                       str(args.batch), str(args.batches)]  # fmt: skip
            found = json.loads(subprocess.run(command, check=True, capture_output=True,
                                              text=True).stdout.splitlines()[-1])  # fmt: skip
            rows.append({"mode": mode, **found})
            print(f"{mode:<24} peak RSS {found['peak_rss_mib']:7.0f} MiB  "
                  f"{found['seconds']:6.1f} s")  # fmt: skip
    result = {
        "backbone": args.backbone, "size": args.size, "folds": args.folds, "batch": args.batch,
        "batches": args.batches, "weights_mib_per_model": weights / 2**20, "rows": rows,
    }  # fmt: skip
    print(f"one {args.backbone} holds {weights / 2**20:.0f} MiB of weights")
    out = Path(__file__).parent / "results" / "ensemble-memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
