"""The training pieces: the learning-rate schedule, the epoch plan, and the training state."""

import math

import pytest
import torch

from medseg.config import build_config
from medseg.data.plan import MIN_EPOCHS, MIN_PATCH_STEPS, MIN_STEPS, planned_epochs
from medseg.engine.train import build_optimizer, build_scheduler, learning_rate_factor
from medseg.model import DeepLabV3Plus


@pytest.mark.parametrize(
    ("step", "schedule", "expected"),
    [
        (0, "cosine", 0.01),  # warm-up starts at a hundredth of the peak
        (5, "cosine", 0.01 + 0.99 * 5 / 10),
        (10, "cosine", 1.0),  # the peak, where warm-up ends
        (55, "cosine", 0.5),  # half way through the cosine
        (100, "cosine", 0.0),
        (55, "poly", 0.5**0.9),
        (55, "constant", 1.0),
        (500, "cosine", 0.0),  # past the end it stays at the end
    ],
)
def test_learning_rate_factor_by_hand(step, schedule, expected):
    factor = learning_rate_factor(step, total_steps=100, warmup_steps=10, schedule=schedule)
    assert factor == pytest.approx(expected)


def test_the_scheduler_follows_the_factor_over_the_run():
    config = build_config(overrides={"train.epochs": 4, "train.warmup_epochs": 1.0})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.2 * 0.01)
    assert rates[5] == pytest.approx(0.2)  # warm-up over after one epoch of 5 steps
    assert rates[5:] == sorted(rates[5:], reverse=True)  # cosine only goes down
    assert rates[-1] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 14 / 15)))


def _rates_by_part(optimizer, model):
    """Each parameter's learning rate, gathered as {"backbone": {rates}, "head": {rates}}."""
    backbone = {id(p) for p in model.backbone.parameters()}
    rates = {"backbone": set(), "head": set()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            rates["backbone" if id(parameter) in backbone else "head"].add(group["lr"])
    return rates


def test_the_backbone_learns_at_its_share_of_the_rate_through_the_schedule():
    model = DeepLabV3Plus(backbone="resnet18")
    overrides = {"train.lr": 1e-3, "train.epochs": 2, "train.backbone_lr_factor": 0.1}
    config = build_config(overrides=overrides)
    optimizer = build_optimizer(model, config)
    assert _rates_by_part(optimizer, model) == {"backbone": {1e-4}, "head": {1e-3}}
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the logged rate is the head's peak
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    head, backbone = (_rates_by_part(optimizer, model)[part] for part in ("head", "backbone"))
    assert len(head) == len(backbone) == 1 and 0 < head.pop() == pytest.approx(10 * backbone.pop())
    counted = sum(len(group["params"]) for group in optimizer.param_groups)
    assert counted == len(list(model.parameters()))  # every parameter in exactly one group
    one_rate = build_optimizer(model, build_config(overrides={"train.lr": 1e-3}))
    assert _rates_by_part(one_rate, model) == {"backbone": {1e-3}, "head": {1e-3}}
    assert len(one_rate.param_groups) == 2  # as before the factor: decayed or not


@pytest.mark.parametrize(
    ("steps_per_epoch", "expected"),
    [(95, MIN_EPOCHS), (7, math.ceil(MIN_STEPS / 7)), (1, MIN_STEPS)],
)
def test_planned_epochs_keep_the_recipe_or_make_enough_steps(steps_per_epoch, expected, capsys):
    planned = planned_epochs(build_config(), steps_per_epoch)
    assert planned.train.epochs == expected
    assert f"{expected} epochs of {steps_per_epoch} steps" in capsys.readouterr().out
    given = build_config(overrides={"train.epochs": 3})
    assert planned_epochs(given, steps_per_epoch) is given  # an explicit choice is kept


def test_patch_training_plans_more_steps_than_resized_training():
    patches = build_config(overrides={"data.mode": "patch", "data.image_size": 256})
    assert planned_epochs(patches, 6).train.epochs == math.ceil(MIN_PATCH_STEPS / 6) == 134
    assert planned_epochs(build_config(), 6).train.epochs == math.ceil(MIN_STEPS / 6) == 100
