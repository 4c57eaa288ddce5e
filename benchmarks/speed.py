"""Speed: medseg's default recipe against the usual way and the reference libraries.

    python benchmarks/speed.py                 # 256×256, batch 16, a full cached ISIC epoch
    python benchmarks/speed.py --epoch-steps 20   # the epoch extrapolated from 20 steps
    python benchmarks/speed.py --quick         # smoke run: 128×128, batch 4, few steps (~2 min)
    python benchmarks/speed.py --compile       # also the recipe under torch.compile
    python benchmarks/speed.py --backbone efficientnet-lite0 --models bf16-cl fp32-cl

Measures, on one device (``--device``, default the GPU when there is one):

- training and inference images/s of medseg's DeepLabv3+ (ResNet-50, or ``--backbone``; seed
  variant) in its default recipe, with bf16/float32 × channels_last/NCHW measured so the defaults can be checked;
- the same network the usual way: float32, NCHW, a plain PyTorch loop (model, loss, backward,
  ``torch.optim.AdamW`` with its defaults);
- segmentation_models_pytorch DeepLabV3Plus-ResNet50 and torchvision deeplabv3_resnet50 in the
  same plain loop (``pip install -e .[bench]`` for smp);
- FLOPs per image (torch's FlopCounterMode, forward; training counted as 3 × forward) and the
  achieved FLOP/s as a share of the bf16 and float32 matmul rates measured in the same run;
- peak resident memory of training: each model is measured in a fresh process, where
  ``ru_maxrss`` is read right after its training steps;
- a training epoch on ISIC 2017 train/ from the prepared cache through medseg's own DataLoader
  and loop, with the share of the step spent waiting for the next batch.

Throughputs are medians over ``--repeats`` timed repeats after warm-up steps. Prints a table and
writes the same numbers as JSON (``benchmarks/results/speed-<host>.json``, or ``--json PATH``).
``--quick`` only checks that everything runs: on its small images and batches bf16 gains far less
than at 256×256, batch 16, so its ratios say nothing about the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2017"
GIB = 2**30

# name -> (label, network, loop, precision, channels_last). "recipe" is medseg's train_one_epoch
# and Predictor's inference context; "plain" is model(x), loss, backward, step.
MODELS = {
    "bf16-cl": ("medseg bf16, channels_last", "medseg", "recipe", "bf16", True),
    "bf16-nchw": ("medseg bf16, NCHW", "medseg", "recipe", "bf16", False),
    "fp32-cl": ("medseg fp32, channels_last", "medseg", "recipe", "fp32", True),
    "usual": ("medseg the usual way (fp32, NCHW, plain loop)", "medseg", "plain", "fp32", False),
    "smp": ("smp DeepLabV3Plus-R50 (fp32, plain loop)", "smp", "plain", "fp32", False),
    "torchvision": ("torchvision deeplabv3_resnet50 (fp32, plain)", "torchvision", "plain", "fp32", False),
}  # fmt: skip
TARGETS_CPU = {"train_vs_smp": 4.0, "infer_vs_smp": 8.0, "bf16_matmul_share": 0.40,
               "data_wait": 0.10, "peak_gib_at_batch_16": 4.0}  # fmt: skip
TARGETS_GPU = {"train_images_per_s": 3000.0, "infer_images_per_s": 10000.0, "data_wait": 0.10}


def main() -> int:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    device = pick_device(args.device)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    settings = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    report: dict[str, Any] = {"settings": settings | {"device": str(device)}}
    report["machine"] = describe_machine(device)
    say(f"matmul rates ({args.matmul_size}², bf16 and float32) ...")
    report["matmul"] = {
        dtype: matmul_rate(device, dtype, args.matmul_size, args.repeats)
        for dtype in ("bfloat16", "float32")
    }
    report["probe_flops_per_s"] = probe_rate(device)
    report["models"] = {}
    names = [*(args.models or MODELS), *(["compiled"] if args.compile else [])]
    for name in names:
        say(f"{model_label(name)} ...")
        spec = {"kind": "model", "name": name} | common_spec(args, device)
        report["models"][name] = in_fresh_process(spec)
    report["recipe"] = recipe_name()
    if args.epoch_steps >= 0 and (args.data / "train" / "images").is_dir():
        say(f"a training epoch on {args.data}/train (cache, medseg loader and loop) ...")
        spec = {"kind": "epoch", "data": str(args.data), "max_steps": args.epoch_steps}
        report["epoch"] = in_fresh_process(spec | common_spec(args, device))
    else:
        report["epoch"] = {"error": f"skipped (no {args.data}/train/images or --epoch-steps -1)"}
    report["machine"]["load_after"] = os.getloadavg()
    report["summary"] = summarize(report, args)
    print(format_report(report, args))
    out = args.json or REPO / "benchmarks" / "results" / json_name(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median taken)")
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--matmul-size", type=int, help="side of the matmul test (default 2048; 8192 on a GPU)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISIC-layout data root")
    parser.add_argument(
        "--epoch-steps", type=int, default=0, help="0: a full epoch; N: N steps, extrapolated"
    )
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers of the epoch measurement"
    )
    parser.add_argument("--compile", action="store_true", help="also the recipe, torch.compiled")
    parser.add_argument(
        "--backbone", default="resnet50", help="medseg's encoder (smp stays ResNet-50)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), help="only these rows (default: all)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    parser.add_argument("--json", type=Path, help="where to write the JSON report")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.repeats, args.steps, args.warmup = 128, 4, 2, 1, 1
        args.matmul_size, args.epoch_steps = args.matmul_size or 1024, args.epoch_steps or 3
    return args


def json_name(args) -> str:
    host = socket.gethostname().split(".")[0] or "host"
    return f"speed-{host}{'-quick' if args.quick else ''}.json"


def common_spec(args, device: torch.device) -> dict[str, Any]:
    keys = ("size", "batch", "repeats", "steps", "warmup", "num_workers", "backbone")
    return {key: getattr(args, key) for key in keys} | {"device": str(device)}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The machine


def pick_device(name: str) -> torch.device:
    from medseg.engine.runtime import select_device

    return select_device(name)


def describe_machine(device: torch.device) -> dict[str, Any]:
    from medseg.engine.runtime import cpu_has_fast_bfloat16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_fast_bf16": cpu_has_fast_bfloat16(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype_name: str, n: int, repeats: int) -> float:
    """Median FLOP/s of an n×n by n×n matrix product."""
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: torch.matmul(a, b), device=device, warmup=1, repeats=max(3, repeats))
    return 2 * n**3 / statistics.median(times)


def probe_rate(device: torch.device) -> float:
    """A short float32 matmul rate: measured again beside each row, it shows whether other work
    slowed the machine down while that row ran (a shared machine's numbers drift)."""
    return matmul_rate(device, "float32", 1024, repeats=5)


def timed(step, *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


# ---------------------------------------------------------------------------------------------
# Measurements, each in a fresh process (so that peak memory belongs to one model)


def in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return {"error": (lines[-1] if lines else f"exit status {done.returncode}")[:300]}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    try:
        if spec["kind"] == "epoch":
            return measure_epoch(spec, device)
        return measure_model(spec, device)
    except ImportError as error:
        return {"error": f"{error} (pip install -e .[bench])"}


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    """Peak resident memory of this process so far (and peak CUDA memory on a GPU)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if device.type == "cuda":
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def build_network(network: str, backbone: str = "resnet50") -> nn.Module:
    if network == "medseg":
        from medseg.config import Config
        from medseg.model import DeepLabV3Plus

        settings = dataclasses.replace(Config().model, backbone=backbone)
        return DeepLabV3Plus.from_config(settings, pretrained=False)
    if network == "smp":
        import segmentation_models_pytorch as smp

        return smp.DeepLabV3Plus(
            encoder_name="resnet50", encoder_weights=None, decoder_atrous_rates=(6, 12, 18)
        )
    from torchvision.models.segmentation import deeplabv3_resnet50

    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=1, aux_loss=False)


def logits_of(output) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output  # torchvision returns a dict


def forward_flops(model: nn.Module, size: int, device: torch.device) -> int:
    """FLOPs of one image's forward pass (a multiply-add counts 2), as FlopCounterMode sees them.

    Training is taken as 3 × forward: FlopCounterMode over-counts the backward pass of grouped
    (depthwise) convolutions, which smp's decoder uses, so its own backward count is not used.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    image = torch.randn(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return counter.get_total_flops()


def synthetic_batch(spec: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Normalised-looking images and blob masks, already on the device (the data path is
    measured by the epoch, not here)."""
    batch, size = spec["batch"], spec["size"]
    images = torch.randn(batch, 3, size, size, device=device)
    grid = torch.linspace(-1, 1, size, device=device)
    radius = torch.rand(batch, 1, 1, device=device) * 0.5 + 0.3
    masks = (grid[None, :, None] ** 2 + grid[None, None, :] ** 2 < radius**2).float()
    return {"image": images, "mask": masks[:, None]}


def measure_model(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from medseg.config import Config
    from medseg.engine.runtime import CompiledOrEager, seed_everything, select_precision
    from medseg.engine.train import build_optimizer, build_scheduler, loss_settings, train_one_epoch
    from medseg.losses import build_loss

    name = spec["name"]
    _, network_name, loop, precision_name, channels_last = MODELS.get(name) or recipe_row()
    config = Config()
    precision = select_precision(precision_name, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_network(network_name, spec.get("backbone", "resnet50"))
    model = model.to(device, memory_format=memory_format)
    network = CompiledOrEager(model) if name == "compiled" else model
    loss_fn = build_loss(config.train.loss, **loss_settings(config.train))
    batch = synthetic_batch(spec, device)
    steps = spec["steps"]

    if loop == "recipe":
        seed_everything(0)  # and, as `medseg train` does, cuDNN's autotuner on a GPU
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config, steps_per_epoch=1000)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.scale_loss)

        def train_steps():
            train_one_epoch(
                network, [batch] * steps, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                loss_fn=loss_fn, device=device, precision=precision, epoch=1,
                channels_last=channels_last, progress=False,
            )  # fmt: skip
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_steps():
            model.train()
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(logits_of(model(batch["image"])), batch["mask"])
                loss.backward()
                optimizer.step()
                loss.item()

    result: dict[str, Any] = {"label": model_label(name), "probe_flops_per_s": [probe_rate(device)]}
    started = time.perf_counter()
    train_times = timed(train_steps, device=device, warmup=spec["warmup"], repeats=0)
    result["warmup_seconds"] = time.perf_counter() - started  # includes compiling, if any
    train_times = timed(train_steps, device=device, warmup=0, repeats=spec["repeats"])
    result |= peak_memory_bytes(device)  # training's peak: nothing bigger has run yet
    result["train_images_per_s"] = spec["batch"] * steps / statistics.median(train_times)
    result["train_seconds"] = train_times

    images = batch["image"].contiguous(memory_format=memory_format)

    @torch.no_grad()
    def infer():  # as Predictor runs the network: eval, no_grad, autocast, memory format
        with precision.autocast(device):
            logits_of(network(images)).float()

    model.eval()
    if name == "compiled":  # inference as `medseg predict --compile` runs it: frozen weights
        network = CompiledOrEager(model, options={"freezing": True})
    infer_times = timed(infer, device=device, warmup=spec["warmup"], repeats=spec["repeats"])
    result["probe_flops_per_s"].append(probe_rate(device))
    result["infer_images_per_s"] = spec["batch"] / statistics.median(infer_times)
    result["infer_seconds"] = infer_times
    result["compile_failed"] = getattr(network, "failed", None)
    result["forward_flops_per_image"] = forward_flops(model, spec["size"], device)
    return result


class TimedLoader:
    """Iterates a DataLoader (up to ``max_steps`` batches), adding up the time spent waiting for
    each batch; the time between batches is the training step's own."""

    def __init__(self, loader, max_steps: int = 0):
        self.loader = loader
        self.steps = min(len(loader), max_steps) if max_steps > 0 else len(loader)
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        batches = iter(self.loader)
        for _ in range(self.steps):
            started = time.perf_counter()
            batch = next(batches)
            self.wait_seconds += time.perf_counter() - started
            yield batch


def measure_epoch(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One training epoch and its validation pass as `medseg train` runs them, on the cache."""
    from medseg.config import build_config
    from medseg.engine.train import TrainingSetup, train_one_epoch
    from medseg.engine.validation import evaluate_loader

    config = build_config(
        overrides={
            "data.image_size": spec["size"],
            "train.batch_size": spec["batch"],
            "data.num_workers": spec.get("num_workers", 0),
            "train.device": str(device),
        }
    )
    settings = config.train
    started = time.perf_counter()
    setup = TrainingSetup.build(config, spec["data"], pretrained=False, progress=False)
    prepare_seconds = time.perf_counter() - started  # mostly opening the cache
    model, precision, loss_fn = setup.model, setup.precision, setup.loss_fn
    optimizer, scheduler, scaler = setup.optimizer, setup.scheduler, setup.scaler
    train_loader, val_loader = setup.train_loader, setup.val_loader
    train_loader.batch_sampler.sampler.set_epoch(1)

    def train(batches):
        train_one_epoch(
            model, batches, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            loss_fn=loss_fn, device=device, precision=precision, epoch=1,
            channels_last=settings.channels_last, progress=False,
        )  # fmt: skip

    # Untimed steps first, as for the model rows: cuDNN picks its algorithms on the first ones.
    if spec["warmup"] > 0:
        train(TimedLoader(train_loader, spec["warmup"]))
        synchronize(device)
    train_batches = TimedLoader(train_loader, spec["max_steps"])
    started = time.perf_counter()
    train(train_batches)
    synchronize(device)
    train_seconds = time.perf_counter() - started
    val_batches = TimedLoader(val_loader, spec["max_steps"])
    started = time.perf_counter()
    evaluate_loader(
        model, val_batches, loss_fn=loss_fn, device=device, precision=precision,
        threshold=settings.threshold, channels_last=settings.channels_last,
    )  # fmt: skip
    val_seconds = time.perf_counter() - started
    # A limited run stands for the whole epoch at its measured pace.
    epoch_seconds = train_seconds * len(train_loader) / train_batches.steps + val_seconds * len(
        val_loader
    ) / max(val_batches.steps, 1)
    return {
        "train_images": len(train_loader.dataset),
        "val_images": len(val_loader.dataset),
        "num_workers": config.data.num_workers,
        "steps_measured": train_batches.steps,
        "steps_per_epoch": len(train_loader),
        "cache_open_seconds": prepare_seconds,
        "train_seconds": train_seconds,
        "val_seconds": val_seconds,
        "epoch_seconds": epoch_seconds,
        "data_wait_share": train_batches.wait_seconds / train_seconds,
        "train_images_per_s": train_batches.steps * spec["batch"] / train_seconds,
    }


# ---------------------------------------------------------------------------------------------
# Which row is the default recipe, the summary, the table


def recipe_row() -> tuple[str, str, str, str, bool]:
    """The recipe as `medseg train` runs it by default: precision 'auto', channels_last default."""
    from medseg.config import TrainConfig
    from medseg.engine.runtime import select_device, select_precision

    settings = TrainConfig()
    precision = select_precision(settings.precision, select_device(settings.device)).name
    label = f"medseg {precision}, {'channels_last' if settings.channels_last else 'NCHW'}"
    return f"{label}, torch.compile", "medseg", "recipe", precision, settings.channels_last


def recipe_name() -> str:
    """The row of MODELS that `medseg train` runs by default on this machine."""
    *_, precision, channels_last = recipe_row()
    name = f"{precision}-{'cl' if channels_last else 'nchw'}"
    return "usual" if name == "fp32-nchw" else name


def model_label(name: str) -> str:
    return (MODELS.get(name) or recipe_row())[0]


def summarize(report: dict[str, Any], args) -> dict[str, Any]:
    models, matmul = report["models"], report["matmul"]
    for row in models.values():
        if "error" in row:
            continue
        flops = row["forward_flops_per_image"]
        row["train_flops_per_s"] = 3 * flops * row["train_images_per_s"]
        row["infer_flops_per_s"] = flops * row["infer_images_per_s"]
        for dtype in ("bfloat16", "float32"):
            row[f"train_share_of_{dtype}_matmul"] = row["train_flops_per_s"] / matmul[dtype]
    recipe, smp, epoch = models.get(report["recipe"], {}), models.get("smp", {}), report["epoch"]
    summary: dict[str, Any] = {"recipe": report["recipe"]}
    if recipe and smp and "error" not in recipe and "error" not in smp:
        summary["train_vs_smp"] = recipe["train_images_per_s"] / smp["train_images_per_s"]
        summary["infer_vs_smp"] = recipe["infer_images_per_s"] / smp["infer_images_per_s"]
    if recipe and "error" not in recipe:
        summary["bf16_matmul_share"] = recipe["train_share_of_bfloat16_matmul"]
        summary["peak_gib"] = peak_bytes(recipe) / GIB
        summary["train_images_per_s"] = recipe["train_images_per_s"]
        summary["infer_images_per_s"] = recipe["infer_images_per_s"]
    if "error" not in epoch:
        summary["data_wait"] = epoch["data_wait_share"]
    for precision in ("bf16", "fp32"):
        cl, nchw = models.get(f"{precision}-cl", {}), models.get(f"{precision}-nchw")
        nchw = nchw or (models.get("usual") if precision == "fp32" else None)
        if cl and nchw and "error" not in cl and "error" not in nchw:
            summary[f"{precision}_channels_last_train_gain"] = (
                cl["train_images_per_s"] / nchw["train_images_per_s"]
            )
            summary[f"{precision}_channels_last_infer_gain"] = (
                cl["infer_images_per_s"] / nchw["infer_images_per_s"]
            )
    summary["checks"] = targets(summary, report, args)
    return summary


def targets(summary: dict[str, Any], report: dict[str, Any], args) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it holds (None: not measured)."""
    gpu = report["settings"]["device"].startswith("cuda")
    goals = TARGETS_GPU if gpu else TARGETS_CPU
    checks = []
    for key, goal in goals.items():
        if key == "peak_gib_at_batch_16":
            value = summary.get("peak_gib") if args.batch == 16 else None
            holds = None if value is None else value <= goal
        elif key == "data_wait":
            value = summary.get(key)
            holds = None if value is None else value <= goal
        else:
            value = summary.get(key)
            holds = None if value is None else value >= goal
        checks.append({"target": key, "goal": goal, "value": value, "holds": holds})
    return checks


def format_report(report: dict[str, Any], args) -> str:
    machine, matmul, summary = report["machine"], report["matmul"], report["summary"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['torch_threads']} threads"
    lines = [
        f"medseg speed, {args.size}×{args.size} batch {args.batch}, on {where}; "
        f"torch {machine['torch']}; medians of {args.repeats} repeats"
        + ("  [--quick: not the benchmark's size]" if args.quick else ""),
        f"load average before/after: {fmt_load(machine['load_before'])} / "
        f"{fmt_load(machine['load_after'])} (other work on the machine slows every row)",
        f"matmul {args.matmul_size}²: bf16 {matmul['bfloat16'] / 1e9:.0f} GFLOP/s, "
        f"float32 {matmul['float32'] / 1e9:.0f} GFLOP/s",
        "",
    ]
    header = (
        f"{'model':<50} {'train img/s':>11} {'×smp':>5} {'infer img/s':>11} {'×smp':>5} "
        f"{'GFLOP/img':>9} {'train GFLOP/s':>13} {'%bf16 mm':>8} {'%fp32 mm':>8} {'peak GiB':>8} "
        f"{'machine':>7}"
    )
    lines += [header, "-" * len(header)]
    smp = report["models"].get("smp", {})
    for name, row in report["models"].items():
        label = row.get("label", name) + ("  ← default" if name == summary["recipe"] else "")
        if "error" in row:
            lines.append(f"{label:<50} not measured: {row['error']}")
            continue
        train_ratio = ratio(row, smp, "train_images_per_s")
        infer_ratio = ratio(row, smp, "infer_images_per_s")
        lines.append(
            f"{label:<50} {row['train_images_per_s']:>11.2f} {train_ratio:>5} "
            f"{row['infer_images_per_s']:>11.2f} {infer_ratio:>5} "
            f"{row['forward_flops_per_image'] / 1e9:>9.1f} {row['train_flops_per_s'] / 1e9:>13.0f} "
            f"{100 * row['train_share_of_bfloat16_matmul']:>7.0f}% "
            f"{100 * row['train_share_of_float32_matmul']:>7.0f}% "
            f"{peak_bytes(row) / GIB:>8.2f} "
            f"{100 * machine_share(row, report):>6.0f}%"
            + (" (compile failed)" if row.get("compile_failed") else "")
        )
    lines.append(
        "machine: the row's float32 matmul probe (before and after it, the slower) against the "
        "run's start; well below 100%, other work slowed that row: rerun on a quiet machine"
    )
    lines.append("")
    epoch = report["epoch"]
    if "error" in epoch:
        lines.append(f"epoch: {epoch['error']}")
    else:
        measured = (
            "a full epoch"
            if epoch["steps_measured"] == epoch["steps_per_epoch"]
            else f"{epoch['steps_measured']} of {epoch['steps_per_epoch']} steps, extrapolated"
        )
        lines.append(
            f"epoch on ISIC 2017 train/ ({epoch['train_images']} training + {epoch['val_images']} "
            f"validation images, cached, num_workers={epoch['num_workers']}): "
            f"{epoch['epoch_seconds']:.0f} s ({measured}); "
            f"{epoch['train_images_per_s']:.2f} img/s; waiting for data "
            f"{100 * epoch['data_wait_share']:.1f}% of the training step"
        )
    for precision in ("bf16", "fp32"):
        gain = summary.get(f"{precision}_channels_last_train_gain")
        if gain:
            infer_gain = summary[f"{precision}_channels_last_infer_gain"]
            lines.append(
                f"channels_last vs NCHW in {precision}: training ×{gain:.2f}, "
                f"inference ×{infer_gain:.2f}"
            )
    lines.append("")
    for check in summary["checks"]:
        value = check["value"]
        shown = "not measured" if value is None else f"{value:.3g}"
        verdict = {True: "holds", False: "MISSED", None: "-"}[check["holds"]]
        lines.append(
            f"target {check['target']:<22} goal {check['goal']:<7g} {shown:>12}  {verdict}"
        )
    return "\n".join(lines)


def machine_share(row: dict[str, Any], report: dict[str, Any]) -> float:
    """The slower of the row's two matmul probes against the run's first: below 1, other work
    took part of the machine while the row was measured."""
    return min(row["probe_flops_per_s"]) / report["probe_flops_per_s"]


def peak_bytes(row: dict[str, Any]) -> int:
    """Peak memory of training: the GPU's on a GPU, else the process's resident memory."""
    return row.get("peak_cuda_bytes", row["peak_rss_bytes"])


def ratio(row: dict[str, Any], reference: dict[str, Any], key: str) -> str:
    if key not in reference:
        return "-"
    return f"{row[key] / reference[key]:.1f}"


def fmt_load(load) -> str:
    return " ".join(f"{value:.1f}" for value in load)


if __name__ == "__main__":
    sys.exit(main())
