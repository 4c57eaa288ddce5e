"""What the page shows beside the model's output: its card, and a few of its validation images.

The card is the one `medseg export` ships (`medseg.formats.card`): an export folder's own
README.md, or for a checkpoint the card written from its run folder (classes, training data,
validation Dice, "for research only, not a medical device"). The examples are the first images
the run validated on, as training chose them, where its data is still there.
"""

from __future__ import annotations

from pathlib import Path

from medseg.config import Config
from medseg.core.errors import MedsegError
from medseg.data.folder import train_val_samples
from medseg.engine.checkpoint import load_checkpoint
from medseg.formats.card import Provenance, model_card
from medseg.formats.source import CHECKPOINT, ModelSource
from medseg.prediction.outputs import file_sha256
from medseg.prediction.predictor import resolve_tta

CARD_NAME = "README.md"  # what medseg export writes beside the model
EXAMPLES = 4


def card_text(source: ModelSource, config: Config, *, given: str) -> str:
    """The model card (Markdown) of the model ``source`` names."""
    if source.kind != CHECKPOINT:
        folder = source.path if source.path.is_dir() else source.path.parent
        try:
            return (folder / CARD_NAME).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            provenance = Provenance(source=given)  # a card lost since export: the config's
    else:
        state = load_checkpoint(source.weights)  # read again for its epoch, then let go
        provenance = Provenance.of_checkpoint(
            source.weights, state, given=given, sha256=file_sha256(source.weights)
        )
        del state
    usage = f"```bash\nmedseg predict --checkpoint {given} -i images/ -o masks/\n```"
    card = model_card(
        config, provenance, files=source.describe(), tta=resolve_tta("auto", config), usage=usage
    )
    # The card medseg export would ship with this checkpoint, said as what it is.
    return card.replace("Exported by medseg", "Card written by medseg", 1)


def example_images(source: ModelSource, config: Config, *, count: int = EXAMPLES) -> list[Path]:
    """The first ``count`` images the run validated on (its val/, or the share of train/ it
    held out), where the run folder says where its data is and the data is still there."""
    if source.kind != CHECKPOINT:
        return []  # an export carries no data
    try:
        _, validation = train_val_samples(
            source.run.data_root(),
            mask_suffix=config.data.mask_suffix,
            val_fraction=config.data.val_fraction,
            seed=config.train.seed,
        )
    except MedsegError:  # no run.json, or the data has moved: the page has no examples
        return []
    return [sample.image for sample in validation[:count]]
