"""Several models as one predictor: the average of their probabilities.

An `EnsemblePredictor` is what `Predictor.from_checkpoint` returns for an ensemble (a k-fold
run, an exported ensemble, several checkpoints: `medseg.formats.source`), with the Predictor's
calls (``probabilities``, ``masks``, ``to_mask``, ``config``, ``tta``, ``threshold``, ...), so
every command takes it unchanged. Each member is a Predictor: it resizes, runs its own TTA and
softmax (or sigmoid) and resizes back, and the ensemble averages those probabilities, never
logits, weighted by each member's share, before the threshold or arg-max.

Memory stays bounded by one batch. Members whose weights together fit in
`MEMORY_BUDGET` stay loaded (five folds of the default resnet50 hold 5 × 40 MiB); a larger
ensemble keeps none: for every batch each member is loaded, run and let go in turn, its
probabilities added to the batch's running sum, so one model is in memory at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medseg.config import Config
from medseg.config.choices import DEFAULT_TTA
from medseg.core.errors import MedsegError
from medseg.engine.runtime import Precision
from medseg.formats.source import ModelSource
from medseg.prediction.segmenter import Segmenter, resolve_tta

MEMORY_BUDGET = 1 << 30  # bytes of weights an ensemble keeps loaded; past it, one at a time

# (member, resolved TTA mode) -> its Predictor (`Predictor.from_checkpoint` with the
# ensemble's device, precision and compilation).
MemberLoader = Callable[[ModelSource, str], Any]


@dataclass
class Member:
    """One model of an ensemble: where it is, its share of the average, its settings, and its
    Predictor while it is kept loaded (None: loaded for each batch)."""

    source: ModelSource
    share: float
    config: Config
    tta: str  # the mode it runs ("auto" resolved for its own config)
    predictor: Any | None = None


@dataclass
class EnsemblePredictor(Segmenter):
    """The share-weighted mean of ``members``' probabilities, each after its own TTA.

    The classes, channels and input come from the members, which agree on them
    (`check_compatible`); ``tta`` "auto" is resolved per member (``self.tta``: the mode they
    run, or "auto" where they differ, each listed in `tta_modes`). ``threshold`` None takes
    the members' own, which must agree for a binary ensemble.
    """

    members: list[Member]
    load: MemberLoader
    device: torch.device
    precision: Precision
    tta: str = DEFAULT_TTA
    postprocess: bool = False
    threshold: float | None = None
    source: ModelSource | None = None

    def __post_init__(self):
        self.config = self.members[0].config
        self.settle_threshold(self._members_threshold())
        members = []
        for member in self.members:
            mode = resolve_tta(self.tta, member.config)
            predictor = member.predictor
            if predictor is not None and predictor.tta != mode:
                predictor = dataclasses.replace(predictor, tta=mode)  # the same network
            members.append(dataclasses.replace(member, tta=mode, predictor=predictor))
        self.members = members
        modes = set(self.tta_modes)
        self.tta = modes.pop() if len(modes) == 1 else "auto"

    @classmethod
    def from_source(
        cls, source: ModelSource, load: MemberLoader, *, tta: str = DEFAULT_TTA,
        postprocess: bool = False, threshold: float | None = None, compile: bool = False,
        keep_loaded: bool | None = None,
    ) -> EnsemblePredictor:  # fmt: skip
        """Load each member of ``source`` once, in turn, and check it against the first.

        ``keep_loaded`` None keeps them loaded when all their weights fit in `MEMORY_BUDGET`
        (judged from the first); False loads each for every batch, True keeps them all.
        """
        members: list[Member] = []
        leaves = source.leaves()
        for leaf, share in leaves:
            predictor = load(leaf, tta)  # "auto": the member's own mode
            if members:
                check_compatible(members[0].source, members[0].config, leaf, predictor.config)
            if keep_loaded is None:
                keep_loaded = predictor.weight_bytes * len(leaves) <= MEMORY_BUDGET
                if compile and not keep_loaded:
                    raise MedsegError(
                        f"--compile would compile each of the {len(leaves)} models of {source} "
                        f"again for every batch (too large to keep loaded together); leave "
                        f"--compile out"
                    )
            kept = predictor if keep_loaded else None
            members.append(Member(leaf, share, predictor.config, predictor.tta, kept))
            device, precision = predictor.device, predictor.precision
            del predictor, kept  # let go before the next member loads
        return cls(
            members, load, device, precision, tta=tta, postprocess=postprocess,
            threshold=threshold, source=source,
        )  # fmt: skip

    @property
    def tta_modes(self) -> list[str]:
        """The TTA mode each member runs, in the order of `members`."""
        return [member.tta for member in self.members]

    @property
    def kept_loaded(self) -> bool:
        """True when every member stays in memory; False when each is loaded per batch."""
        return all(member.predictor is not None for member in self.members)

    def _members_threshold(self) -> float | None:
        """The binary members' own threshold; members that cut at different ones are refused
        unless a threshold is given."""
        thresholds = {member.config.train.threshold for member in self.members}
        if self.threshold is None and not self.multi_class and len(thresholds) > 1:
            listed = ", ".join(
                f"{member.source} {member.config.train.threshold:g}" for member in self.members
            )
            raise MedsegError(
                f"the ensemble's models cut at different thresholds ({listed}); pass one "
                f"with --threshold"
            )
        return self.members[0].config.train.threshold

    def probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The members' `Predictor.probabilities` of ``images``, averaged with their shares:
        float32 (H, W) or (K, H, W) at each image's own size, as one model gives."""
        total: list[np.ndarray] | None = None
        for member in self.members:
            predictor = member.predictor
            if predictor is None:
                predictor = self.load(member.source, member.tta)
            maps = predictor.probabilities(images)
            del predictor  # a member loaded for this batch goes before the next one loads
            if total is None:
                total = [np.float32(member.share) * probability for probability in maps]
            else:
                for index, probability in enumerate(maps):
                    total[index] += np.float32(member.share) * probability
        return total


def check_compatible(
    first: ModelSource, first_config: Config, source: ModelSource, config: Config
) -> None:
    """Refuse, in one line naming the difference, a model (``source``) whose classes, input
    channels or input (size, whole image or tiles) are not those of the ``first``."""
    for what, described in (
        ("classes", _classes),
        ("input channels", lambda settings: str(settings.data.channels)),
        ("inputs", _input),
    ):
        if described(first_config) != described(config):
            raise MedsegError(
                f"{first} and {source} cannot be ensembled: their {what} differ "
                f"({described(first_config)} against {described(config)}); ensemble models "
                f"of one task (same classes, channels and input)"
            )


def _classes(config: Config) -> str:
    if config.model.num_classes == 1:
        return "binary masks"
    return f"{config.model.num_classes} classes: {', '.join(config.data.labels)}"


def _input(config: Config) -> str:
    side = config.data.image_size
    if config.data.mode == "patch":
        return f"whole images in tiles, trained on {side}×{side} patches"
    return f"resized to {side}×{side}"
