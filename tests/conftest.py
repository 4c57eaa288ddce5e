"""Shared fixtures: a few real ISIC pairs or a tiny synthetic set in a temp dir; a private cache."""

import contextlib
import os
import platform
import shutil
from pathlib import Path

import pytest
import torch

from medseg.data.synthetic import make_synthetic_dataset

# The 2 cores are shared with other jobs: two intra-op threads then wait on each other and run
# several times slower than one (model tests: 70 s instead of 11 s under load). OMP_NUM_THREADS
# set by the caller still wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# Pinned values are recorded in float32 ("fp32"), which every CPU computes alike; the bf16 path
# (native on CPUs with AVX-512 BF16 or AMX, emulated by PyTorch elsewhere) is checked against
# them within bfloat16's precision: its 8-bit mantissa rounds each value by up to 2^-9 relative,
# compounded through the network's layers.
PRECISIONS = ("fp32", "bf16")
PROBABILITY_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}

# /work/shared/data/isic2017 beside the checkout: read-only, so tests copy what they need.
ISIC_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2017"


def pytest_report_header(config):
    """Which CPU ran the tests and the precision medseg's 'auto' chose on it (CI logs show both)."""
    from medseg.engine.runtime import select_precision

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
        ]
        model = names[0].split(":", 1)[1].strip() if names else model
    chosen = select_precision("auto", torch.device("cpu")).name
    override = os.environ.get("MEDSEG_CPU_BF16")
    told = f" (MEDSEG_CPU_BF16={override}: as on the other kind of CPU)" if override else ""
    return f"CPU: {model}; medseg's precision 'auto' on it: {chosen}{told}"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Point medseg's prepared-data cache at a temp folder, so no test writes to ~/.cache."""
    folder = tmp_path_factory.mktemp("medseg-cache")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def isic_root():
    """The shared 256×256 ISIC 2017 set (read-only); the test is skipped where it is missing."""
    if not (ISIC_ROOT / "train" / "images").is_dir():
        pytest.skip(f"ISIC 2017 data not found at {ISIC_ROOT}")
    return ISIC_ROOT


def _copy_pairs(source: Path, target: Path, count: int) -> None:
    (target / "images").mkdir(parents=True)
    (target / "masks").mkdir(parents=True)
    for image in sorted((source / "images").glob("*.jpg"))[:count]:
        mask = source / "masks" / f"{image.stem}_segmentation.png"
        # copyfile, not copy: the shared files are read-only and the copies must be writable.
        shutil.copyfile(image, target / "images" / image.name)
        shutil.copyfile(mask, target / "masks" / mask.name)


@pytest.fixture
def small_isic(isic_root, tmp_path):
    """12 train and 4 test real pairs, copied into ``tmp_path/isic/{train,test}``."""
    root = tmp_path / "isic"
    _copy_pairs(isic_root / "train", root / "train", 12)
    _copy_pairs(isic_root / "test", root / "test", 4)
    return root


@pytest.fixture
def synthetic_root(tmp_path):
    """12 train and 4 test synthetic 64×64 pairs (ids SYN_0000 ... SYN_0015)."""
    return make_synthetic_dataset(tmp_path / "synthetic", n_train=12, n_test=4, size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained resnet18 checkpoint for 64×64 inputs: enough to predict, evaluate, visualize.

    Shared by the whole session: copy it before changing it.
    """
    from medseg.config import build_config
    from medseg.engine.checkpoint import save_checkpoint
    from medseg.model import DeepLabV3Plus

    config = build_config(
        overrides={"model.backbone": "resnet18", "model.pretrained": False, "data.image_size": 64}
    )
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "best.pt"
    save_checkpoint(
        path, {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    )
    return path


@pytest.fixture
def tiny_flags():
    """`medseg train` flags for a model small and fast enough for a test: resnet18 at 64×64."""
    return [
        *("--no-pretrained", "--backbone", "resnet18", "--image-size", "64"),
        *("--batch-size", "4", "--quiet"),
    ]


@pytest.fixture(autouse=True)
def restore_determinism_flag():
    """--deterministic switches torch's global flag on; keep it from leaking into other tests."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


JSRT_ROOT = ISIC_ROOT.parent / "jsrt"
TWO_CLASSES = {"background": 0, "disc": 1, "bar": 2}


def write_label_map_set(root: Path, *, n_train: int = 8, n_test: int = 2, size: int = 48, seed=0):
    """Grayscale images with two structures (a bright disc = 1, a dark bar = 2) as label maps."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, count in (("train", n_train), ("test", n_test)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for index in range(count):
            cy, cx, radius = rng.integers(14, size - 14), rng.integers(14, size - 14), size // 6
            labels = np.zeros((size, size), np.uint8)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = 1
            top = rng.integers(2, size - 8)
            labels[top : top + 4, 4 : size - 4] = 2
            image = 100 + 80 * (labels == 1) - 60 * (labels == 2) + rng.normal(0, 8, labels.shape)
            name = f"CASE_{split}_{index:03d}"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                root / split / "images" / f"{name}.png"
            )
            Image.fromarray(labels).save(root / split / "masks" / f"{name}_segmentation.png")
    (root / "dataset.json").write_text(json.dumps({"labels": TWO_CLASSES, "channels": 1}))
    return root


@pytest.fixture
def label_map_root(tmp_path):
    """8 train and 2 test grayscale 48×48 images with 3-class label maps and a dataset.json."""
    return write_label_map_set(tmp_path / "labelled")


@pytest.fixture
def small_jsrt(tmp_path):
    """6 train and 2 test real JSRT pairs (512×512, 6 classes) with their dataset.json."""
    if not (JSRT_ROOT / "train" / "images").is_dir():
        pytest.skip(f"JSRT data not found at {JSRT_ROOT}")
    root = tmp_path / "jsrt"
    for split, count in (("train", 6), ("test", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for image in sorted((JSRT_ROOT / split / "images").glob("*.png"))[:count]:
            mask = JSRT_ROOT / split / "masks" / f"{image.stem}_segmentation.png"
            shutil.copyfile(image, root / split / "images" / image.name)
            shutil.copyfile(mask, root / split / "masks" / mask.name)
    shutil.copyfile(JSRT_ROOT / "dataset.json", root / "dataset.json")
    return root


def one_line_failure(capsys, argv, *, status=2, expect=()):
    """Run `medseg argv`: it must fail with ``status`` (2: bad input) in exactly one line, no
    traceback, holding each of ``expect``; returns the line."""
    from medseg.cli import main

    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("medseg: error: " if status == 2 else "medseg: ")
    for fragment in expect:
        assert str(fragment) in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for a medseg child process (torchrun): this one's without medseg's own
    variables, which the test sets itself, except MEDSEG_CPU_BF16, so that parent and child
    choose the same precision."""
    kept = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MEDSEG") or key == "MEDSEG_CPU_BF16"
    }
    return {**kept, **extra}
