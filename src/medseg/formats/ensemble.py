"""Ensembles on disk: a k-fold run's folds, and the folder ``medseg export`` writes for one.

```
RUN/  (medseg train --folds K)                DIR/  (medseg export of an ensemble, safetensors)
  splits.json   [{"train": [...], "val": [...]}]  ensemble.json   the members and their shares
  fold_0/ ... fold_{K-1}/  each a run folder      fold_0/ ...     each a safetensors export
  cv_summary.json                                 README.md       the card, naming the folds
```

This module only reads and describes them; `medseg.formats.source` decides what a
``--checkpoint`` names, and the Predictor averages the members' probabilities.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from medseg.core.errors import MedsegError
from medseg.core.version import __version__
from medseg.engine.folds import SPLITS_NAME, KFoldRun
from medseg.formats.folder import MEMBER_FOLDER, read_json

FOLD_FOLDER = re.compile(r"^fold_(\d+)$")
ENSEMBLE_NAME = "ensemble.json"
FORMAT = "medseg-ensemble"
FORMAT_VERSION = 1


def fold_folder(fold: int) -> str:
    return f"fold_{fold}"


def fold_of(path: str | os.PathLike) -> int | None:
    """The fold number of a k-fold run's fold folder, or of an exported ensemble's (fold_<i>);
    None for any other folder."""
    path = Path(path)
    match = FOLD_FOLDER.match(path.name)
    if match is None:
        return None
    parent = path.parent
    return int(match[1]) if (parent / SPLITS_NAME).is_file() or is_ensemble_export(parent) else None


def is_kfold_run(path: str | os.PathLike) -> bool:
    """True for a folder with splits.json (written before any fold trains, so a run whose
    folds have not finished an epoch yet is named as such, not as a folder without best.pt)."""
    return KFoldRun.holds(path)


def kfold_count(run: Path) -> int:
    """K, the number of folds splits.json holds; a splits.json that is not a list of
    {"train", "val"} objects is refused in one line."""
    advice = "it is written by medseg train --folds K; pass one fold's folder (RUN/fold_0) instead"
    path = run / SPLITS_NAME
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:120]
        raise MedsegError(f"{path} is not readable JSON ({reason}); {advice}") from error
    if not isinstance(splits, list) or not splits:
        raise MedsegError(f"{path} does not hold a list of folds; {advice}")
    for index, split in enumerate(splits):
        if not isinstance(split, dict) or not {"train", "val"} <= split.keys():
            raise MedsegError(f"{path}: fold {index} has no 'train' and 'val' lists; {advice}")
    return len(splits)


def is_ensemble_export(path: str | os.PathLike) -> bool:
    """True for a folder holding ensemble.json."""
    return (Path(path) / ENSEMBLE_NAME).is_file()


def read_ensemble(folder: Path) -> list[dict[str, Any]]:
    """The members ensemble.json lists, each {"folder", "share", "fold"} ("fold" None for a
    member that was no fold); a description medseg did not write is refused in one line."""
    advice = "export the ensemble again with: medseg export"
    path = folder / ENSEMBLE_NAME
    values = read_json(path, advice=advice)
    if values.get("format") != FORMAT:
        raise MedsegError(f"{path} is not a medseg ensemble (no 'format: {FORMAT}'); {advice}")
    version = values.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MedsegError(
            f"{path} was written by a newer medseg (format version {version}); upgrade medseg"
        )
    members = values.get("members")
    if not isinstance(members, list) or not members:
        raise MedsegError(f"{path} lists no members; {advice}")
    for member in members:
        folder_name = member.get("folder") if isinstance(member, dict) else None
        share = member.get("share") if isinstance(member, dict) else None
        if not isinstance(folder_name, str) or not MEMBER_FOLDER.match(folder_name):
            raise MedsegError(f"{path}: a member without a fold_<i> or member_<i> folder; {advice}")
        if not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise MedsegError(f"{path}: member {folder_name} has no share in (0, 1]; {advice}")
    return [
        {"folder": member["folder"], "share": float(member["share"]), "fold": member.get("fold")}
        for member in members
    ]


def ensemble_description(members: list[dict[str, Any]], *, source: str) -> dict[str, Any]:
    """ensemble.json: ``members`` as {"folder", "fold", "share", "source", "sha256"}, in the
    order their probabilities are averaged."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medseg_version": __version__,
        "source": source,
        "average": "the share-weighted mean of the members' probabilities (sigmoid or softmax), "
        "each member after its own test-time augmentation",
        "members": members,
    }
