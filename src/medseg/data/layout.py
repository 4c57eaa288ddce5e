"""What ``--data`` and a prediction's input name, decided in one place for the command line and
the Python API alike.

``--data`` is a data root (``train/``, ``val/``, ``test/``, each with ``images/`` and
``masks/``), one such split folder, or an nnU-Net v2 raw root (``dataset.json`` beside
``imagesTr/``/``imagesTs/``). Training and 2D scoring read an nnU-Net root through its 2D slices
(`medseg.data.nnunet.slice_root`, built once); a root of NIfTI volumes with ``imagesTs/`` and
``labelsTs/`` is scored volume by volume. A prediction's input is an image file, a folder of
images (and DICOM files), or NIfTI volumes.
"""

from __future__ import annotations

from pathlib import Path

from medseg.data.nnunet import NIFTI_ENDINGS, is_nnunet_root, read_spec, slice_root


def image_root(data: str | Path) -> str | Path:
    """The root of image folders ``data`` stands for: an nnU-Net raw root becomes its root of 2D
    slices; anything else is itself (the split finders name what is missing)."""
    return slice_root(data) or data


def is_volume_root(data: str | Path) -> bool:
    """Whether ``data`` is an nnU-Net raw root of NIfTI volumes: evaluation scores it in 3D."""
    return is_nnunet_root(data) and read_spec(Path(data)).nifti


def nifti_ending(path: Path) -> str | None:
    """The NIfTI ending of a file name (``.nii.gz`` or ``.nii``), or None."""
    return next((ending for ending in NIFTI_ENDINGS if path.name.endswith(ending)), None)


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` is a NIfTI file, or a folder holding some (prediction writes volumes)."""
    path = Path(path)
    if path.is_dir():
        try:
            return any(nifti_ending(child) for child in path.iterdir())
        except OSError:  # unreadable: the image path's listing names the problem
            return False
    return nifti_ending(path) is not None
