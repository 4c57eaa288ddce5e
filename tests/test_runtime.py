"""Runtime choices: precision, SyncBatchNorm, torch.compile with its fallback, rank helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.config import build_config
from medseg.engine.runtime import (
    CompiledOrEager,
    Ranks,
    all_gather_counts,
    mean_across_ranks,
    select_precision,
    sync_batchnorm,
)
from medseg.engine.train import fit
from medseg.errors import MedsegError


def small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def broken_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found\nsecond line of the story")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert select_precision("fp32", cpu).dtype is None
    assert select_precision("bf16", cpu).dtype is torch.bfloat16
    assert select_precision("auto", cpu).name in ("bf16", "fp32")
    with pytest.raises(MedsegError, match="fp16 needs a CUDA device"):
        select_precision("fp16", cpu)


def test_sync_batchnorm_is_for_several_gpu_processes():
    network = small_network()
    assert sync_batchnorm(network, device=torch.device("cpu"), ranks=Ranks()) is network
    with pytest.raises(MedsegError, match="SyncBatchNorm does not run on CPUs"):
        sync_batchnorm(network, device=torch.device("cpu"), ranks=Ranks(rank=0, world_size=2))


def test_one_process_reductions_are_the_identity():
    counts = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(all_gather_counts(counts, Ranks()), counts)
    assert mean_across_ranks(0.25, Ranks(), weight=3) == 0.25
    assert mean_across_ranks(0.25, Ranks(), weight=0) == 0.25


def test_compiled_network_computes_what_the_network_does():
    network = small_network()
    images = torch.randn(2, 3, 8, 8)
    compiled = CompiledOrEager(network, backend="eager")
    assert torch.allclose(compiled(images), network(images))
    assert not compiled.failed
    # The wrapper adds no parameters of its own, and lists the network's once.
    assert list(compiled.parameters()) == list(network.parameters())


class RaisesOutOfMemory(nn.Module):
    def forward(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize(
    ("network", "images", "error"),
    [
        (RaisesOutOfMemory(), torch.randn(2, 3, 8, 8), torch.OutOfMemoryError),
        (nn.Linear(5, 2), torch.randn(2, 3), RuntimeError),  # mat1 and mat2 shapes differ
    ],
    ids=["out-of-memory", "shape-mismatch"],
)
def test_errors_of_the_network_itself_propagate_and_compile_stays_on(
    network, images, error, capsys
):
    compiled = CompiledOrEager(network, backend="eager")
    with pytest.raises(error) as raised:
        compiled(images)
    assert type(raised.value) is error  # not torch's wrapper of it
    assert not compiled.failed
    assert "torch.compile failed" not in capsys.readouterr().err


def test_failed_compile_warns_once_and_runs_uncompiled(capsys):
    network = small_network()
    images = torch.randn(2, 3, 8, 8)
    compiled = CompiledOrEager(network, backend=broken_backend)
    first, second = compiled(images), compiled(images)
    assert compiled.failed
    assert torch.allclose(first, network(images)) and torch.allclose(second, first)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1
    assert warning[0].startswith("medseg: warning: torch.compile failed")
    assert "no C++ compiler found" in warning[0] and warning[0].endswith("continuing uncompiled")


def test_training_with_compile_survives_a_failing_compiler(synthetic_root, tmp_path, monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda module, **_: compile_(module, backend=broken_backend)
    )
    config = build_config(
        overrides={
            "model.backbone": "resnet18",
            "model.pretrained": False,
            "data.image_size": 64,
            "train.epochs": 1,
            "train.batch_size": 4,
            "train.compile": True,
        }
    )
    summary = fit(config, synthetic_root, tmp_path / "run", progress=False)
    assert summary["epochs"] == 1
    assert (tmp_path / "run/checkpoints/last.pt").is_file()
