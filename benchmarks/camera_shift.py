"""How a model holds up when the camera changes: DRIVE's test images with their light and colour
shifted the way another clinic's fundus camera shifts them, scored by each model named.

    python benchmarks/camera_shift.py NAME=RUN [NAME=RUN ...]
    python benchmarks/camera_shift.py seed=runs/a/drive/lite0-seed0 thin=runs/b/drive/lite0-seed0
    python benchmarks/camera_shift.py --markdown runs/camera-shift/camera-shift.json

DRIVE's 40 images come from one camera (a Canon CR5), so its test set cannot tell whether a
model learned vessels or that camera's rendering. Each shift below is applied to every test
image (the masks and the field of view unchanged) and each model scores the shifted set with the
default prediction, inside the field of view: a stand-in for images from elsewhere, not a
replacement for them. The shifts go past the training augmentations' ranges (brightness and
contrast ±20%, gamma 0.8-1.2), as a different camera does.

Prints a table of Dice per shift and model, with the mean over the shifts and the drop from the
unshifted images, and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from common import hardware

import medseg
from medseg.data.folder import list_images
from medseg.data.io import read_image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "drive"


def _scaled(gains: tuple[float, float, float]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: image * np.asarray(gains)


def _contrast(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    def shift(image: np.ndarray) -> np.ndarray:
        mean = image.mean(axis=(0, 1))  # each channel's, so the colour balance stays
        return mean + factor * (image - mean)

    return shift


def _gamma(power: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: 255.0 * (image / 255.0) ** power


# name -> the shift, on an RGB float image in [0, 255] (clipped after)
SHIFTS = {
    "as acquired": lambda image: image,
    "darker (x0.65)": _scaled((0.65, 0.65, 0.65)),
    "brighter (x1.3)": _scaled((1.3, 1.3, 1.3)),
    "low contrast (x0.6)": _contrast(0.6),
    "gamma 1.5": _gamma(1.5),
    "warm cast (R x1.15, B x0.7)": _scaled((1.15, 1.0, 0.7)),
    "cool cast (R x0.8, B x1.3)": _scaled((0.8, 1.0, 1.3)),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", metavar="NAME=RUN", help="run folders to score")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DRIVE's root")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "camera-shift")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="print a saved result")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if not args.models:
        parser.error("name at least one model as NAME=RUN")
    models = dict(text.split("=", 1) for text in args.models)
    result = {"hardware": hardware(), "models": models, "dice": {}}
    for shift in SHIFTS:
        folder = shifted_copy(args.data / "test", args.out / "data" / _slug(shift), SHIFTS[shift])
        result["dice"][shift] = {
            name: medseg.evaluate(
                checkpoint=Path(run),
                data=folder,
                out=args.out / "scores" / name / _slug(shift),
                overwrite=True,
                progress=False,
            )["dice"]
            for name, run in models.items()
        }
        print(f"{shift}: " + ", ".join(f"{n} {d:.4f}" for n, d in result["dice"][shift].items()))
    saved = args.out / "camera-shift.json"
    saved.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nhardware: {result['hardware']}; written {saved}")
    return 0


def shifted_copy(source: Path, target: Path, shift: Callable[[np.ndarray], np.ndarray]) -> Path:
    """``source`` (images/, masks/, fov/) copied to ``target`` with every image shifted."""
    if target.exists():
        shutil.rmtree(target)
    for folder in ("masks", "fov"):
        shutil.copytree(source / folder, target / folder)
    (target / "images").mkdir(parents=True)
    for path in list_images(source / "images"):
        image = shift(read_image(path).astype(np.float64))
        rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        cv2.imwrite(str(target / "images" / f"{path.stem}.png"), rgb[..., ::-1])
    return target


def markdown(result: dict) -> str:
    names = list(result["models"])
    rows = ["| shift | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for shift, scores in result["dice"].items():
        rows.append(f"| {shift} | " + " | ".join(f"{scores[n]:.4f}" for n in names) + " |")
    shifted = [scores for shift, scores in result["dice"].items() if shift != "as acquired"]
    means = {n: float(np.mean([scores[n] for scores in shifted])) for n in names}
    worst = {n: min(scores[n] for scores in shifted) for n in names}
    clean = result["dice"]["as acquired"]
    rows.append("| mean of the shifts | " + " | ".join(f"{means[n]:.4f}" for n in names) + " |")
    rows.append("| worst shift | " + " | ".join(f"{worst[n]:.4f}" for n in names) + " |")
    rows.append("| mean drop | " + " | ".join(f"{clean[n] - means[n]:+.4f}" for n in names) + " |")
    return "\n".join(rows)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


if __name__ == "__main__":
    sys.exit(main())
