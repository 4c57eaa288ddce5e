"""Compare training recipes by their validation Dice: the tool for choosing the default recipe.

    python benchmarks/recipes.py --variant base= --variant fp32=train.precision=fp32 --epochs 4
    python benchmarks/recipes.py --variant bf16= --variant fp32=train.precision=fp32 --epochs 3 \
        --train-subset 1000 --set data.val_fraction=0.2 --out runs/precision   # bf16 vs float32
    python benchmarks/recipes.py --variant lr2e-3=train.lr=2e-3 --variant plain=model.separable=false \\
        --epochs 20 --parallel 4 --set data.num_workers=3          # several at once on a GPU

Each variant is ``medseg train --data DATA --no-pretrained`` with its ``key=value`` overrides
(comma-separated) on top of ``--set`` and ``--epochs``. Selection uses only the seeded
validation split of train/: test/ is never read, so the choice it informs stays honest. Prints
a table (best and last validation Dice, minutes) and writes it as JSON beside the runs. Same
seed for every variant, so two variants differ only by their overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from medseg.config import parse_override

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2017"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "recipes")
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME=KEY=VALUE,...",
        help="a named set of overrides; NAME= alone is the default recipe",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, help="train.epochs for every variant")
    parser.add_argument("--parallel", type=int, default=1, help="variants trained at once")
    parser.add_argument(
        "--train-subset", type=int, help="train on the first N pairs of train/ only (sorted by id)"
    )
    args = parser.parse_args()
    if args.train_subset:
        args.data = train_subset(args.data, args.out / "subset-data", args.train_subset)

    common = dict(parse_override(text) for text in args.set)
    if args.epochs:
        common["train.epochs"] = args.epochs
    variants = dict(parse_variant(text) for text in args.variant)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(
            pool.map(lambda item: train_variant(args, item[0], common | item[1]), variants.items())
        )
    report = {
        "data": str(args.data),
        "common_overrides": common,
        "machine": describe_machine(),
        "parallel": args.parallel,
        "wall_minutes": round((time.perf_counter() - started) / 60, 2),
        "variants": rows,
    }
    print(format_table(rows, report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipes.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out / 'recipes.json'}")
    return 0 if all("error" not in row for row in rows) else 1


def train_subset(source: Path, target: Path, count: int) -> Path:
    """A data root whose train/ holds the first ``count`` pairs of ``source``'s (copied once)."""
    images = sorted((source / "train" / "images").iterdir())[:count]
    for folder in ("images", "masks"):
        (target / "train" / folder).mkdir(parents=True, exist_ok=True)
    for image in images:
        mask = f"{image.stem}_segmentation.png"
        for name, folder in ((image.name, "images"), (mask, "masks")):
            if not (target / "train" / folder / name).exists():
                shutil.copy2(source / "train" / folder / name, target / "train" / folder / name)
    return target


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r} needs a name before '='")
    overrides = dict(parse_override(part) for part in settings.split(",") if part)
    return name, overrides


def train_variant(args, name: str, overrides: dict) -> dict:
    """Train one variant in its own process (own threads, own memory), then read its curves."""
    out = args.out / name
    command = [
        *(sys.executable, "-m", "medseg", "train", "--data", str(args.data), "--out", str(out)),
        *("--no-pretrained", "--overwrite", "--quiet"),
        *(arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    minutes = (time.perf_counter() - started) / 60
    row = {"variant": name, "overrides": overrides, "minutes": round(minutes, 2)}
    if result.returncode != 0:
        return row | {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    with open(out / "metrics.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    best = max(history, key=lambda epoch: float(epoch["val_dice"]))
    row |= {
        "epochs": len(history),
        "best_val_dice": float(best["val_dice"]),
        "best_epoch": int(best["epoch"]),
        "last_val_dice": float(history[-1]["val_dice"]),
        "mean_epoch_seconds": round(
            sum(float(epoch["seconds"]) for epoch in history) / len(history), 1
        ),
    }
    print(f"done: {json.dumps(row)}", flush=True)  # a partial result, should the rest be cut off
    return row


def describe_machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def format_table(rows: list[dict], report: dict) -> str:
    lines = [
        f"recipes on {report['data']} (validation split of train/), common: "
        f"{report['common_overrides']}; {report['machine']}",
        "| variant | overrides | best val Dice (epoch) | last val Dice | s/epoch | minutes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "-"
        if "error" in row:
            lines.append(f"| {row['variant']} | {overrides} | failed: {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['variant']} | {overrides} | {row['best_val_dice']:.4f} ({row['best_epoch']}) "
            f"| {row['last_val_dice']:.4f} | {row['mean_epoch_seconds']} | {row['minutes']} |"
        )
    lines.append(f"wall time {report['wall_minutes']} min, {report['parallel']} at once")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
