"""The TTA modes of `medseg evaluate` side by side on one trained run: its validation images (the
held-out share of train/ that chose best.pt) and test/, with the time each took.

    python benchmarks/tta_modes.py RUN --data ../shared/data/drive
    python benchmarks/tta_modes.py RUN --data DATA --modes flip d4 --out benchmarks/results/tta.json

Each cell is exactly ``medseg evaluate --checkpoint RUN --data SPLIT --tta MODE`` (inside the
split's fov/ where it has one, as for DRIVE), so a mode picked on the validation rows is one a
user could pick without reading test/. Rows: the mean Dice (a multi-class run: the mean over its
structures), the pixel AUC of a binary run, and the seconds the evaluation took, start-up and
reading included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import hardware

import medseg
from medseg.commands.evaluate import ROI_FOLDER
from medseg.config.choices import TTA_MODES
from medseg.data.folder import train_val_samples
from medseg.engine.checkpoint import load_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run folder (checkpoints/best.pt)")
    parser.add_argument("--data", type=Path, required=True, help="the data set it was trained on")
    parser.add_argument("--modes", nargs="+", default=["flip", "d4", "flip-scales"],
                        choices=[mode for mode in TTA_MODES if mode != "auto"])  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()

    splits = {"val": validation_folder(args.run, args.data), "test": args.data / "test"}
    rows = []
    for mode in args.modes:
        for split, folder in splits.items():
            started = time.perf_counter()
            summary = medseg.evaluate(
                checkpoint=args.run, data=folder, out=args.run / "tta-modes" / f"{split}-{mode}",
                tta=mode, overwrite=True, progress=False,
            )  # fmt: skip
            rows.append({"mode": mode, "split": split, "dice": summary["dice"],
                         "auc": summary.get("auc"), "seconds": time.perf_counter() - started})  # fmt: skip
            print(f"{mode:12s} {split:4s} Dice {rows[-1]['dice']:.4f}", flush=True)
    print(markdown(rows))
    print(f"\nhardware: {hardware()}")
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "hardware": hardware(),
                                        "rows": rows}, indent=2))  # fmt: skip
    return 0


def validation_folder(run: Path, data: Path) -> Path:
    """A split folder of links to the run's validation pairs (and their fov/ masks), beside it."""
    config = load_checkpoint(run / "checkpoints" / "best.pt")["config"]
    _, val = train_val_samples(
        data, mask_suffix=config["data"]["mask_suffix"], val_fraction=config["data"]["val_fraction"],
        seed=config["train"]["seed"],
    )  # fmt: skip
    folder = run / "tta-modes" / "val-data"
    for sample in val:
        links = {"images": sample.image, "masks": sample.mask}
        roi = sample.image.parent.parent / ROI_FOLDER / f"{sample.image.stem}.png"
        if roi.is_file():
            links[ROI_FOLDER] = roi
        for name, target in links.items():
            link = folder / name / target.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(target.resolve())
    return folder


def markdown(rows: list[dict]) -> str:
    """A mode a row: validation and test Dice and AUC, and test/'s seconds."""
    by_mode: dict = {}
    for row in rows:
        by_mode.setdefault(row["mode"], {})[row["split"]] = row
    lines = ["| TTA | val Dice | val AUC | test Dice | test AUC | test seconds |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for mode, split in by_mode.items():
        cells = [mode]
        for name in ("val", "test"):
            auc = split[name]["auc"]
            cells += [f"{split[name]['dice']:.4f}", "-" if auc is None else f"{auc:.4f}"]
        cells.append(f"{split['test']['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
