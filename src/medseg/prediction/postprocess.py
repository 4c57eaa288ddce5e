"""Post-processing of predicted masks: the largest region of each class, its holes filled."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a bool mask, with its holes filled.

    The ISIC task defines a lesion as one contiguous region without holes.
    """
    if not mask.any():
        return mask
    return ndimage.binary_fill_holes(_largest_component(mask))


def keep_largest_components(label_map: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) label map keeping the largest 8-connected region of each foreground class.

    The other regions become background 0, as nnU-Net's "remove all but the largest
    component". A kept region's holes are filled with its class only where they are background
    after that (a region of another class inside it stays); a hole inside several regions goes
    to the innermost one, whose filled area is the smallest.
    """
    kept = np.zeros_like(label_map)
    filled = []
    for value in np.unique(label_map):
        if value == 0:
            continue
        largest = _largest_component(label_map == value)
        kept[largest] = value
        region = ndimage.binary_fill_holes(largest)
        filled.append((int(region.sum()), int(value), region & ~largest))
    for _, value, holes in sorted(filled, key=lambda item: item[0]):
        kept[holes & (kept == 0)] = value
    return kept


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)
