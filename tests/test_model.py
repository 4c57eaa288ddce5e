"""DeepLabv3+ for every backbone and variant: shapes, gradients, strides, freezing, weights."""

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from medseg.config import build_config
from medseg.core.errors import MedsegError
from medseg.model import DeepLabV3Plus, build_backbone
from medseg.model.aspp import ImagePooling

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
CUTS = (("seed", 16), ("paper", 16), ("paper", 8))
EVERY_MODEL = [(name, variant, stride) for name in BACKBONES for variant, stride in CUTS]

# Per backbone: channels of layer 1 (low-level), layer 3 (seed's deep) and layer 4 (paper's deep).
CHANNELS = {
    "resnet18": (64, 256, 512),
    "resnet34": (64, 256, 512),
    "resnet50": (256, 1024, 2048),
    "resnet101": (256, 1024, 2048),
}


def fixed_input(*shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(*shape, generator=generator)


@pytest.mark.parametrize(("backbone", "variant", "output_stride"), EVERY_MODEL)
def test_odd_input_gives_input_sized_logits_and_every_parameter_a_gradient(
    backbone, variant, output_stride
):
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone=backbone, variant=variant, output_stride=output_stride).train()
    # 65×97: neither side a multiple of 4, 8 or 16, so every rounding in the network is exercised.
    height, width = (64, 64) if backbone == "resnet101" else (65, 97)

    logits = model(fixed_input(2, 3, height, width))
    logits.square().mean().backward()

    assert logits.shape == (2, 1, height, width)
    assert torch.isfinite(logits).all()
    no_gradient = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
        and (parameter.grad is None or not parameter.grad.abs().sum() > 0)
    ]
    assert no_gradient == []
    non_finite = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all()
    ]
    assert non_finite == []


def test_resnet50_seed_keeps_a_250_by_301_input_size():
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone="resnet50").eval()
    with torch.no_grad():
        logits = model(fixed_input(1, 3, 250, 301))
    assert logits.shape == (1, 1, 250, 301)
    assert torch.isfinite(logits).all()


def test_seeded_model_is_reproducible_and_eval_differs_from_train():
    x = fixed_input(2, 3, 64, 64)
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = DeepLabV3Plus(backbone="resnet18").eval()
        with torch.no_grad():
            outputs.append(model(x))
    torch.manual_seed(1)
    other_seed = DeepLabV3Plus(backbone="resnet18").eval()
    with torch.no_grad():
        other = other_seed(x)
        train_output = model.train()(x)

    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], other)
    # Train mode normalises with batch statistics and applies dropout; eval must not.
    assert not torch.allclose(outputs[0], train_output, atol=1e-4)


def test_eval_output_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone="resnet18").eval()
    x = fixed_input(2, 3, 64, 64)
    with torch.no_grad():
        together = model(x)
        alone = model(x[:1])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("backbone", "variant", "output_stride"), EVERY_MODEL)
def test_backbone_channels_and_strides(backbone, variant, output_stride):
    network = build_backbone(name=backbone, variant=variant, output_stride=output_stride).eval()
    low_channels, layer3_channels, layer4_channels = CHANNELS[backbone]
    deep_channels = layer3_channels if variant == "seed" else layer4_channels

    with torch.no_grad():
        features = network(fixed_input(1, 3, 64, 128))

    assert network.low_level_channels == low_channels
    assert network.deep_channels == deep_channels
    assert features["stem"].shape == (1, network.stem_channels, 64 // 2, 128 // 2)
    assert features["low_level"].shape == (1, low_channels, 64 // 4, 128 // 4)
    assert features["deep"].shape == (
        1,
        deep_channels,
        64 // output_stride,
        128 // output_stride,
    )


def test_seed_variant_does_not_build_layer4():
    network = build_backbone(name="resnet50", variant="seed")
    assert network.layer4 is None
    names = {name.split(".")[0] for name, _ in network.named_parameters()}
    assert names == {"stem", "layer1", "layer2", "layer3"}


def test_freeze_backbone_keeps_its_weights_and_batchnorm_fixed_until_unfrozen():
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone="resnet18")
    model.freeze_backbone()
    model.train()

    backbone_batchnorms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    head_batchnorms = [
        m
        for part in (model.aspp, model.decoder)
        for m in part.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.aspp.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert not any(m.training for m in backbone_batchnorms)
    assert all(m.training for m in head_batchnorms)

    running_mean = model.backbone.stem[1].running_mean.clone()
    model(fixed_input(2, 3, 64, 64)).mean().backward()
    assert torch.equal(model.backbone.stem[1].running_mean, running_mean)
    assert all(p.grad is None for p in model.backbone.parameters())

    model.unfreeze_backbone()
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert all(m.training for m in backbone_batchnorms)
    model(fixed_input(2, 3, 64, 64))
    assert not torch.equal(model.backbone.stem[1].running_mean, running_mean)


def test_unfreeze_in_eval_mode_leaves_the_backbone_in_eval():
    model = DeepLabV3Plus(backbone="resnet18")
    model.freeze_backbone()
    model.eval()
    model.unfreeze_backbone()
    assert not model.backbone.training
    assert model.train().backbone.training


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"backbone": "resnet9"},
            "unknown backbone 'resnet9'; choose one of resnet18, resnet34, resnet50, resnet101",
        ),
        ({"variant": "deeplabv3"}, "unknown variant 'deeplabv3'; choose one of seed, paper"),
        ({"variant": "seed", "output_stride": 8}, "choose one of 16$"),
        ({"variant": "paper", "output_stride": 32}, "choose one of 8, 16$"),
        ({"decoder_stride": 8}, "decoder_stride=8 is not available; choose one of 4, 2$"),
    ],
)
def test_invalid_choices_list_the_valid_ones(arguments, message):
    with pytest.raises(MedsegError, match=message):
        DeepLabV3Plus(**arguments)


@pytest.fixture
def resnet18_weights(tmp_path):
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("variant", ["seed", "paper"])
def test_local_pretrained_weights_are_loaded(resnet18_weights, variant):
    path, state = resnet18_weights
    torch.manual_seed(0)
    network = build_backbone(name="resnet18", variant=variant, pretrained=path)
    loaded = network.state_dict()

    assert torch.equal(loaded["stem.0.weight"], state["conv1.weight"])
    assert torch.equal(loaded["stem.1.running_var"], state["bn1.running_var"])
    for key, value in loaded.items():
        # The backbone wraps conv1/bn1 (and relu, maxpool) as its stem; layers keep their names.
        source = key.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.")
        assert torch.equal(value, state[source]), key


def test_pretrained_state_dict_nested_under_state_dict_key_is_accepted(resnet18_weights, tmp_path):
    _, state = resnet18_weights
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, path)
    network = build_backbone(name="resnet18", pretrained=path)
    assert torch.equal(network.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])


def test_missing_pretrained_file_is_a_medseg_error(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(MedsegError, match="pretrained weights file not found: .*nowhere.pth"):
        build_backbone(name="resnet18", pretrained=missing)


def test_weights_of_a_smaller_network_are_refused(resnet18_weights):
    path, _ = resnet18_weights
    # resnet34 has more blocks per stage than resnet18: its extra tensors would stay random.
    with pytest.raises(MedsegError, match=r"do not fit a resnet34 backbone: \d+ tensors missing"):
        build_backbone(name="resnet34", pretrained=path)


def test_weights_of_a_bigger_network_are_refused(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(MedsegError, match="do not fit a resnet18 backbone"):
        build_backbone(name="resnet18", pretrained=path)


def test_weights_of_another_shape_are_refused(resnet18_weights, tmp_path):
    _, state = resnet18_weights
    grayscale = dict(state, **{"conv1.weight": torch.zeros(64, 1, 7, 7)})
    path = tmp_path / "grayscale.pth"
    torch.save(grayscale, path)
    with pytest.raises(
        MedsegError, match="do not fit a resnet18 backbone: size mismatch for conv1.weight"
    ):
        build_backbone(name="resnet18", pretrained=path)


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(MedsegError, match="hold a Tensor, not a state dict"):
        build_backbone(name="resnet18", pretrained=path)


def test_imagenet_download_offline_suggests_both_ways_out(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    # torchvision imported the function by name, so its own reference must be replaced too.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)

    with pytest.raises(MedsegError) as caught:
        build_backbone(name="resnet18", pretrained=True)

    message = str(caught.value)
    assert "--pretrained" in message
    assert "--no-pretrained" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "URLError" in message


def forward_flops(model: nn.Module, size: int = 128) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def test_separable_head_has_depthwise_convs_and_far_fewer_flops_than_plain():
    plain = DeepLabV3Plus(separable=False)
    separable = DeepLabV3Plus(separable=True)
    depthwise = [
        m for m in separable.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    # Three atrous ASPP branches (rates 6, 12, 18) and two decoder refinements.
    assert sorted(m.dilation[0] for m in depthwise) == [1, 1, 6, 12, 18]
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in plain.modules())
    # The backbone is shared; the plain head alone is more than the whole separable network.
    assert forward_flops(separable) < 0.5 * forward_flops(plain)
    torch.manual_seed(0)
    logits = separable(fixed_input(2, 3, 70, 90))
    assert logits.shape == (2, 1, 70, 90)


def test_checkpoint_from_before_the_separable_and_decoder_options_loads_as_trained(tmp_path):
    from medseg.config import build_config
    from medseg.engine.checkpoint import (
        load_checkpoint,
        model_from_checkpoint,
        save_checkpoint,
    )

    config = build_config(
        overrides={
            "model.backbone": "resnet18",
            "model.separable": False,
            "model.pretrained": False,
        }
    )
    weights = DeepLabV3Plus.from_config(config.model).state_dict()
    old_config = config.to_dict()
    del old_config["model"]["separable"], old_config["model"]["decoder_stride"]
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"config": old_config, "model": weights, "epoch": 1, "metrics": {}})
    model, loaded_config = model_from_checkpoint(load_checkpoint(path), path=path)
    assert loaded_config.model.separable is False
    assert loaded_config.model.decoder_stride == 4 and model.decoder.fine is None
    assert model.aspp.branches[-1].window is None  # global image pooling, as before
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())


def test_image_pooling_trains_on_a_batch_of_one_without_touching_its_statistics():
    model = DeepLabV3Plus(num_classes=1, backbone="resnet18").train()
    pooling_norm = model.aspp.branches[-1].project[1]
    before = pooling_norm.running_mean.clone()
    logits = model(torch.randn(1, 3, 64, 64))  # BatchNorm alone would refuse one value per channel
    logits.mean().backward()
    assert logits.shape == (1, 1, 64, 64)
    assert torch.equal(pooling_norm.running_mean, before)
    assert pooling_norm.training  # back in training mode for the next, larger batch
    assert model.aspp.branches[-1].project[0].weight.grad is not None


def test_grayscale_model_takes_one_channel_and_sums_the_imagenet_stem_filters(tmp_path):
    from torchvision import models

    weights = models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(weights, path)
    model = DeepLabV3Plus(num_classes=4, backbone="resnet18", pretrained=str(path), in_channels=1)
    stem = model.backbone.stem[0]
    assert stem.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(stem.weight, weights["conv1.weight"].sum(dim=1, keepdim=True))
    # A gray image gives the response the RGB stem gave to the same image repeated on RGB.
    gray = torch.rand(1, 1, 32, 32)
    rgb_stem = torch.nn.functional.conv2d(
        gray.repeat(1, 3, 1, 1), weights["conv1.weight"], stride=2, padding=3
    )
    assert torch.allclose(stem(gray), rgb_stem, atol=1e-5)
    assert model.eval()(torch.rand(2, 1, 48, 40)).shape == (2, 4, 48, 40)


def off_centre(weights: torch.Tensor) -> torch.Tensor:
    return torch.cat([weights[..., 0, :], weights[..., 2, :], weights[..., 1, ::2]], dim=-1)


@pytest.mark.parametrize("separable", [True, False])
def test_atrous_taps_the_training_size_never_reaches_get_no_gradient_and_are_zeroed(separable):
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone="resnet18", separable=separable).train()
    images = fixed_input(2, 3, 128, 128)  # an 8 × 8 feature map: rates 12 and 18 reach past it
    model(images).square().mean().backward()
    for rate, reached in ((6, True), (12, False), (18, False)):
        gradient = off_centre(model.aspp.atrous(rate).weight.grad)
        assert bool(gradient.abs().sum() > 0) is reached, rate
    model.eval()
    before = {rate: model.aspp.atrous(rate).weight.detach().clone() for rate in (6, 12, 18)}
    larger = fixed_input(1, 3, 256, 256)
    with torch.no_grad():
        at_training_size, at_larger_size = model(images), model(larger)

    model.zero_taps_out_of_reach(128)

    assert torch.equal(model.aspp.atrous(6).weight, before[6])
    for rate in (12, 18):
        weights = model.aspp.atrous(rate).weight
        assert torch.equal(weights[..., 1, 1], before[rate][..., 1, 1])
        assert torch.count_nonzero(off_centre(weights)) == 0
    with torch.no_grad():
        assert torch.equal(model(images), at_training_size)  # nothing changes where it trained
        assert not torch.allclose(model(larger), at_larger_size)  # random taps did read features


def test_aspp_rates_given_build_those_branches_and_survive_a_config_round_trip():
    config = build_config(overrides={"model.aspp_rates": [3, 6, 9], "model.backbone": "resnet18"})
    model = DeepLabV3Plus.from_config(config.model, pretrained=False)
    assert model.aspp.rates == (3, 6, 9) and model.config["aspp_rates"] == [3, 6, 9]
    assert len(model.aspp.branches) == 5  # 1×1, three atrous, image pooling
    assert DeepLabV3Plus(backbone="resnet18").aspp.rates == (6, 12, 18)  # none given: the paper's
    with pytest.raises(MedsegError, match=r"model.aspp_rates=\[0, 6\] is impossible"):
        build_config(overrides={"model.aspp_rates": [0, 6]})
    with pytest.raises(MedsegError, match=r"model.aspp_rates=\[6, 6\] is impossible"):
        build_config(overrides={"model.aspp_rates": [6, 6]})  # two equal branches
    with pytest.raises(MedsegError, match="model.aspp_rates=.*wrong type"):
        build_config(overrides={"model.aspp_rates": ["six"]})


@pytest.mark.parametrize("variant", ["seed", "paper"])
def test_the_fine_decoder_classifies_at_stride_2_and_every_parameter_trains(variant):
    torch.manual_seed(0)
    model = DeepLabV3Plus(backbone="resnet18", variant=variant, decoder_stride=2).train()
    classified = []
    model.decoder.classifier.register_forward_hook(
        lambda module, inputs, output: classified.append(tuple(output.shape))
    )
    logits = model(fixed_input(2, 3, 65, 97))
    logits.square().mean().backward()
    assert logits.shape == (2, 1, 65, 97)
    assert classified == [(2, 1, 33, 49)]  # half of 65 × 97, rounded up as the stem rounds
    papers = DeepLabV3Plus(backbone="resnet18", variant=variant).eval()
    papers.decoder.classifier.register_forward_hook(
        lambda module, inputs, output: classified.append(tuple(output.shape))
    )
    with torch.no_grad():
        papers(fixed_input(2, 3, 65, 97))
    assert classified[1] == (2, 1, 17, 25)  # the paper's decoder: a quarter
    assert [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or not parameter.grad.abs().sum() > 0
    ] == []


def test_the_decoder_stride_is_planned_unless_set_and_the_unplanned_default_is_the_papers():
    unplanned = build_config(overrides={"model.backbone": "resnet18"})
    assert unplanned.model.decoder_stride == 0
    assert DeepLabV3Plus.from_config(unplanned.model, pretrained=False).decoder.fine is None
    config = build_config(overrides={"model.decoder_stride": 2, "model.backbone": "resnet18"})
    assert DeepLabV3Plus.from_config(config.model, pretrained=False).decoder.fine is not None
    with pytest.raises(
        MedsegError, match="model.decoder_stride=3 is not valid; choose one of 0, 4, 2"
    ):
        build_config(overrides={"model.decoder_stride": 3})


def test_windowed_image_pooling_averages_the_patch_sized_window_around_each_position():
    torch.manual_seed(0)
    pooling = ImagePooling(8, 4, window=4).eval()
    features = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        out = pooling(features)
        assert out.shape == (2, 4, 7, 9)

        def window_at(top: int, left: int) -> torch.Tensor:
            average = features[:, :, top : top + 4, left : left + 4].mean((2, 3), keepdim=True)
            return pooling.project(average)[:, :, 0, 0]

        # Position (3, 4): the window of rows 2-5 and columns 3-6, centred on it (as nearly as
        # an even window can be); at the corners the window moves inside the input.
        torch.testing.assert_close(out[:, :, 3, 4], window_at(2, 3))
        torch.testing.assert_close(out[:, :, 0, 0], window_at(0, 0))
        torch.testing.assert_close(out[:, :, 6, 8], window_at(3, 5))
        # At the window's size and below, the paper's global average, bit for bit.
        small = features[:, :, :4, :3]
        expected = pooling.project(small.mean((2, 3), keepdim=True)).expand(-1, -1, 4, 3)
        torch.testing.assert_close(pooling(small), expected, rtol=0, atol=0)


def test_a_windowed_network_equals_the_global_one_at_the_patch_and_not_beyond():
    torch.manual_seed(0)
    windowed = DeepLabV3Plus(backbone="resnet18", decoder_stride=2, pooling_window=64).eval()
    paper = DeepLabV3Plus(backbone="resnet18", decoder_stride=2).eval()
    paper.load_state_dict(windowed.state_dict())  # the window is a setting, not a weight
    assert windowed.aspp.branches[-1].window == 4 and paper.aspp.branches[-1].window is None
    assert windowed.config["pooling_window"] == 64 and paper.config["pooling_window"] == 0
    with torch.no_grad():
        patch = fixed_input(2, 3, 64, 64)
        assert torch.equal(windowed(patch), paper(patch))
        larger = fixed_input(1, 3, 128, 96)
        assert not torch.allclose(windowed(larger), paper(larger))
    with pytest.raises(
        MedsegError, match="model.pooling_window=-1 is impossible; it must be at least 0"
    ):
        build_config(overrides={"model.pooling_window": -1})
