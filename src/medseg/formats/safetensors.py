"""The pretrained folder: weights as safetensors, settings as JSON, a model card beside them.

Reading it parses JSON and raw tensors only, never a pickle, so a folder from anywhere cannot
run code; and the folder alone rebuilds the network and its preprocessing, with no run folder
or checkpoint (as Hugging Face's ``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from medseg.config import Config, config_from_dict, config_from_saved
from medseg.core.errors import MedsegError
from medseg.core.optional import require
from medseg.core.version import __version__
from medseg.engine.checkpoint import load_weights
from medseg.formats.card import Provenance, model_card
from medseg.formats.folder import read_json, staged_export
from medseg.model import DeepLabV3Plus
from medseg.model.deeplab import model_arguments

FORMAT = "medseg-pretrained"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_SECTIONS = tuple(section.name for section in fields(Config))  # data, model, train
# safetensors is a dependency of medseg itself, so it is only missing from a broken install.
SAFETENSORS_PACKAGE = {"extra": "safetensors", "purpose": "a pretrained folder (model.safetensors)"}
USAGE = """\
```bash
medseg predict --checkpoint THIS_FOLDER -i images/ -o masks/
medseg evaluate --checkpoint THIS_FOLDER --data DATA_ROOT/test
```

```python
import medseg

predictor = medseg.Predictor.from_pretrained("THIS_FOLDER")
masks = predictor.masks([uint8_image])  # at each image's own size
model = medseg.load_pretrained("THIS_FOLDER")  # the nn.Module alone
```"""


def is_pretrained(path: str | os.PathLike) -> bool:
    """True for a folder with config.json and model.safetensors."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def save_pretrained(
    model: DeepLabV3Plus,
    folder: str | os.PathLike,
    *,
    config: Config | None = None,
    overwrite: bool = False,
    provenance: Provenance | None = None,
    tta: str | None = None,
) -> Path:
    """Write ``model`` into ``folder``: model.safetensors, config.json and a README.md card.

    ``config`` is the run's resolved config (what a Predictor needs: input size, channels,
    classes, threshold); without it only the model's own arguments are saved, enough for
    `medseg.load_pretrained` but not for a Predictor. ``tta`` is the recommended mode
    for the card (default: none). A folder that holds a model is refused unless ``overwrite``;
    the files appear together or not at all.
    """
    config = config or config_of_model(model)
    _check_matches(model, config)
    save_file = require("safetensors.torch", **SAFETENSORS_PACKAGE).save_file
    card = model_card(
        config,
        provenance,
        files=f"{WEIGHTS_NAME} (weights) and {CONFIG_NAME} (settings) for PyTorch",
        tta=tta or "none",
        usage=USAGE,
    )
    # Plain (not channels-last) contiguous copies: safetensors stores a tensor's bytes as they lie.
    weights = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    with staged_export(folder, overwrite=overwrite) as staging:
        save_file(weights, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT})
        (staging / CONFIG_NAME).write_text(
            json.dumps(pretrained_config(config, provenance), indent=2) + "\n", encoding="utf-8"
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
    return Path(folder)


def pretrained_config(config: Config, provenance: Provenance | None) -> dict[str, Any]:
    """config.json: the resolved config's sections, with what identifies the export."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medseg_version": __version__,
        "source_checkpoint_sha256": provenance.sha256 if provenance else None,
        **config.to_dict(),
    }


def load_pretrained(folder: str | os.PathLike) -> tuple[DeepLabV3Plus, Config]:
    """The network (in eval mode) and config that `save_pretrained` wrote into ``folder``."""
    folder = Path(folder)
    if not is_pretrained(folder):
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
        raise MedsegError(
            f"{folder} is not a pretrained medseg folder (no {' and no '.join(missing)}); "
            f"write one with: medseg export --format safetensors"
        )
    advice = "export the model again with: medseg export --format safetensors"
    values = read_json(folder / CONFIG_NAME, advice=advice)
    if values.get("format") != FORMAT:
        raise MedsegError(
            f"{folder / CONFIG_NAME} is not a medseg config (no 'format: {FORMAT}'); {advice}"
        )
    version = values.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MedsegError(
            f"{folder} was written by a newer medseg (format version {version}); upgrade medseg"
        )
    sections = {key: value for key, value in values.items() if key in CONFIG_SECTIONS}
    config = config_from_saved(sections, source=str(folder / CONFIG_NAME))
    load_file = require("safetensors.torch", **SAFETENSORS_PACKAGE).load_file
    path = folder / WEIGHTS_NAME
    try:
        weights = load_file(str(path), device="cpu")
    except Exception as error:  # safetensors reports a damaged file as its own error type
        raise MedsegError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): "
            f"{type(error).__name__}: {error}".splitlines()[0][:300]
            + f"; {advice}"
        ) from error
    model = DeepLabV3Plus.from_config(config.model, pretrained=False)
    load_weights(model, weights, path=path)
    return model.eval(), config


def config_of_model(model: DeepLabV3Plus) -> Config:
    """A config holding only the model's own arguments (no input size: not for a Predictor)."""
    arguments = dict(model.config)
    classes = arguments["num_classes"]
    # A K-class model needs K class names to be a valid config; these say only which is which.
    labels = [] if classes == 1 else ["background", *(f"class_{i}" for i in range(1, classes))]
    return config_from_dict(
        {
            "data": {"channels": arguments["in_channels"], "labels": labels},
            "model": {**arguments, "pretrained": False},
        },
        source="the model's arguments",
    )


def _check_matches(model: DeepLabV3Plus, config: Config) -> None:
    """The config must rebuild this very network, or loading the folder would fail later."""
    described = model_arguments(config.model)
    for key, value in model.config.items():
        if described[key] != value:
            raise MedsegError(
                f"config.model.{key}={getattr(config.model, key)!r} but the model has "
                f"{key}={value!r}; pass the config the model was built from"
            )
