"""The predictor: what it feeds the network, TTA views, thresholds and post-processing."""

import numpy as np
import torch
from PIL import Image
from torch import nn

from medseg.data.cache import prepare
from medseg.data.folder import find_pairs
from medseg.data.io import read_image
from medseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from medseg.inference import (
    Predictor,
    predict,
)


class Recorder(nn.Module):
    """Runs ``network`` and keeps a copy of every batch it is given."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.inputs: list[torch.Tensor] = []

    def forward(self, batch):
        self.inputs.append(batch.detach().clone())
        return self.network(batch)


def write_pair(folder, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{name}_segmentation.png")


def test_predictor_feeds_the_network_what_training_saw_of_a_large_image(tiny_checkpoint, tmp_path):
    # Pixel noise is the worst case for a shrink that samples instead of averaging.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)
    mask = np.zeros((640, 640), dtype=bool)
    mask[100:400, 200:500] = True
    write_pair(tmp_path / "data", "big", image, mask)
    cache = prepare(find_pairs(tmp_path / "data"), size=64, progress=False)
    predictor = Predictor.from_checkpoint(
        tiny_checkpoint, device="cpu", precision="fp32", tta="none"
    )
    predictor.network = recorder = Recorder(predictor.network)

    predictor.probabilities([read_image(tmp_path / "data" / "images" / "big.png")])

    trained_on = (cache.images[0] / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    fed = recorder.inputs[0][0].permute(1, 2, 0).numpy()
    grey_level = 1 / 255 / min(IMAGENET_STD)
    assert fed.shape == trained_on.shape == (64, 64, 3)
    assert np.abs(fed - trained_on).max() <= grey_level + 1e-5


def test_predict_logs_plain_lines_when_stderr_is_not_a_terminal(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / f"img{index}.png")
    predict(tiny_checkpoint, folder, tmp_path / "out", device="cpu", tta="none", batch_size=2)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.strip().splitlines()[-1] == "predicting: 3/3 (100%)"
