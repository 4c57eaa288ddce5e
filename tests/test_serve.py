"""``medseg serve``: the endpoint answers the very masks `medseg predict` writes, for every kind
of model (binary RGB, a grayscale label map, a patch model by sliding window, an int8 ONNX and
a safetensors export); refusals are JSON 4xx and the server goes on; concurrent uploads each
get their own answer; and the page works in a real browser (Debian's Chromium driven by
Playwright): upload, overlay, legend, threshold, download, no JavaScript error, nothing fetched
from anywhere but the server."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import ISIC_ROOT, write_label_map_set
from PIL import Image

import medseg
from medseg.cli import main
from medseg.data.synthetic import make_synthetic_dataset

pytest.importorskip("gradio", reason="medseg serve needs the extra medseg[serve] (gradio)")
httpx = pytest.importorskip("httpx", reason="the endpoint tests post with httpx")

from medseg.commands.serve import running, startup_lines  # noqa: E402 (after the skip)
from medseg.commands.serve.about import example_images  # noqa: E402
from medseg.commands.serve.model import ServedModel  # noqa: E402
from medseg.commands.serve.page import areas_markdown, legend_html  # noqa: E402

TINY = ["--no-pretrained", "--backbone", "resnet18", "--image-size", "64", "--batch-size", "4"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve.png"


def copy_isic(target: Path, *, train: int, test: int) -> Path:
    for split, count in (("train", train), ("test", test)):
        for folder in ("images", "masks"):
            (target / split / folder).mkdir(parents=True)
        for image in sorted((ISIC_ROOT / split / "images").glob("*.jpg"))[:count]:
            mask = ISIC_ROOT / split / "masks" / f"{image.stem}_segmentation.png"
            shutil.copyfile(image, target / split / "images" / image.name)
            shutil.copyfile(mask, target / split / "masks" / mask.name)
    return target


def train(data: Path, run: Path, *flags: str) -> Path:
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "--quiet", *flags]) == 0
    return run


def predicted(checkpoint: Path, images: Path, out: Path, *flags: str) -> Path:
    """`medseg predict`'s output folder. One image per network call, as the server runs it
    (a batch of several may round differently on some CPUs)."""
    argv = ["predict", "--checkpoint", str(checkpoint), "-i", str(images), "-o", str(out)]
    assert main([*argv, "--batch-size", "1", "--quiet", *flags]) == 0
    return out


def post(url: str, path: Path, **params) -> httpx.Response:
    with open(path, "rb") as handle:
        files = {"file": (path.name, handle.read())}
    return httpx.post(f"{url}/v1/segment", files=files, params=params, timeout=300)


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    """(run folder, data root): resnet18 at 64×64 trained briefly on 24 real ISIC pairs, enough
    for masks that follow the lesions (best validation Dice about 0.8 on this CPU). Where the
    shared ISIC images are missing (CI), the demo's synthetic lesions in the same layout stand
    in, so the endpoint and the browser are tested everywhere."""
    folder = tmp_path_factory.mktemp("serve-isic")
    if (ISIC_ROOT / "train" / "images").is_dir():
        root = copy_isic(folder / "isic", train=24, test=4)
    else:
        root = make_synthetic_dataset(folder / "isic", n_train=24, n_test=4, size=64, seed=0)
    return train(root, folder / "run", "--epochs", "8", "--lr", "0.003"), root


@pytest.fixture(scope="module")
def isic_server(isic):
    with running(isic[0]) as server:
        yield server


# --- the endpoint ----------------------------------------------------------------------------


def test_the_endpoint_answers_the_mask_predict_writes(isic, isic_server, tmp_path):
    run, root = isic
    images = sorted((root / "test" / "images").iterdir())
    for options, flags in [
        ({}, []),
        (
            {"tta": "none", "threshold": "0.3", "postprocess": "true"},
            ["--tta", "none", "--threshold", "0.3", "--postprocess"],
        ),
    ]:
        expected = predicted(run, root / "test" / "images", tmp_path / f"p{len(flags)}", *flags)
        for image in images:
            answer = post(isic_server.url, image, **options)
            assert answer.status_code == 200, answer.text
            name = f"{image.stem}_segmentation.png"
            assert answer.headers["content-disposition"] == f'attachment; filename="{name}"'
            assert answer.content == (expected / name).read_bytes()
    masks = [np.asarray(Image.open(path)) for path in sorted(expected.glob("*.png"))]
    assert all(set(np.unique(mask)) <= {0, 255} for mask in masks)
    assert any(255 in mask for mask in masks)  # lesions found, not all blank (CI's tiny model)
    assert list((isic_server.folder / "uploads").iterdir()) == []  # every upload removed


def test_npz_holds_the_mask_and_predicts_probabilities(isic, isic_server, tmp_path):
    run, root = isic
    image = sorted((root / "test" / "images").iterdir())[0]
    expected = predicted(run, image, tmp_path / "p", "--probabilities")
    answer = post(isic_server.url, image, format="npz")
    assert answer.status_code == 200
    assert answer.headers["content-disposition"].endswith(f'"{image.stem}_segmentation.npz"')
    arrays = np.load(io.BytesIO(answer.content))
    mask = np.asarray(Image.open(expected / f"{image.stem}_segmentation.png"))
    np.testing.assert_array_equal(arrays["mask"], mask)
    probability = np.asarray(Image.open(expected / f"{image.stem}_probability.png"))
    # float16 in the npz (as predict's .npz), 8 bits in predict's PNG: the same within a step.
    difference = np.abs(arrays["probabilities"].astype(np.float32) * 255 - probability)
    assert difference.max() <= 1, difference.max()
    assert list(arrays["labels"]) == ["background", "foreground"]


def test_the_model_description(isic, isic_server):
    described = httpx.get(f"{isic_server.url}/v1/model", timeout=60).json()
    assert described["classes"] == ["background", "foreground"]
    assert (described["num_classes"], described["channels"], described["image_size"]) == (1, 3, 64)
    assert described["threshold"] == 0.5 and described["tta"] == "flip"  # ISIC trains with flips
    assert described["kind"] == "checkpoint" and described["checkpoint"] == str(isic[0])
    assert described["medseg_version"] == medseg.__version__


def test_refusals_are_json_4xx_and_the_server_goes_on(isic, isic_server, tmp_path):
    url, image = isic_server.url, sorted((isic[1] / "test" / "images").iterdir())[0]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    two_channels = tmp_path / "two.npy"
    np.save(two_channels, np.zeros((20, 30, 2), np.uint8))
    cases = [
        (post(url, text), 422, "notes.png is not an image PIL can read"),
        (post(url, two_channels), 422, "cannot segment an image of uint8 (20, 30, 2)"),
        (post(url, image, tta="sideways"), 400, "unknown TTA mode 'sideways'"),
        (post(url, image, threshold="high"), 400, "threshold 'high' is not a number"),
        (post(url, image, threshold="1.5"), 400, "threshold 1.5 is not a probability"),
        (post(url, image, format="jpeg"), 400, "format 'jpeg' is unknown"),
        (httpx.post(f"{url}/v1/segment", timeout=60), 400, "no file"),
    ]
    with Image.open(image) as picture:
        width, height = picture.size
    isic_server.served.max_pixels = width * height - 1
    try:
        too_large = f"{width}×{height} = {width * height:,} pixels, more than this server"
        cases.append((post(url, image), 413, too_large))
    finally:
        isic_server.served.max_pixels = 120_000_000
    for answer, status, message in cases:
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert message in answer.json()["error"], answer.json()
        assert str(isic_server.folder) not in answer.json()["error"]  # the client's name only
    assert post(url, image).status_code == 200
    assert list((isic_server.folder / "uploads").iterdir()) == []


def test_concurrent_uploads_each_get_their_own_mask(isic, isic_server, tmp_path):
    run, root = isic
    images = sorted((root / "test" / "images").iterdir())
    expected = predicted(run, root / "test" / "images", tmp_path / "p")
    order = images * 3  # 12 requests, 4 at a time
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda path: post(isic_server.url, path), order))
    for image, answer in zip(order, answers, strict=True):
        assert answer.status_code == 200
        assert answer.content == (expected / f"{image.stem}_segmentation.png").read_bytes()


# --- every kind of model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kinds(isic, tmp_path_factory):
    """name -> (what --checkpoint names, a folder of images to segment)."""
    from test_patches import write_vessel_set

    pytest.importorskip("onnxruntime")
    folder = tmp_path_factory.mktemp("serve-kinds")
    labelled = write_label_map_set(folder / "labelled")
    vessels = write_vessel_set(folder / "vessels")
    run, root = isic
    int8, safetensors = folder / "int8", folder / "safetensors"
    argv = ["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(int8)]
    assert main([*argv, "--quantize", "int8", "--calibration", str(root)]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(safetensors)]) == 0
    return {
        "gray label map": (train(labelled, folder / "gray", "--epochs", "1"), labelled / "test"),
        "patches": (train(vessels, folder / "patch", "--epochs", "1"), vessels / "test"),
        "int8 onnx": (int8, root / "test"),
        "safetensors": (safetensors, root / "test"),
    }


@pytest.mark.parametrize("kind", ["gray label map", "patches", "int8 onnx", "safetensors"])
def test_every_kind_of_model_answers_what_predict_writes(kinds, kind, tmp_path):
    checkpoint, test = kinds[kind]
    expected = predicted(checkpoint, test / "images", tmp_path / "p")
    with running(checkpoint) as server:
        described = httpx.get(f"{server.url}/v1/model", timeout=60).json()
        for image in sorted((test / "images").iterdir()):
            answer = post(server.url, image)
            assert answer.status_code == 200, answer.text
            assert answer.content == (expected / f"{image.stem}_segmentation.png").read_bytes()
        if kind == "gray label map":  # a threshold means nothing to an arg-max
            refused = post(server.url, image, threshold="0.5")
            assert refused.status_code == 400 and "binary models" in refused.json()["error"]
    shape = np.asarray(Image.open(image)).shape[:2]
    assert np.asarray(Image.open(expected / f"{image.stem}_segmentation.png")).shape == shape
    assert described["kind"] == {"int8 onnx": "onnx", "safetensors": "safetensors"}.get(
        kind, "checkpoint"
    )
    if kind == "gray label map":
        assert described["classes"] == ["background", "disc", "bar"]
        assert described["channels"] == 1 and described["threshold"] is None
    if kind == "patches":
        assert described["mode"] == "patch"  # whole images by sliding window, at their size


def test_dicom_areas_in_square_millimetres_and_the_legend(kinds, tmp_path):
    from test_dicom import write_dicom

    pydicom = pytest.importorskip("pydicom")
    checkpoint, test = kinds["gray label map"]
    gray = np.asarray(Image.open(sorted((test / "images").iterdir())[0])).astype(np.float64)
    path = write_dicom(tmp_path / "IM0001.dcm", gray * 16, uid="1.2.3.4.5")
    dataset = pydicom.dcmread(path)
    dataset.PixelSpacing = [0.5, 0.25]
    dataset.save_as(path)
    served = ServedModel(checkpoint)
    with served.lock:  # a request's options share the one network: no copy per request
        view = served.predictor_for(tta="d4", postprocess=True)
    assert view.model is served.predictor.model and view.tta == "d4"
    segmentation = served.segment(path)
    assert segmentation.spacing == (0.5, 0.25)
    assert segmentation.mask_name == "1.2.3.4.5_segmentation.png"  # as predict names it
    mask = served.mask(segmentation)
    areas = served.areas(segmentation, mask)
    assert [area["class"] for area in areas] == ["disc", "bar"]
    for area in areas:
        assert area["pixels"] == int((mask == area["value"]).sum())
        assert area["mm2"] == pytest.approx(area["pixels"] * 0.125)
    table = areas_markdown(areas, segmentation.spacing)
    assert "Pixel spacing 0.5 × 0.25 mm" in table
    expected = predicted(checkpoint, path, tmp_path / "p")
    assert served.mask_png(mask) == (expected / segmentation.mask_name).read_bytes()
    names = re.findall(r"</span>([^<]+)</span>", legend_html(served))
    assert names == ["disc", "bar"]  # each foreground class, the background not


# --- the command line ------------------------------------------------------------------------


def test_serve_help_imports_neither_torch_nor_gradio():
    probe = (
        "import sys\nfrom medseg.cli import main\ntry:\n    main(['serve', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print([m for m in ('torch', 'gradio', 'fastapi') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=60)  # fmt: skip
    assert "--checkpoint" in result.stdout and "--host" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_missing_gradio_is_one_line_naming_the_extra(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.splitlines() == [error]
    assert "pip install 'medseg[serve]'" in error


def test_a_host_beyond_this_computer_is_warned_about(tiny_checkpoint):
    served = ServedModel(tiny_checkpoint)
    assert startup_lines(served, "127.0.0.1", 7860)[1] is None
    address, warning = startup_lines(served, "0.0.0.0", 8000)
    assert "http://0.0.0.0:8000" in address
    assert warning.startswith("medseg: warning: listening on 0.0.0.0") and "no login" in warning


@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_removes_its_folder(tiny_checkpoint, tmp_path):
    environment = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "medseg", "serve", "--checkpoint", str(tiny_checkpoint)]
    process = subprocess.Popen(
        [*command, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        assert httpx.get(f"{url}/v1/model", timeout=60).json()["num_classes"] == 1
        assert [path.name[:13] for path in tmp_path.iterdir()] == ["medseg-serve-"]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "medseg serve stopped" in out
    assert not [path for path in tmp_path.iterdir() if path.name.startswith("medseg-serve-")]


# --- the page, in a real browser ---------------------------------------------------------------


def test_the_page_in_a_real_browser(isic, isic_server, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser test needs playwright"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    run, root = isic
    # The page offers the images the run validated on; the one the model segments best is
    # uploaded (and is the page's picture in the docs).
    examples = example_images(isic_server.served.source, isic_server.served.predictor.config)
    assert [path.parent for path in examples] == [root / "train" / "images"] * 2
    folder = tmp_path / "examples"
    folder.mkdir()
    for path in examples:
        shutil.copyfile(path, folder / path.name)
    expected = {
        threshold: predicted(run, folder, tmp_path / threshold, "--threshold", threshold)
        for threshold in ("0.5", "0.9")
    }
    image = max(examples, key=lambda path: dice(
        expected["0.5"] / f"{path.stem}_segmentation.png",
        root / "train" / "masks" / f"{path.stem}_segmentation.png",
    ))  # fmt: skip
    expected = {key: folder / f"{image.stem}_segmentation.png" for key, folder in expected.items()}
    assert expected["0.5"].read_bytes() != expected["0.9"].read_bytes()  # the slider will show
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            seen = drive_page(page, isic_server.url, image, expected, tmp_path)
        finally:
            browser.close()
    assert seen["errors"] == []
    assert seen["elsewhere"] == []  # no CDN, no analytics: every request went to the server
    assert seen["legend"] == "foreground"
    # The page's upload went into the server's temporary folder (removed when it stops).
    assert list(isic_server.folder.glob(f"gradio/*/{image.name}"))


def drive_page(page, url: str, image: Path, expected: dict[str, Path], tmp_path: Path) -> dict:
    """Upload, wait for the overlay, check the download, move the threshold, check again."""
    errors, requests = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    page.locator("#upload input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#overlay img", timeout=60_000)
    page.wait_for_selector("#download-mask:not([disabled])", timeout=60_000)
    first_overlay = page.locator("#overlay img").get_attribute("src")
    page.wait_for_function("() => document.querySelector('#overlay img').complete")
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("MEDSEG_UPDATE_DOCS") == "1":  # the docs' picture, made by this test
        shutil.copyfile(shot, SCREENSHOT)
    assert download(page) == expected["0.5"].read_bytes()
    number = page.locator("#threshold input[type=number]")
    number.fill("0.9")
    number.press("Enter")
    page.wait_for_function(
        "src => document.querySelector('#overlay img').getAttribute('src') !== src",
        arg=first_overlay, timeout=60_000,
    )  # fmt: skip
    assert download(page) == expected["0.9"].read_bytes()
    elsewhere = [address for address in requests if not address.startswith(url)]
    elsewhere = [address for address in elsewhere if not address.startswith(("data:", "blob:"))]
    return {
        "errors": errors,
        "elsewhere": elsewhere,
        "legend": page.locator("#legend").inner_text().strip(),
    }


def dice(first: Path, second: Path) -> float:
    a, b = np.asarray(Image.open(first)) > 127, np.asarray(Image.open(second)) > 127
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def download(page) -> bytes:
    with page.expect_download(timeout=60_000) as started:
        page.locator("#download-mask").click()
    return Path(started.value.path()).read_bytes()
