"""The moving average of the weights: its update by hand, its checkpointing and exact resume."""

import csv

import pytest
import torch
from torch import nn

from medseg.engine.checkpoint import load_checkpoint
from medseg.engine.ema import WeightAverage, best_checkpoint, kept_weights
from medseg.engine.train import fit

TINY = {
    "model.backbone": "resnet18",
    "model.pretrained": False,
    "data.image_size": 64,
    "train.batch_size": 4,
    "train.deterministic": True,
    "train.ema": True,
}


def tiny_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    return model


def test_the_update_by_hand_with_its_warm_up():
    model = tiny_model()
    average = WeightAverage(model, decay=0.999)
    assert not average.model.training
    assert not any(p.requires_grad for p in average.model.parameters())
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].running_mean.fill_(5.0)
    assert average.current_decay() == pytest.approx(1 / 10)  # (1 + 0) / (10 + 0)
    average.update(model)
    # 0.1 × 1 + 0.9 × 2
    assert average.model[0].weight.item() == pytest.approx(1.9)
    assert average.model[1].running_mean.item() == 5.0  # buffers copied, not averaged
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    average.update(model)
    # decay 2/11: 2/11 × 1.9 + 9/11 × 3 = 30.8 / 11
    assert average.model[0].weight.item() == pytest.approx(2.8)
    assert model[0].weight.item() == 3.0  # the model itself is untouched
    average.updates = 20_000
    assert average.current_decay() == 0.999  # the warm-up ends at the decay asked for


def test_best_pt_holds_whichever_validated_better():
    checkpoint = {"model": {"w": torch.zeros(1)}, "ema": {"model": {"w": torch.ones(1)}}}
    weights_better = {"val_dice": 0.8, "val_dice_ema": 0.7}
    average_better = {"val_dice": 0.8, "val_dice_ema": 0.81}
    assert kept_weights(weights_better) == (0.8, "weights")
    assert kept_weights(average_better) == (0.81, "average")
    assert kept_weights({"val_dice": 0.5}) == (0.5, "weights")
    best = best_checkpoint(checkpoint, average_better)
    assert best["weights"] == "average" and best["model"]["w"].item() == 1.0
    best = best_checkpoint(checkpoint, weights_better)
    assert best["weights"] == "weights" and best["model"]["w"].item() == 0.0


def test_the_average_is_validated_saved_and_resumed_exactly(synthetic_root, tmp_path, monkeypatch):
    from medseg.config import build_config
    from medseg.engine import train

    config = build_config(overrides={**TINY, "train.epochs": 3})
    whole = fit(config, synthetic_root, tmp_path / "whole", progress=False)

    # The same run stopped after its first epoch (as Ctrl-C would), then resumed.
    report = train._report_epoch

    def interrupt_after_first(row, epochs, improved):
        report(row, epochs, improved)
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_report_epoch", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        fit(config, synthetic_root, tmp_path / "resumed", progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["ema"]["updates"] == 2
    monkeypatch.setattr(train, "_report_epoch", report)
    fit(None, synthetic_root, tmp_path / "resumed", resume=True, progress=False)

    last = {
        name: load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")
        for name in ("whole", "resumed")
    }
    assert last["whole"]["ema"]["updates"] == 6  # 2 steps an epoch, 3 epochs
    for key, tensor in last["whole"]["ema"]["model"].items():
        assert torch.equal(last["resumed"]["ema"]["model"][key], tensor), key
    # The average trails the weights: it is not a copy of them.
    differs = [
        key
        for key, tensor in last["whole"]["model"].items()
        if tensor.is_floating_point()
        and not torch.equal(last["whole"]["ema"]["model"][key], tensor)
    ]
    assert "decoder.classifier.weight" in differs

    with open(tmp_path / "whole" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "val_dice_ema" in rows[0] and len(rows) == 3
    best = load_checkpoint(tmp_path / "whole" / "checkpoints" / "best.pt")
    best_row = {key: float(value) for key, value in rows[best["epoch"] - 1].items()}
    assert "ema" not in best and best["weights"] == kept_weights(best_row)[1]
    assert whole["best_val_dice"] == pytest.approx(  # metrics.csv rounds to 7 digits
        max(max(float(row["val_dice"]), float(row["val_dice_ema"])) for row in rows), abs=1e-6
    )
