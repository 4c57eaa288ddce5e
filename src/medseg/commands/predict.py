"""``medseg predict``: segment an image file or a folder of images into mask files."""

from __future__ import annotations

from pathlib import Path

from medseg.config.choices import DEFAULT_TTA
from medseg.core.files import check_writable
from medseg.core.progress import progress_bar
from medseg.engine.runtime import releases_process_group
from medseg.formats.source import resolve_source
from medseg.prediction.outputs import (
    PredictionReport,
    claim_output,
    collect_inputs,
    output_ids,
    output_names,
    prediction_record,
    readable_batches,
    write_outputs,
)
from medseg.prediction.predictor import Predictor, check_threshold
from medseg.prediction.shards import Shards


@releases_process_group
def predict(
    checkpoint: str | Path,
    source: str | Path,
    output: str | Path,
    *,
    batch_size: int = 16,
    tta: str = DEFAULT_TTA,
    postprocess: bool = False,
    probabilities: bool = False,
    overlays: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    compile: bool = False,
    threshold: float | None = None,
) -> PredictionReport:
    """Segment an image file or a folder of images into ``output/<id>_segmentation.png``.

    A binary model writes 0/255 masks (with ``probabilities``, ``<id>_probability.png``: the
    foreground probability × 255); a K-class model writes 8-bit label maps whose values are
    class indices (with ``probabilities``, ``<id>_probabilities.npz``: float16 "probabilities"
    (K, H, W) and the class names "labels"). ``overlays`` adds ``<id>_overlay.png``.
    Masks already in ``output`` are kept and skipped unless ``overwrite``: an interrupted run
    resumes where it stopped. Unreadable images are listed in the report; the others are written.
    ``threshold`` cuts the foreground probability (None: the checkpoint's; binary models only).
    ``tta`` "auto" is resolved per checkpoint (`resolve_tta`); the record holds the mode run.

    Under torchrun each rank segments its share of the images still to do (`Shards`); rank 0
    alone claims ``output`` first, and every rank returns the report of the whole job.
    """
    check_threshold(threshold)
    output = Path(output)
    inputs = collect_inputs(source)
    ids = output_ids(inputs)  # unique names, whatever the files' stems and DICOM UIDs
    check_writable(output)
    predictor = Predictor.from_checkpoint(
        checkpoint,
        device=device,
        precision=precision,
        tta=tta,
        postprocess=postprocess,
        compile=compile,
        threshold=threshold,
    )
    record = prediction_record(resolve_source(checkpoint), predictor)
    extras = {"probabilities": probabilities, "overlays": overlays}
    names = {
        path: output_names(path, multi_class=predictor.multi_class, stem=ids[path], **extras)
        for path in inputs
    }
    shards = Shards.join()
    pending, skipped = shards.main_first(lambda: _claim(output, names, record, overwrite))
    report = PredictionReport()
    _segment(
        predictor, shards.share(pending), output, names, report,
        batch_size=batch_size, progress=progress and shards.is_main,
    )  # fmt: skip
    reports = shards.gather(report)  # every rank takes part; rank 0 receives
    return shards.main_first(lambda: _joined(reports, skipped))


def _claim(output, names, record, overwrite) -> tuple[list[Path], list[Path]]:
    """`claim_output`: the images still to segment, and the masks already there."""
    report = PredictionReport()
    pending = claim_output(output, names, record, overwrite=overwrite, report=report)
    return pending, report.skipped


def _joined(reports: list[PredictionReport], skipped: list[Path]) -> PredictionReport:
    """The report of the whole job from each rank's, in rank order (the order of the inputs)."""
    return PredictionReport(
        written=[path for report in reports for path in report.written],
        skipped=skipped,
        failed=[failure for report in reports for failure in report.failed],
    )


def _segment(predictor, pending, output, names, report, *, batch_size, progress) -> None:
    """Write every file of each image in ``pending`` (unreadable ones go to the report)."""
    bar = progress_bar(total=len(pending), desc="predicting", enabled=progress)
    channels = predictor.config.data.channels
    for paths, images in readable_batches(pending, batch_size, report, channels=channels):
        for path, image, probability in zip(
            paths, images, predictor.probabilities(images), strict=True
        ):
            write_outputs(output, path, image, probability, predictor, names[path])
            report.written.append(output / names[path][-1])
        bar.update(len(paths))
    bar.close()
