"""Does a change alter what training computes? The default command from two commits, compared.

    python benchmarks/same_training.py --before 3a1e4c8           # ISIC, the first 2 epochs
    python benchmarks/same_training.py --before COMMIT --data DATA --epochs 3

The ``--before`` commit is checked out into a temporary git worktree and run from its own
``src/`` with this environment's packages; the other side is this working tree. Each runs
``medseg train --data DATA --out RUN --no-pretrained`` with its planned schedule, so that the
learning rate follows the full run's curve, and is stopped once ``metrics.csv`` holds
``--epochs`` rows. The rows are compared value by value (all but the seconds), and the two
networks as this tree's medseg loads them, tensor by tensor. CPU training in float32 is
deterministic for one seed and thread count, so identical early epochs mean an identical full
run on this machine: what a commit does to a result measured elsewhere, in other precisions,
is told apart from what it does to the code path.

Written for the multi-class work: binary masks must train exactly as before it (3a1e4c8 is the
last commit before it).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import hardware

from medseg.engine.checkpoint import load_checkpoint, model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2017"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkout = Path(folder) / "before"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(checkout), args.before],
            check=True,
            capture_output=True,
        )
        try:
            runs = {
                side: _train(source, args.data, Path(folder) / side, args.epochs)
                for side, source in [("before", checkout / "src"), ("after", REPO / "src")]
            }
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(checkout)],
                check=True,
            )
        print(_report(args, runs))
    print(f"\n{hardware()}")
    return 0


def _train(source: Path, data: Path, out: Path, epochs: int) -> dict:
    """The first ``epochs`` rows of ``metrics.csv`` and the network of the default command run
    from ``source``, stopped after them."""
    command = [sys.executable, "-m", "medseg", "train", "--data", str(data), "--out", str(out)]
    environment = {**os.environ, "PYTHONPATH": str(source)}
    with open(f"{out}.log", "w") as log:
        process = subprocess.Popen(
            [*command, "--no-pretrained"], env=environment, stdout=log, stderr=log
        )
        rows = []
        while process.poll() is None and len(rows) < epochs:
            time.sleep(2)
            rows = _rows(out / "metrics.csv")
        process.terminate()
        process.wait()
    if len(rows) < epochs:
        raise SystemExit(f"training from {source} stopped after {len(rows)} epochs: see {out}.log")
    path = out / "checkpoints" / "last.pt"
    network, _ = model_from_checkpoint(load_checkpoint(path), path=path)
    return {"rows": rows[:epochs], "weights": network.state_dict()}


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def _report(args, runs: dict) -> str:
    before, after = runs["before"], runs["after"]
    columns = list(before["rows"][0])
    lines = [
        f"The default command on {args.data}, first {args.epochs} epochs: {args.before} "
        "(before) against this working tree (after).",
        "",
        "| epoch | side | " + " | ".join(columns[1:]) + " |",
        "|---|---|" + "---:|" * (len(columns) - 1),
    ]
    for old, new in zip(before["rows"], after["rows"], strict=True):
        for side, row in [("before", old), ("after", new)]:
            values = " | ".join(row[column] for column in columns[1:])
            lines.append(f"| {row['epoch']} | {side} | {values} |")
    same_rows = before["rows"] == after["rows"]
    names = [name for name in before["weights"] if name in after["weights"]]
    equal = [name for name in names if torch.equal(before["weights"][name], after["weights"][name])]
    only = set(before["weights"]) ^ set(after["weights"])
    lines += [
        "",
        f"metrics rows identical: {'yes' if same_rows else 'NO'}; "
        f"network tensors identical: {len(equal)} of {len(names)}"
        + (f", {len(only)} in one network only" if only else ""),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
