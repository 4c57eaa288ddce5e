"""The HTTP endpoint for scripts: ``GET /v1/model`` and ``POST /v1/segment`` (FastAPI routes).

``POST /v1/segment`` takes a multipart ``file`` and answers the mask PNG exactly as
``medseg predict`` writes it for that file (same TTA default, same threshold), named in its
Content-Disposition; query options ``tta`` (auto, none, flip, d4, flip-scales), ``threshold``
(binary models), ``postprocess`` (true/false) and ``format`` (png, or npz: the mask, the
probabilities and the class names). What cannot be segmented gets a 4xx with ``{"error": "..."}``: 400 for a
bad option or no file, 413 past the size or pixel limit, 422 for a file that is not an image
medseg reads or whose channels the model cannot take. Imported once fastapi is known to be there.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse, Response

from medseg.commands.serve.model import Refused, ServedModel, upload_name
from medseg.config.choices import DEFAULT_TTA
from medseg.core.errors import MedsegError
from medseg.prediction.outputs import mask_pixels, npz_bytes

FORMATS = ("png", "npz")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def add_routes(app: FastAPI, served: ServedModel, uploads: Path) -> None:
    """Add the two routes to ``app``; uploads are written into a new folder under ``uploads``,
    removed when the request is answered."""

    @app.get("/v1/model")
    def describe_model() -> JSONResponse:
        return JSONResponse(served.describe())

    @app.post("/v1/segment")
    def segment(
        file: UploadFile | None = File(None),  # noqa: B008 (FastAPI's way of declaring it)
        tta: str = DEFAULT_TTA,
        threshold: str | None = None,
        postprocess: str = "false",
        format: str = "png",
    ) -> Response:
        try:
            options = parse_options(threshold=threshold, postprocess=postprocess, format=format)
            return answer(served, file, uploads, tta=tta, **options)
        except Refused as error:
            return refusal(str(error), error.status)
        except MedsegError as error:  # read_image's: not an image, corrupt, wrong channels
            return refusal(str(error), 422)


def refusal(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def parse_options(*, threshold: str | None, postprocess: str, format: str) -> dict:
    """The query's options as values, or a 400 that names the one that is wrong."""
    try:
        value = None if threshold in (None, "") else float(threshold)
    except ValueError:
        raise Refused(f"threshold {threshold!r} is not a number; pass e.g. 0.5", 400) from None
    flag = postprocess.strip().lower()
    if flag not in _TRUE + _FALSE:
        raise Refused(f"postprocess {postprocess!r} is not true or false", 400)
    if format not in FORMATS:
        raise Refused(f"format {format!r} is unknown; choose one of {', '.join(FORMATS)}", 400)
    return {"threshold": value, "postprocess": flag in _TRUE, "format": format}


def answer(
    served: ServedModel, file: UploadFile | None, uploads: Path, *, tta: str,
    threshold: float | None, postprocess: bool, format: str,
) -> Response:  # fmt: skip
    """Segment the upload and answer its mask (PNG) or its arrays (npz)."""
    if file is None:
        raise Refused("no file: send the image as the multipart field 'file'", 400)
    if file.size is not None and file.size > served.max_upload_bytes:
        raise Refused(
            f"{file.filename} is {file.size:,} bytes, more than this server takes "
            f"({served.max_upload_bytes:,})",
            413,
        )
    served.check_options(tta=tta, threshold=threshold)  # refused before reading the file
    with tempfile.TemporaryDirectory(prefix="upload-", dir=uploads) as folder:
        path = Path(folder) / upload_name(file.filename)
        with open(path, "wb") as handle:
            shutil.copyfileobj(file.file, handle)
        try:
            segmentation = served.segment(path, tta=tta)
        except MedsegError as error:  # say the client's name, not the temporary path
            raise type(error)(*_renamed(error, path, file.filename or path.name)) from None
    mask = served.mask(segmentation, threshold=threshold, postprocess=postprocess)
    headers = {"X-Medseg-TTA": segmentation.tta}
    if not served.multi_class:
        headers["X-Medseg-Threshold"] = str(threshold or served.predictor.threshold)
    if format == "npz":
        content = npz_bytes(
            segmentation.probability,
            served.class_names,
            mask=mask_pixels(mask, multi_class=served.multi_class),
        )
        name = segmentation.mask_name.removesuffix(".png") + ".npz"
        return _attachment(content, name, "application/octet-stream", headers)
    return _attachment(served.mask_png(mask), segmentation.mask_name, "image/png", headers)


def _renamed(error: MedsegError, path: Path, name: str) -> tuple:
    message = str(error).replace(str(path), name)
    return (message, error.status) if isinstance(error, Refused) else (message,)


def _attachment(content: bytes, name: str, media_type: str, headers: dict) -> Response:
    headers = {**headers, "Content-Disposition": f'attachment; filename="{name}"'}
    return Response(content=content, media_type=media_type, headers=headers)
