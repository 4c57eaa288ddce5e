"""Runtime choices: precision, SyncBatchNorm, torch.compile with its fallback, rank helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medseg.cli import main
from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.engine.runtime import (
    CompiledOrEager,
    Ranks,
    all_gather_counts,
    mean_across_ranks,
    parse_device,
    select_device,
    select_precision,
    sync_batchnorm,
)
from medseg.engine.train import fit


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
    with pytest.raises(MedsegError, match="fp16 needs a CUDA or MPS device"):
        select_precision("fp16", cpu)


@pytest.mark.parametrize(("override", "chosen"), [("0", "fp32"), ("1", "bf16")])
def test_medseg_cpu_bf16_makes_auto_choose_as_on_the_other_kind_of_cpu(
    monkeypatch, override, chosen
):
    monkeypatch.setenv("MEDSEG_CPU_BF16", override)
    assert select_precision("auto", torch.device("cpu")).name == chosen


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("cpu", torch.device("cpu")),
        ("mps", torch.device("mps")),
        ("cuda", torch.device("cuda")),
        ("cuda:0", torch.device("cuda", 0)),
        ("cuda:12", torch.device("cuda", 12)),
    ],
)
def test_parse_device_reads_the_valid_forms(name, device):
    assert parse_device(name) == device


@pytest.mark.parametrize(
    "name", ["foo", "", "CPU", "cuda:", "cuda:-1", "cuda:0x", "gpu", "cpu:0", "mps:1"]
)
def test_parse_device_refuses_anything_else_in_one_line(name):
    with pytest.raises(
        MedsegError, match="unknown device .*; use auto, cpu, mps, cuda or cuda:N"
    ) as error:
        parse_device(name)
    assert repr(name) in str(error.value) and "\n" not in str(error.value)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert parse_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert parse_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parse_device("auto") == torch.device("cuda", 1)


def test_select_device_refuses_devices_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(MedsegError, match="CUDA is not available; use --device cpu"):
        select_device("cuda:0")
    with pytest.raises(MedsegError, match="MPS is not available; use --device cpu"):
        select_device("mps")
    with pytest.raises(MedsegError, match="unknown device 'foo'"):
        select_device("foo")


def test_cli_names_a_bad_device_in_one_line(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), "--input", str(image)]
    assert main([*argv, "--output", str(tmp_path / "out"), "--device", "foo"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown device 'foo'" in error[0]


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="Apple's MPS is not available")
def test_auto_runs_on_mps_in_float32_where_there_is_one():
    device = select_device("auto")
    assert device.type == "mps"
    assert select_precision("auto", device).dtype is None
    network = small_network().to(device)
    assert network(torch.randn(2, 3, 8, 8, device=device)).device.type == "mps"


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


def test_the_allocator_is_tuned_by_the_inference_commands_only(monkeypatch, tmp_path):
    import subprocess
    import sys

    from medseg.cli import main
    from medseg.engine import runtime

    probe = "from medseg.engine.runtime import tune_allocator; print(tune_allocator())"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "True"  # glibc here: mallopt took every setting
    monkeypatch.setenv("MEDSEG_TUNE_MALLOC", "0")
    assert runtime.tune_allocator() is False  # the way out

    tuned = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: tuned.append(True))
    missing = str(tmp_path / "missing.pt")
    main(["predict", "--checkpoint", missing, "-i", str(tmp_path), "-o", str(tmp_path / "o")])
    assert tuned == [True]
    main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert tuned == [True]  # training keeps glibc's defaults
