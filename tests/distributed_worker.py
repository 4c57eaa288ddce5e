"""``medseg train`` with probes, launched by tests/test_distributed.py under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/distributed_worker.py PROBE_DIR train --data ... --out ...

Runs ``medseg.cli.main`` as ``python -m medseg`` would, after wrapping functions of
``medseg.engine.train`` so that each rank records, in ``PROBE_DIR/rank<N>.json``, the ids of the
images it trained on (per epoch) and the files it wrote, and saves its model's state dict as it
was validated after epoch E to ``PROBE_DIR/rank<N>-epoch<E>.pt``. With
``MEDSEG_TEST_STOP_AT_EPOCH=k`` every rank raises KeyboardInterrupt as epoch k starts (once rank 0
has saved epoch k - 1): an interruption to resume from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from medseg import cli
from medseg.engine import train

RANK = int(os.environ.get("RANK", 0))
STOP_AT_EPOCH = int(os.environ.get("MEDSEG_TEST_STOP_AT_EPOCH", 0))


class RecordingLoader:
    """Iterates a DataLoader, noting the ids of every batch."""

    def __init__(self, loader, ids: list[str]):
        self.loader = loader
        self.ids = ids

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.ids.extend(batch["id"])
            yield batch


def main() -> int:
    probe_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    record: dict = {"rank": RANK, "trained_ids": {}, "wrote": []}
    original_train = train.train_one_epoch
    original_evaluate = train.evaluate_loader
    original_save = train.save_checkpoint
    original_history = train._write_history

    def train_one_epoch(model, loader, **options):
        if options["epoch"] == STOP_AT_EPOCH:
            dist.barrier()  # rank 0 has written the last checkpoint
            raise KeyboardInterrupt
        ids = record["trained_ids"].setdefault(str(options["epoch"]), [])
        return original_train(model, RecordingLoader(loader, ids), **options)

    def evaluate_loader(model, loader, **options):
        epoch = max(int(epoch) for epoch in record["trained_ids"])  # the epoch just trained
        torch.save(model.state_dict(), probe_dir / f"rank{RANK}-epoch{epoch}.pt")
        return original_evaluate(model, loader, **options)

    def save_checkpoint(path, state):
        record["wrote"].append(str(path))
        return original_save(path, state)

    def write_history(out_dir, history):
        record["wrote"].append(str(Path(out_dir) / "metrics.csv"))
        return original_history(out_dir, history)

    train.train_one_epoch = train_one_epoch
    train.evaluate_loader = evaluate_loader
    train.save_checkpoint = save_checkpoint
    train._write_history = write_history
    try:
        return cli.main(argv)
    finally:
        (probe_dir / f"rank{RANK}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
