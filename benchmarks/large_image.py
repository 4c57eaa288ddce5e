"""Peak memory of `medseg predict` on one large image at its own resolution (a patch model).

A patch-trained model segments an image whole, by sliding window (`medseg.engine.sliding_window`),
so its memory grows with the image: this measures how much. It builds a resnet18 checkpoint
with the settings `medseg train` plans for patch training (256 × 256 patches, decoder at stride
2, image pooling over 256 × 256 windows) and random weights (memory and time do not depend on
what the weights learned), writes a synthetic RGB PNG of vessels on a textured background per
size, and runs ``medseg predict --tta none`` on it in a fresh process for each, reading that
process's own peak resident memory (VmHWM in /proc/self/status; getrusage's ru_maxrss where
/proc is missing) and its wall time.

    python benchmarks/large_image.py                    # 512 and 9000 pixels a side
    python benchmarks/large_image.py --sides 512 3000

Prints a table and writes it to ``benchmarks/results/large-image.{json,txt}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

from medseg.config import build_config  # noqa: E402
from medseg.engine.checkpoint import save_checkpoint  # noqa: E402
from medseg.engine.sliding_window import inference_tile, tile_starts  # noqa: E402
from medseg.model import DeepLabV3Plus  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATCH = 256
PHASES = ("read", "predict", "write")

# Runs in the child: the command as a user types it, with its resident memory sampled every
# 5 ms and labelled by what predict is doing (reading an image, predicting, writing its files),
# then the process's own peak (VmHWM: every byte, between the samples too).
CHILD = """
import json, resource, sys, threading, time
import medseg.commands.predict as command
import medseg.prediction.outputs as outputs
from medseg.cli import main
from medseg.prediction.predictor import Predictor

def rss(field="VmRSS"):
    try:
        return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
    except OSError:  # no /proc: getrusage's peak (KiB on Linux and BSD)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

phase, peaks = ["start"], {}
def sample():
    while True:
        peaks[phase[0]] = max(peaks.get(phase[0], 0), rss())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()

def labelled(name, function):
    def run(*args, **kwargs):
        phase[0] = name
        try:
            return function(*args, **kwargs)
        finally:
            peaks[name] = max(peaks.get(name, 0), rss())
    return run

outputs.read_image = labelled("read", outputs.read_image)
Predictor.probabilities = labelled("predict", Predictor.probabilities)
command.write_outputs = labelled("write", command.write_outputs)
status = main(sys.argv[1:])
print("RESULT", json.dumps({"status": status, "peak": rss("VmHWM"), "phases": peaks}))
"""


def patch_checkpoint(path: Path) -> Path:
    """A resnet18 patch-model checkpoint as `medseg train` plans one, with random weights."""
    config = build_config(
        overrides={
            "model.backbone": "resnet18",
            "model.pretrained": False,
            "data.mode": "patch",
            "data.image_size": PATCH,
            "model.decoder_stride": 2,
            "model.pooling_window": PATCH,
        }
    )
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config.model)
    state = {"config": config.to_dict(), "model": model.state_dict(), "epoch": 1, "metrics": {}}
    save_checkpoint(path, state)
    return path


def vessel_image(path: Path, side: int, seed: int = 0) -> Path:
    """An RGB PNG of ``side`` × ``side``: dark lines (vessels) on a reddish textured ground."""
    rng = np.random.default_rng(seed)
    image = np.empty((side, side, 3), np.uint8)
    image[...] = (40, 70, 150)  # BGR: reddish, as a fundus photograph
    for _ in range(max(4, side // 30)):
        start, end = rng.integers(0, side, 2), rng.integers(0, side, 2)
        width = int(rng.integers(1, max(2, side // 400) + 2))
        cv2.line(image, tuple(map(int, start)), tuple(map(int, end)), (20, 30, 60), width)
    for row in range(0, side, 1024):  # texture in bands: no whole-image int64 noise
        band = image[row : row + 1024]
        noise = rng.integers(0, 24, band.shape[:2], dtype=np.uint8)[..., None]
        np.add(band, noise, out=band)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return path


def measure(checkpoint: Path, image: Path, out: Path) -> dict:
    """Peak resident bytes (in all, and sampled in each phase) and seconds of ``medseg predict``
    on ``image``, in a fresh process."""
    command = [
        *("predict", "--checkpoint", str(checkpoint), "--input", str(image)),
        *("--out", str(out), "--tta", "none", "--quiet"),
    ]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *command], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"medseg predict failed on {image}:\n{done.stdout}\n{done.stderr}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if result["status"] != 0:
        raise SystemExit(f"medseg predict exited {result['status']} on {image}:\n{done.stderr}")
    phases = {name: result["phases"].get(name, 0) for name in PHASES}
    return {"peak_rss_bytes": result["peak"], "phase_peak_bytes": phases, "seconds": seconds}


def extrapolate(rows: list[dict], side: int) -> dict:
    """The peak at ``side`` × ``side`` from the two largest measured images: each phase's
    sampled peak on a line through its two values (memory per pixel plus a fixed part), the
    largest of them, and the overall peak scaled by the same ratio (between samples, a phase
    peaks a little above its samples)."""
    small, large = sorted(rows, key=lambda row: row["side"])[-2:]
    pixels = side * side

    def line(low: float, high: float) -> float:
        slope = (high - low) / (large["side"] ** 2 - small["side"] ** 2)
        return high + slope * (pixels - large["side"] ** 2)

    phases = {
        name: line(small["phase_peak_bytes"][name], large["phase_peak_bytes"][name])
        for name in PHASES
    }
    sampled = max(phases.values())
    ratio = large["peak_rss_bytes"] / max(large["phase_peak_bytes"].values())
    return {
        "side": side, "megapixels": pixels / 1e6, "tiles": tiles(side), "extrapolated": True,
        "peak_rss_bytes": round(sampled * ratio), "phase_peak_bytes": phases, "seconds": None,
    }  # fmt: skip


def tiles(side: int) -> int:
    tile = max(PATCH, min(inference_tile(PATCH), side))
    return len(tile_starts(max(side, tile), tile, 0.5)) ** 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 9000])
    parser.add_argument(
        "--extrapolate", type=int, metavar="SIDE",
        help="also estimate SIDE × SIDE from the two largest sides measured (said in the table)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="medseg-large-") as folder:
        folder = Path(folder)
        checkpoint = patch_checkpoint(folder / "patch.pt")
        for side in args.sides:
            image = vessel_image(folder / f"vessels-{side}.png", side)
            result = measure(checkpoint, image, folder / f"masks-{side}")
            rows.append({"side": side, "megapixels": side * side / 1e6, "tiles": tiles(side)})
            rows[-1].update(result)
            image.unlink()
            print(table(rows[-1:], header=len(rows) == 1), flush=True)
    if args.extrapolate and len(rows) >= 2:
        rows.append(extrapolate(rows, args.extrapolate))
        print(table(rows[-1:], header=False))
    result = {
        "command": "python benchmarks/large_image.py " + " ".join(sys.argv[1:]),
        "what": "medseg predict --tta none on one synthetic RGB PNG; patch model: resnet18, "
        "256-pixel patches, 384-pixel tiles, random weights",
        "hardware": hardware(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "large-image.json").write_text(json.dumps(result, indent=2) + "\n")
    text = f"{result['command']}\n{result['what']}\n{result['hardware']}\n\n{table(rows)}\n"
    (RESULTS / "large-image.txt").write_text(text)
    print(f"\n{result['hardware']}")
    return 0


def table(rows: list[dict], *, header: bool = True) -> str:
    """Markdown rows: the image, its tiles, the peak in all and per phase (GiB), the time."""
    lines = [
        "| image | megapixels | tiles | peak RSS | reading | predicting | writing | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = lines if header else []
    for row in rows:
        name = f"{row['side']} × {row['side']}" + (
            " (extrapolated)" if row.get("extrapolated") else ""
        )
        phases = " | ".join(f"{row['phase_peak_bytes'][name] / 2**30:.2f}" for name in PHASES)
        seconds = "–" if row["seconds"] is None else f"{row['seconds']:.0f} s"
        lines.append(
            f"| {name} | {row['megapixels']:.1f} | {row['tiles']} "
            f"| {row['peak_rss_bytes'] / 2**30:.2f} GiB | {phases} | {seconds} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
