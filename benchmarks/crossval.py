"""A k-fold cross-validation on test/: each fold model alone, the mean of the folds, and the
fold ensemble, with the cross-validated validation scores beside them and the wall times.

    medseg train --data ../shared/data/jsrt --out runs/jsrt-cv --folds 5 --no-pretrained
    python benchmarks/crossval.py --run runs/jsrt-cv --data ../shared/data/jsrt
    python benchmarks/crossval.py --markdown runs/jsrt-cv/crossval-test.json

The run is trained first by the command above (`--fold i` spreads it over machines or days);
this script only scores it. Every score is `medseg evaluate`'s with its defaults (the
checkpoint's TTA, each image at its mask's own size): a fold model as ``RUN/fold_i``, the
ensemble as ``RUN`` (the fold models' probabilities averaged, one model in memory at a time).
Prints the table and writes it as JSON into the run folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import hardware

import medseg
from medseg.engine.folds import KFoldRun


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="a k-fold run whose folds have all finished")
    parser.add_argument("--data", type=Path, help="the data root (its test/ is scored)")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="print a saved result")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.run is None or args.data is None:
        parser.error("--run and --data are needed (or --markdown JSON)")
    result = score_run(args.run, args.data)
    saved = args.run / "crossval-test.json"
    saved.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nwritten: {saved}")
    return 0


def score_run(run_path: Path, data: Path) -> dict:
    summary = run_path / "cv_summary.json"  # written once every fold has finished
    if not summary.is_file():
        sys.exit(f"{run_path}: not every fold has finished; train them first")
    cv = json.loads(summary.read_text())
    k = len(KFoldRun(run_path).read_splits())
    rows = {f"fold {i}": score(run_path / f"fold_{i}", data, run_path / f"test-fold_{i}")
            for i in range(k)}  # fmt: skip
    rows[f"{k}-fold ensemble"] = score(run_path, data, run_path / "test-ensemble")
    return {"hardware": hardware(), "run": str(run_path), "data": str(data), "cv": cv,
            "test": rows}  # fmt: skip


def score(checkpoint: Path, data: Path, out: Path) -> dict:
    started = time.perf_counter()
    summary = medseg.evaluate(
        checkpoint=checkpoint, data=data / "test", out=out, overwrite=True, progress=False
    )
    seconds = time.perf_counter() - started
    return {"seconds": seconds, **headline(summary)}


def headline(summary: dict) -> dict:
    """Dice per class and the foreground mean (a binary summary: its one Dice)."""
    if "per_class" not in summary:
        return {"mean": summary["dice"], "classes": {}}
    classes = {name: scores["dice"] for name, scores in summary["per_class"].items()}
    return {"mean": summary["mean_foreground_dice"], "classes": classes}


def markdown(result: dict) -> str:
    rows = result["test"]
    names = list(next(iter(rows.values()))["classes"])
    header = ["model", "mean Dice", *names, "seconds"]
    lines = [f"CPU: {result['hardware']}. Run: {result['run']}, scored on {result['data']}/test.",
             "", "| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]  # fmt: skip
    singles = [row for name, row in rows.items() if name.startswith("fold ")]
    for name, row in rows.items():
        lines.append(_row(name, row, names))
    mean = {"mean": _mean_std([r["mean"] for r in singles]),
            "classes": {c: _mean_std([r["classes"][c] for r in singles]) for c in names},
            "seconds": statistics.mean(r["seconds"] for r in singles)}  # fmt: skip
    lines.insert(-1, _row("mean ± std of the folds", mean, names))
    lines += ["", cv_line(result["cv"], names)]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _row(name: str, row: dict, names: list[str]) -> str:
    cells = [_cell(row["mean"]), *(_cell(row["classes"][c]) for c in names)]
    return f"| {name} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |"


def _cell(value) -> str:
    return value if isinstance(value, str) else f"{value:.4f}"


def cv_line(cv: dict, names: list[str]) -> str:
    """The cross-validated validation Dice (mean ± std over folds) and the out-of-fold score."""
    mean, std = cv["mean"], cv["std"]
    parts = [f"val Dice {mean['val_dice']:.4f} ± {std['val_dice']:.4f}"]
    parts += [f"{c} {mean[f'val_dice_{c}']:.4f} ± {std[f'val_dice_{c}']:.4f}"
              for c in names if f"val_dice_{c}" in mean]  # fmt: skip
    oof = cv.get("out_of_fold", {})
    tail = f"; out-of-fold over train/: Dice {_oof_dice(oof):.4f}" if oof else ""
    return (
        "Cross-validation (each fold's best epoch, network resolution): " + ", ".join(parts) + tail
    )


def _oof_dice(oof: dict) -> float:
    return oof.get("mean_foreground_dice", oof.get("dice"))


if __name__ == "__main__":
    sys.exit(main())
