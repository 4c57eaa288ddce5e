"""Checkpoints: round trip, refusals (foreign, truncated, other model, pickled code), RNG, atomicity."""

import random

import numpy as np
import pytest
import torch

from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.core.files import atomic_path
from medseg.engine.checkpoint import (
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medseg.model import DeepLabV3Plus


def small_config(backbone="resnet18"):
    return build_config(overrides={"model.backbone": backbone, "model.pretrained": False})


@pytest.fixture
def trained(tmp_path):
    """A resnet18 model whose BatchNorm statistics moved away from their initial values."""
    torch.manual_seed(0)
    config = small_config()
    model = DeepLabV3Plus.from_config(config.model).train()
    model(torch.randn(2, 3, 64, 64))  # updates running means, so they must travel too
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(
        path,
        {
            "config": config.to_dict(),
            "model": model.state_dict(),
            "epoch": 3,
            "metrics": {"dice": 0.5},
        },
    )
    return path, model.eval(), config


def test_round_trip_rebuilds_the_same_model(trained):
    path, model, config = trained
    state = load_checkpoint(path)
    assert state["format"] == "medseg-checkpoint"
    assert state["epoch"] == 3
    assert state["metrics"] == {"dice": 0.5}

    torch.manual_seed(99)  # a different initialisation: only the loaded weights can match
    rebuilt, rebuilt_config = model_from_checkpoint(state, path=path)
    assert rebuilt_config == config
    assert rebuilt.config["backbone"] == "resnet18"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), atol=0, rtol=0)


def test_run_folder_finds_its_best_checkpoint(trained):
    path, _, _ = trained
    assert load_checkpoint(path.parent)["epoch"] == 3


def test_missing_checkpoint(tmp_path):
    with pytest.raises(MedsegError, match="checkpoint not found: .*absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")


def test_plain_state_dict_is_not_a_medseg_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(DeepLabV3Plus.from_config(small_config().model).state_dict(), path)
    with pytest.raises(MedsegError, match="weights.pt is not a medseg checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint(trained, tmp_path):
    path, _, _ = trained
    cut = tmp_path / "cut.pt"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedsegError, match="cut.pt is not a readable checkpoint"):
        load_checkpoint(cut)


@pytest.mark.parametrize("text", ["hello", "train:\n  lr: 1\n"])
def test_text_file_is_not_a_readable_checkpoint(tmp_path, text):
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(MedsegError, match="notes.pt is not a readable checkpoint"):
        load_checkpoint(path)


def test_newer_checkpoint_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    save_checkpoint(path, {"version": 99})
    with pytest.raises(MedsegError, match="newer medseg .*version 99"):
        load_checkpoint(path)


def test_weights_of_another_backbone_are_refused(trained):
    path, _, _ = trained
    state = load_checkpoint(path)
    other = DeepLabV3Plus.from_config(small_config("resnet34").model)
    with pytest.raises(MedsegError, match="made for another model: .* weights missing"):
        load_weights(other, state["model"], path=path)


def test_weights_of_another_shape_are_refused(trained):
    path, _, _ = trained
    weights = dict(load_checkpoint(path)["model"])
    # Five ASPP branches of 256 channels are projected; a checkpoint with four does not fit.
    weights["aspp.project.0.0.weight"] = torch.zeros(256, 1024, 1, 1)
    model = DeepLabV3Plus.from_config(small_config().model)
    expected = r"another model: aspp.project.0.0.weight has shape \(256, 1024, 1, 1\), this model expects \(256, 1280, 1, 1\)"
    with pytest.raises(MedsegError, match=expected):
        load_weights(model, weights, path=path)


def test_checkpoint_with_another_config_fails_to_load_into_it(trained):
    path, _, _ = trained
    state = load_checkpoint(path)
    state["config"]["model"]["backbone"] = "resnet34"
    with pytest.raises(MedsegError, match="made for another model"):
        model_from_checkpoint(state, path=path)


class _Payload:
    """Unpickling this (with full pickle) creates `marker`: it stands for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "medseg-checkpoint", "version": 1, "payload": _Payload(marker)}, path)

    with pytest.raises(MedsegError, match="evil.pt was refused: .*may carry code"):
        load_checkpoint(path)
    assert not marker.exists()

    # The payload is real: full unpickling does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_rng_state_restores_python_numpy_and_torch():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state
    state = rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))

    random.random(), np.random.rand(), torch.rand(1)  # move every stream on
    set_rng_state(state)
    second = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))

    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3])


def test_rng_state_restores_numpys_cached_gaussian():
    np.random.seed(2)
    np.random.randn()  # the legacy generator makes Gaussians in pairs and caches the second
    state = rng_state()
    expected = np.random.randn()
    set_rng_state(state)
    assert np.random.randn() == expected


def test_rng_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": rng_state()})
    expected = (random.random(), np.random.randint(1 << 30), torch.randint(1 << 30, (1,)).item())

    torch.manual_seed(6)
    np.random.seed(6)
    random.seed(6)
    set_rng_state(load_checkpoint(path)["rng"])
    assert (
        random.random(),
        np.random.randint(1 << 30),
        torch.randint(1 << 30, (1,)).item(),
    ) == expected


def test_failing_write_leaves_the_earlier_file_intact(trained):
    path, _, _ = trained
    before = path.read_bytes()

    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as temporary:
        temporary.write_bytes(before[:100])
        raise RuntimeError("disk full")

    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # no temp file left
    assert load_checkpoint(path)["epoch"] == 3


def test_failing_save_checkpoint_leaves_the_earlier_file_intact(trained, monkeypatch):
    path, _, _ = trained
    before = path.read_bytes()

    def crash(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(MedsegError, match="cannot write .*best.pt: No space left on device"):
        save_checkpoint(path, {"epoch": 4})

    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]


def test_predictor_runs_at_the_checkpoints_image_size_not_todays_default(tiny_checkpoint):
    # A model trained at 64×64 must see 64×64 inputs, whatever the default size has become
    # since (it was 256 before the default recipe moved to 160).
    from medseg.config import DataConfig
    from medseg.prediction.predictor import Predictor

    assert DataConfig().image_size != 64
    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", tta="none")
    seen = []
    predictor.model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    (probability,) = predictor.probabilities([image])
    assert seen[0].shape[-2:] == (64, 64)
    assert probability.shape == (50, 70)


def test_a_checkpoint_with_untrained_atrous_taps_loads_with_them_zeroed(tmp_path):
    torch.manual_seed(0)
    config = build_config(
        overrides={"model.backbone": "resnet18", "model.pretrained": False, "data.image_size": 128}
    )
    model = DeepLabV3Plus.from_config(config.model)  # random off-centre taps, as before the fix
    state = {"config": config.to_dict(), "model": model.state_dict()}

    rebuilt, _ = model_from_checkpoint(state, path=tmp_path / "old.pt")

    for rate, kept in ((6, True), (12, False), (18, False)):
        corner = rebuilt.aspp.atrous(rate).weight[..., 0, 0]
        assert bool(corner.abs().sum() > 0) is kept, rate
