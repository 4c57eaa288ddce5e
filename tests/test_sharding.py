"""Prediction spread over processes: ``torchrun ... medseg predict`` and ``evaluate`` with two gloo
processes on one machine, each rank taking its share of the files.

The runs go through ``tests/sharding_worker.py`` (``python -m medseg`` plus probes: each rank
records every file it wrote, and rank 1 can be made to die partway).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from conftest import child_environment

from medseg.commands.evaluate import evaluate_folder
from medseg.engine.runtime import Ranks
from medseg.metrics import PixelAUC
from medseg.prediction.outputs import RECORD_NAME
from medseg.prediction.shards import Shards

WORKER = Path(__file__).with_name("sharding_worker.py")
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def torchrun(root: Path, name: str, command: list[str], **env: str):
    """``medseg COMMAND`` on two local processes, probed into ``root/name-probes``; returns
    (the finished launcher, each rank's list of written files)."""
    probes = root / f"{name}-probes"
    probes.mkdir()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += ["--nproc-per-node", "2", str(WORKER), str(probes), *command, "--quiet"]
    environment = child_environment(OMP_NUM_THREADS="1", **env)
    process = subprocess.run(
        launch, cwd=root, env=environment, capture_output=True, text=True, timeout=300
    )
    files = [probes / f"rank{rank}.json" for rank in (0, 1)]
    assert all(file.is_file() for file in files), process.stdout[-3000:] + process.stderr[-3000:]
    wrote = [json.loads(file.read_text())["wrote"] for file in files]
    return process, [[Path(path).name for path in files] for files in wrote]


def finished(process: subprocess.CompletedProcess) -> None:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]


def masks_of(names: list[str]) -> list[str]:
    return [name for name in names if name.endswith("_segmentation.png")]


@pytest.fixture
def images(synthetic_root, tmp_path) -> Path:
    """The 12 training images of the synthetic set (SYN_0000 ... SYN_0011), without masks."""
    folder = tmp_path / "images"
    shutil.copytree(synthetic_root / "train" / "images", folder)
    return folder


def test_shares_are_contiguous_balanced_and_cover_everything():
    for count, world in [(12, 2), (13, 2), (5, 3), (2, 4), (0, 2)]:
        items = list(range(count))
        shares = [Shards(Ranks(rank, world)).share(items) for rank in range(world)]
        assert [item for share in shares for item in share] == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert Shards(Ranks()).share("abc") == ["a", "b", "c"]


def test_joined_pixel_auc_is_the_whole_one():
    rng = np.random.default_rng(0)
    images = [(rng.random((20, 30)), rng.random((20, 30)) < 0.3) for _ in range(6)]
    for probability, truth in images:
        probability[truth] += 0.3  # an AUC well above 0.5
    whole, first, second = PixelAUC(), PixelAUC(), PixelAUC()
    for index, (probability, truth) in enumerate(images):
        whole.add(probability, truth)
        (first if index < 4 else second).add(probability, truth)
    assert first.merge(second).value() == whole.value()  # the same pixels in the same order
    assert first.pixels == whole.pixels == 6 * 600
    # Subsampled shares: the joined pixels are thinned to the sparser rate, then to the cap.
    small = [PixelAUC(max_pixels=1000) for _ in range(2)]
    for index, (probability, truth) in enumerate(images):
        small[index // 5].add(probability, truth)  # 5 images (rate 1/4) and 1 image (rate 1)
    assert (small[0].rate, small[1].rate) == (0.25, 1.0)
    joined = small[0].merge(small[1])
    assert joined.rate == 0.25 and joined.pixels <= 1000
    assert joined.value() == pytest.approx(whole.value(), abs=0.05)


@needs_gloo
def test_sharded_predict_writes_every_file_exactly_once(tiny_checkpoint, images):
    root = images.parent
    command = ["predict", "--checkpoint", str(tiny_checkpoint), "-i", "images"]
    process, wrote = torchrun(root, "clean", [*command, "-o", "clean", "--tta", "none"])
    finished(process)
    expected = {f"SYN_{index:04d}_segmentation.png" for index in range(12)}
    assert sorted(masks_of(wrote[0] + wrote[1])) == sorted(expected)  # each exactly once
    assert len(masks_of(wrote[0])) == len(masks_of(wrote[1])) == 6
    assert {path.name for path in (root / "clean").glob("*.png")} == expected
    assert wrote[0].count(RECORD_NAME) == 1 and RECORD_NAME not in wrote[1]
    assert process.stdout.count("12 masks written to clean") == 1  # rank 0 alone prints


@needs_gloo
@pytest.mark.slow
def test_sharded_predict_rerun_after_a_crash_skips_what_is_written(tiny_checkpoint, images):
    root = images.parent
    command = ["predict", "--checkpoint", str(tiny_checkpoint), "-i", "images"]
    expected = {f"SYN_{index:04d}_segmentation.png" for index in range(12)}
    # Rank 1 dies after its 2nd mask; the rerun segments only what is missing.
    crashed, before = torchrun(
        root, "crashed", [*command, "-o", "resumed"], MEDSEG_TEST_CRASH_AFTER="2"
    )
    assert crashed.returncode != 0
    done = {path.name for path in (root / "resumed").glob("*_segmentation.png")}
    assert len(done) >= 2 and len(done) < 12
    rerun, after = torchrun(root, "rerun", [*command, "-o", "resumed"])
    finished(rerun)
    written = Counter(masks_of(before[0] + before[1] + after[0] + after[1]))
    assert set(written) == expected and set(written.values()) == {1}
    assert set(masks_of(after[0] + after[1])) == expected - done
    assert f"{12 - len(done)} masks written to resumed, {len(done)} already there" in rerun.stdout


@needs_gloo
def test_sharded_evaluate_equals_the_single_process_one(tiny_checkpoint, synthetic_root):
    root = synthetic_root.parent
    single = evaluate_folder(
        tiny_checkpoint, synthetic_root / "train", root / "single", progress=False
    )
    process, wrote = torchrun(
        root, "sharded",
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", "synthetic/train", "-o", "two"],
    )  # fmt: skip
    finished(process)
    assert sorted(wrote[0]) == ["per_image.csv", "summary.json"] and wrote[1] == []
    sharded = json.loads((root / "two" / "summary.json").read_text())
    assert sharded["images"] == single["images"] == 12
    assert "auc" in single  # the joined pixel AUC is compared too
    assert sharded == {**json.loads(json.dumps(single)), "data": sharded["data"]}
    assert (root / "two/per_image.csv").read_text() == (root / "single/per_image.csv").read_text()
    assert process.stdout.count("(12 pairs)") == 1  # rank 0 alone prints


@needs_gloo
@pytest.mark.slow
def test_the_documented_two_machine_launch_trains_through_a_rendezvous(synthetic_root):
    """docs/cli.md's launch, with two torchrun agents on this machine standing for two."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    launch += ["--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launch += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "medseg-test"]
    train = ["-m", "medseg", "train", "--data", "synthetic", "--out", "run", "--epochs", "1"]
    train += ["--no-pretrained", "--backbone", "resnet18", "--image-size", "64", "--quiet"]
    environment = child_environment(
        OMP_NUM_THREADS="1", MEDSEG_CACHE_DIR=str(synthetic_root.parent / "cache")
    )
    machines = [
        subprocess.Popen(
            [*launch, *train],
            cwd=synthetic_root.parent,
            env=environment,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [machine.communicate(timeout=300)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], "\n".join(outputs)[-3000:]
    assert "2 processes" in "".join(outputs)
    assert "".join(outputs).count("best validation Dice") == 1  # rank 0 alone reports
    rows = (synthetic_root.parent / "run" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1"]
