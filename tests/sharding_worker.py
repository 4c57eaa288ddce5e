"""``medseg predict`` / ``evaluate`` with probes, launched by tests/test_sharding.py under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/sharding_worker.py PROBE_DIR predict --checkpoint ... -i ... -o ...

Runs ``medseg.cli.main`` as ``python -m medseg`` would, after wrapping the writers of
``medseg.commands.predict``, ``medseg.commands.evaluate`` and ``medseg.prediction.outputs`` so that each rank records, in
``PROBE_DIR/rank<N>.json``, every file it wrote. With ``MEDSEG_TEST_CRASH_AFTER=k`` rank 1 dies
(``os._exit``, as a killed process would) after writing its k-th mask: a failure to rerun after.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from medseg import cli
from medseg.commands import evaluate, predict
from medseg.prediction import outputs

RANK = int(os.environ.get("RANK", 0))
CRASH_AFTER = int(os.environ.get("MEDSEG_TEST_CRASH_AFTER", 0))


def main() -> int:
    probe_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    wrote: list[str] = []

    def save() -> None:
        (probe_dir / f"rank{RANK}.json").write_text(json.dumps({"rank": RANK, "wrote": wrote}))

    original_outputs, original_text = predict.write_outputs, outputs.write_text
    original_csv = evaluate.write_csv

    def write_outputs(output, path, image, probability, predictor, files):
        original_outputs(output, path, image, probability, predictor, files)
        wrote.extend(str(Path(output) / name) for name in files)
        save()
        if RANK == 1 and CRASH_AFTER and len(wrote) >= CRASH_AFTER:
            os._exit(1)

    def write_text(path, text):
        original_text(path, text)
        wrote.append(str(path))
        save()

    def write_csv(path, rows, columns):
        original_csv(path, rows, columns)
        wrote.append(str(path))
        save()

    predict.write_outputs, outputs.write_text = write_outputs, write_text
    evaluate.write_text, evaluate.write_csv = write_text, write_csv
    save()
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
