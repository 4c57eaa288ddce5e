"""Distributed training: two CPU processes (gloo) under torchrun, on tiny synthetic data.

The runs go through ``tests/distributed_worker.py``, which is ``python -m medseg`` plus probes:
each rank records the images it trained on and the files it wrote, and saves its model after
each epoch. The resumed run is plain ``python -m medseg train --resume``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchvision
from conftest import child_environment

from medseg.data.sampler import EpochSampler
from medseg.data.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORKER = Path(__file__).with_name("distributed_worker.py")
TRAIN_ARGS = ["--backbone", "resnet18", "--image-size", "64", "--epochs", "2", "--batch-size", "2"]
STEPS_PER_EPOCH = 3  # 14 training images (2 held out), 7 per rank, batches of 2, last dropped


def torchrun(target: list[str], *, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Two processes on free local ports; returns the finished launcher (output captured)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *target, "--quiet"]
    environment = child_environment(MEDSEG_CACHE_DIR=str(cwd / "cache"), OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def probed_train(root: Path, name: str, args: list[str], **env: str):
    """A probed ``medseg train`` into ``root/name``; returns (launcher, probe folder)."""
    probes = root / f"{name}-probes"
    probes.mkdir()
    target = [str(WORKER), str(probes), "train", "--data", "data", "--out", name, *args]
    return torchrun(target, cwd=root, **env), probes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch run; the same run interrupted after epoch 1 and resumed; a frozen-backbone run."""
    root = tmp_path_factory.mktemp("distributed")
    make_synthetic_dataset(root / "data", n_train=16, n_test=4, size=64)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), root / "resnet18.pth")
    scratch = [*TRAIN_ARGS, "--no-pretrained"]
    straight, probes = probed_train(root, "straight", scratch)
    interrupted, _ = probed_train(root, "resumed", scratch, MEDSEG_TEST_STOP_AT_EPOCH="2")
    interrupted_epoch = torch.load(root / "resumed/checkpoints/last.pt", weights_only=True)["epoch"]
    resumed = torchrun(["-m", "medseg", "train", "--resume", "resumed"], cwd=root)
    frozen_args = [*TRAIN_ARGS, "--pretrained", "resnet18.pth", "--freeze-backbone-epochs", "1"]
    frozen, frozen_probes = probed_train(root, "frozen", frozen_args)
    return {
        "root": root,
        "straight": straight,
        "probes": probes,
        "interrupted": interrupted,
        "interrupted_epoch": interrupted_epoch,
        "resumed": resumed,
        "frozen": frozen,
        "frozen_probes": frozen_probes,
    }


def finished(process: subprocess.CompletedProcess) -> None:
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]


def load_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return state.get("model", state)


def assert_same_model(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


def test_epoch_sampler_gives_each_rank_its_own_share():
    for length, world_size in [(14, 2), (15, 2), (16, 3), (5, 4)]:
        epoch_items = []
        for even in (True, False):
            shards = []
            for rank in range(world_size):
                sampler = EpochSampler(length, seed=3, rank=rank, world_size=world_size, even=even)
                sampler.set_epoch(2)
                shards.append(list(sampler))
                assert len(shards[-1]) == len(sampler)
            indices = [index for shard in shards for index, _ in shard]
            assert sorted(set(indices)) == list(range(length))  # nothing left out
            padding = -length % world_size if even else 0  # wrapped around to even the shares
            assert len(indices) == length + padding
            if even:
                assert {len(shard) for shard in shards} == {(length + padding) // world_size}
            epoch_items.append({item for shard in shards for item in shard})
        # Each image keeps its augmentation seed whatever the world size and the padding.
        single = EpochSampler(length, seed=3)
        single.set_epoch(2)
        assert epoch_items[0] == epoch_items[1] == set(single)


def test_two_processes_finish_and_only_rank_0_writes(runs):
    finished(runs["straight"])
    assert "2 processes" in runs["straight"].stdout
    records = [json.loads((runs["probes"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[1]["wrote"] == []
    written = {Path(path).name for path in records[0]["wrote"]}
    assert written == {"best.pt", "last.pt", "metrics.csv"}
    rows = (runs["root"] / "straight/metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2"]


def test_ranks_train_on_different_images(runs):
    finished(runs["straight"])
    trained = [
        json.loads((runs["probes"] / f"rank{r}.json").read_text())["trained_ids"] for r in (0, 1)
    ]
    for epoch in ("1", "2"):
        first, second = trained[0][epoch], trained[1][epoch]
        assert len(first) == len(second) == 2 * STEPS_PER_EPOCH
        assert not set(first) & set(second)
    assert trained[0]["1"] != trained[0]["2"]  # a new order every epoch


def test_every_rank_ends_with_the_model_rank_0_saved(runs):
    finished(runs["straight"])
    saved = load_state(runs["root"] / "straight/checkpoints/last.pt")
    for rank in (0, 1):
        assert_same_model(load_state(runs["probes"] / f"rank{rank}-epoch2.pt"), saved)
    # The check has teeth: weights and BatchNorm statistics moved during epoch 2.
    after_epoch_1 = load_state(runs["probes"] / "rank1-epoch1.pt")
    for key in ("decoder.classifier.weight", "backbone.layer1.0.bn1.running_mean"):
        assert not torch.equal(after_epoch_1[key], saved[key])


def test_resumed_run_matches_the_uninterrupted_one(runs):
    assert runs["interrupted"].returncode != 0  # stopped by KeyboardInterrupt at epoch 2
    assert runs["interrupted_epoch"] == 1
    finished(runs["resumed"])
    resumed = torch.load(runs["root"] / "resumed/checkpoints/last.pt", weights_only=True)
    straight = torch.load(runs["root"] / "straight/checkpoints/last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    assert_same_model(resumed["model"], straight["model"])
    for resumed_row, straight_row in zip(resumed["history"], straight["history"], strict=True):
        assert {**resumed_row, "seconds": 0} == {**straight_row, "seconds": 0}


def test_frozen_backbone_stays_fixed_across_ranks(runs):
    finished(runs["frozen"])
    imagenet = torch.load(runs["root"] / "resnet18.pth", weights_only=True)
    saved = load_state(runs["root"] / "frozen/checkpoints/last.pt")
    after_epoch_1 = load_state(runs["frozen_probes"] / "rank1-epoch1.pt")
    for key in ("layer1.0.conv1.weight", "layer3.1.bn2.running_var"):
        assert torch.equal(after_epoch_1[f"backbone.{key}"], imagenet[key])  # frozen in epoch 1
        assert not torch.equal(saved[f"backbone.{key}"], imagenet[key])  # trained in epoch 2
    assert_same_model(load_state(runs["frozen_probes"] / "rank1-epoch2.pt"), saved)
