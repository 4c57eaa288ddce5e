"""What the accuracy benchmarks share: training a run once (reused when finished, resumed when
interrupted) and naming the hardware a figure was measured on."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

import medseg


def train_once(data: Path, run: Path, overrides: dict, *, preset: str = "default") -> float:
    """Seconds ``medseg train`` took on ``data`` into ``run``: a finished run is reused, an
    interrupted one resumed (then the seconds are those of the resumed part)."""
    finished = run / "result.json"
    if finished.is_file():
        return json.loads(finished.read_text())["train_seconds"]
    started = time.perf_counter()
    resume = (run / "checkpoints" / "last.pt").is_file()
    if resume:
        medseg.train(data=data, out=run, resume=True)
    else:
        medseg.train(data=data, out=run, preset=preset, overrides=overrides, overwrite=True)
    seconds = time.perf_counter() - started
    finished.write_text(json.dumps({"train_seconds": seconds, "resumed": resume}))
    return seconds


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as info:  # Linux: the model's own name
        cpu = next((line.split(":", 1)[1].strip() for line in info if "model name" in line), cpu)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
