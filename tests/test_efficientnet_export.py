"""An EfficientNet-Lite model through ONNX (float32 and int8), as the ResNet's exports are
checked in test_export.py: the graph reproduces PyTorch at any size, int8 follows float."""

import numpy as np
import pytest
import torch

from medseg import api
from medseg.cli import main
from medseg.config import build_config
from medseg.data.io import read_image
from medseg.engine.checkpoint import save_checkpoint
from medseg.formats.onnx import INPUT_NAME, OUTPUT_NAME, open_session
from medseg.model import DeepLabV3Plus
from medseg.model.efficientnet import PACKAGED_WEIGHTS
from medseg.prediction.predictor import Predictor

LITE = {
    "model.backbone": "efficientnet-lite0",
    "data.image_size": 64,
}


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory):
    """An efficientnet-lite0 checkpoint for 64×64 inputs, its encoder ImageNet's (an untrained
    encoder's features are near constant, and so would be what int8 is judged on)."""
    pytest.importorskip(PACKAGED_WEIGHTS["efficientnet-lite0"][0])
    config = build_config(overrides=LITE)
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model, pretrained=True)
    path = tmp_path_factory.mktemp("lite-checkpoint") / "best.pt"
    state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    save_checkpoint(path, state)
    return path


def test_the_onnx_graph_reproduces_pytorch_at_any_size(lite_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    api.export(checkpoint=lite_checkpoint, out=out, format="onnx")
    torch_predictor = Predictor.from_checkpoint(
        lite_checkpoint, device="cpu", precision="fp32", tta="none"
    )
    session = open_session(out / "model.onnx")
    generator = torch.Generator().manual_seed(0)
    # Even and odd sides: the stride-2 padding is fixed, the same graph for every size.
    for height, width in [(64, 64), (40, 72), (33, 47)]:
        batch = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = torch_predictor.network(batch).numpy()
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
        assert logits.shape == (2, 1, height, width)
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)

    onnx_predictor = Predictor.from_checkpoint(out, tta="none")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    for expected, got in zip(
        torch_predictor.probabilities(images), onnx_predictor.probabilities(images), strict=True
    ):
        np.testing.assert_allclose(got, expected, atol=1e-4)  # test_export.py's tolerance


def test_int8_quantization_follows_float(lite_checkpoint, synthetic_root, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    out = tmp_path / "int8"
    argv = ["export", "--checkpoint", lite_checkpoint, "--format", "onnx", "--out", out]
    argv += ["--quantize", "int8", "--calibration", synthetic_root]
    assert main([str(arg) for arg in argv]) == 0
    operators = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators

    int8 = Predictor.from_checkpoint(out, tta="none")
    fp32 = Predictor.from_checkpoint(out / "model-fp32.onnx", tta="none")
    images = [read_image(path) for path in sorted((synthetic_root / "test" / "images").iterdir())]
    batch = int8.preprocess(images)
    logits_int8, logits_fp32 = int8.network(batch).numpy(), fp32.network(batch).numpy()
    correlation = np.corrcoef(logits_int8.ravel(), logits_fp32.ravel())[0, 1]
    assert correlation >= 0.95, correlation
    probability_error = np.mean(
        np.abs(
            np.concatenate(int8.probabilities(images)) - np.concatenate(fp32.probabilities(images))
        )
    )
    assert probability_error <= 0.05, probability_error
