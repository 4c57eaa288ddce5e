"""Optional packages (ONNX, NIfTI, DICOM, ...): imported on first use, or one line that names
the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from medseg.core.errors import MedsegError


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or say in one line which package ``purpose`` needs and how to install it.

    ``extra`` is what pip installs: ``medseg[onnx]``, or a plain package name.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MedsegError(
            f"{purpose} needs the Python package {package}, which is not installed here; "
            f"install it with: pip install '{extra}'"
        ) from None
