"""What the moving average of the weights (``--ema``) costs a training step.

    python benchmarks/ema_cost.py                          # EfficientNet-Lite0, 192×192, batch 16
    python benchmarks/ema_cost.py --backbone resnet50 --size 160
    python benchmarks/ema_cost.py --quick                  # smoke run: 64×64, batch 2

One network, one process: training steps (forward, Dice+BCE, backward, AdamW) in the recipe's
precision and memory format, timed alternately without and with the average's update after
each step (A, B, A, B, ... so that a machine slowing down or speeding up weighs on both), and
the update on its own. Prints the medians and the ratio and writes the same table to
``benchmarks/results/ema-cost.txt`` (``--out``; ``--quick`` writes nothing). The average's other
cost, one more validation pass an epoch, depends on the validation set and is not counted here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import hardware

from medseg.engine.ema import WeightAverage
from medseg.engine.runtime import select_precision
from medseg.losses import build_loss
from medseg.model.deeplab import DeepLabV3Plus

RESULT = Path(__file__).resolve().parent / "results" / "ema-cost.txt"


def main() -> int:
    args = parse_args()
    if args.quick:
        args.size, args.batch, args.repeats = 64, 2, 3
    model = DeepLabV3Plus(1, args.backbone).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss("dice_bce")
    average = WeightAverage(model, decay=0.999)
    cpu = torch.device("cpu")
    precision = select_precision(args.precision, cpu)
    images = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=torch.channels_last)
    masks = (torch.rand(args.batch, 1, args.size, args.size) > 0.5).float()

    def step(with_average: bool) -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(cpu):
            loss = loss_fn(model(images), masks)
        loss.backward()
        optimizer.step()
        if with_average:
            average.update(model)
        return time.perf_counter() - start

    step(False)  # warm-up
    step(True)
    plain, averaged = [], []
    for _ in range(args.repeats):
        plain.append(step(False))
        averaged.append(step(True))
    updates = [timed(lambda: average.update(model)) for _ in range(20)]
    table = format_table(
        args, precision.name, statistics.median(plain), statistics.median(averaged), updates
    )
    print(table)
    if not args.quick:
        args.out.write_text(table + "\n")
        print(f"\nwritten: {args.out}")
    return 0


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def format_table(
    args: argparse.Namespace, precision: str, plain: float, averaged: float, updates: list
) -> str:
    update = statistics.median(updates)
    return "\n".join(
        [
            f"{hardware()}; {args.backbone}, {args.size}×{args.size}, batch {args.batch}, "
            f"{precision}, medians of {args.repeats}",
            "",
            "| step | seconds | ratio |",
            "|---|---:|---:|",
            f"| training step | {plain:.3f} | 1.00 |",
            f"| training step + average's update | {averaged:.3f} | {averaged / plain:.2f} |",
            f"| the update alone (median of 20) | {update:.4f} | {update / plain:.3f} |",
        ]
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--precision", default="auto", help="auto (the recipe's), bf16, fp32")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the table")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
