"""The HTML evaluation report: written by `medseg evaluate --report`, with the numbers it shows."""

import base64
import html
import io
import json
import re

import numpy as np
from PIL import Image

from medseg.cli import main
from medseg.commands.evaluate import PER_CLASS_TABLE, SUMMARY_TABLE
from medseg.commands.report import pick_cases, write_report
from medseg.drawing import class_colour


def _pictures(page: str) -> list[tuple[str, Image.Image]]:
    """Every embedded picture of the page with its alt text, decoded (a corrupt PNG raises)."""
    pictures = []
    for alt, source in re.findall(r'<img alt="([^"]*)" src="([^"]+)"', page):
        assert source.startswith("data:image/png;base64,")  # nothing to fetch: opens offline
        picture = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        picture.load()
        pictures.append((html.unescape(alt), picture))
    return pictures


def _section(page: str, title: str) -> str:
    """The HTML between the <h2> called `title` and the next <h2> (or the end)."""
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end != -1 else len(page)]


def test_evaluate_report_shows_the_summary_and_the_cases(tiny_checkpoint, synthetic_root, tmp_path):
    report, out = tmp_path / "report", tmp_path / "eval"
    code = main(
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_root / "test"),
         "--out", str(out), "--report", str(report), "--quiet"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    page = (report / "index.html").read_text()

    table = _section(page, "Summary")
    for label, key in SUMMARY_TABLE:  # every number the command printed, at its label
        assert f"<td>{html.escape(label)}</td><td>{summary[key]:.4f}</td>" in table, key
    low, high = summary["dice_ci95"]
    line = f"{summary['images']} images (mean Dice {summary['dice']:.3f}, 95% bootstrap interval"
    assert f"{line} {low:.3f}-{high:.3f}); lowest Dice: {summary['worst'][0]['id']}" in table

    worst_id = summary["worst"][0]["id"]
    assert f"{worst_id}: Dice {summary['worst'][0]['dice']:.3f}" in _section(page, "Worst cases")
    assert worst_id not in _section(page, "Best cases")  # 4 images: 2 best, 2 worst, apart

    pictures = _pictures(page)
    assert [alt for alt, _ in pictures][0] == "metric histograms"
    assert len(pictures) == 1 + 3 * 2  # then 2 best, 2 median, 2 worst
    for sample_id, picture in pictures[1:]:  # image beside its outlined copy, 64×64 each
        assert picture.size == (128, 64), sample_id


def test_write_report_by_hand(tmp_path):
    rows = [
        {"id": "low <1>", "dice": 0.125, "iou": 0.0625, "hd95": 9.0, "assd": 4.0},
        {"id": "high", "dice": 0.875, "iou": 0.75, "hd95": 1.0, "assd": 0.5},
    ]
    summary = {
        "images": 2,
        "dice": 0.5,
        "hd95": 5.0,
        "worst": [{"id": "low <1>", "dice": 0.125}, {"id": "high", "dice": 0.875}],
        "checkpoint": "run/best.pt",
        "data": "data/test",
        "tta": "flip",
        "postprocess": False,
    }
    image = np.full((8, 10, 3), 200, dtype=np.uint8)
    truth = np.zeros((8, 10), dtype=bool)
    truth[2:6, 3:7] = True
    cases = {"best": [("high", image, truth, truth)], "worst": [("low <1>", image, truth, ~truth)]}
    table = [("Dice (mean)", "dice"), ("HD95, pixels", "hd95")]

    path = write_report(tmp_path / "report" / "index.html", summary, rows, cases, table=table)
    page = path.read_text()

    assert "<title>medseg evaluation: data/test</title>" in page
    assert "checkpoint run/best.pt; TTA flip; post-processing False" in page
    assert "<td>Dice (mean)</td><td>0.5000</td>" in page
    assert "<td>HD95, pixels</td><td>5.0000</td>" in page
    assert "2 images; lowest Dice: low &lt;1&gt; (0.125), high (0.875)" in page
    assert "low <1>" not in page  # ids are escaped, never markup
    assert "high: Dice 0.875" in _section(page, "Best cases")
    assert "low &lt;1&gt;: Dice 0.125" in _section(page, "Worst cases")
    assert "Median cases" not in page  # only the kinds given
    pictures = dict(_pictures(page))
    assert pictures["high"].size == pictures["low <1>"].size == (20, 8)
    # Left half: the image untouched; right half: the same image with outlines drawn on it.
    best = np.asarray(pictures["high"].convert("RGB"))
    assert (best[:, :10] == 200).all()
    assert not (best[:, 10:] == 200).all()


def test_pick_cases_orders_by_dice():
    rows = [{"dice": value} for value in (0.5, 0.9, 0.1, 0.7, 0.3)]
    cases = pick_cases(rows, per_kind=1)
    assert cases == {"best": [1], "median": [0], "worst": [2]}  # Dice 0.9, 0.5, 0.1
    # Two per kind, ties kept in order: sorted 0.1(2) 0.3(4) 0.5(0) 0.7(3) 0.9(1).
    cases = pick_cases(rows, per_kind=2)
    assert cases == {"best": [1, 3], "median": [4, 0], "worst": [2, 4]}


def test_write_report_of_label_maps_by_hand(tmp_path):
    labels = ["background", "lung <l>", "heart"]
    rows = [{"id": "one", "dice": 0.5, "iou": 0.25, "hd95": 3.0, "assd": 1.0}]
    scores = {
        "dice": 0.5,
        "iou": 0.25,
        "hd95": 3.0,
        "assd": 1.0,
        "sensitivity": 0.5,
        "specificity": 1.0,
    }
    summary = {
        "images": 1, **scores, "worst": [{"id": "one", "dice": 0.5}],
        "per_class": {
            "lung <l>": {**scores, "dice": 0.75, "hd95": 2.0},
            "heart": {**scores, "dice": 0.25, "hd95": 4.0},
        },
    }  # fmt: skip
    image = np.full((8, 10, 3), 200, dtype=np.uint8)
    truth = np.zeros((8, 10), dtype=np.uint8)
    truth[1:7, 1:5] = 1
    truth[1:7, 6:10] = 2
    prediction = np.zeros_like(truth)
    prediction[1:7, 6:10] = 2  # heart found, lung missed
    cases = {"worst": [("one", image[..., :1], truth, prediction)]}  # a gray (H, W, 1) image

    path = write_report(
        tmp_path / "index.html", summary, rows, cases,
        table=[("Dice (mean)", "dice")], class_table=list(PER_CLASS_TABLE), labels=labels,
    )  # fmt: skip
    page = path.read_text()

    table = _section(page, "Per class")
    assert "<th>class</th><th>Dice</th><th>IoU</th><th>HD95</th>" in table
    assert "<tr><td>lung &lt;l&gt;</td><td>0.7500</td><td>0.2500</td><td>2.0000</td>" in table
    assert "<tr><td>heart</td><td>0.2500</td><td>0.2500</td><td>4.0000</td>" in table
    assert "<tr><td>mean</td><td>0.5000</td><td>0.2500</td><td>3.0000</td>" in table
    worst = _section(page, "Worst cases")
    assert "left to right: image, ground truth, prediction" in worst
    assert f'color:rgb{class_colour(2)}">&#9632;</span> heart' in worst
    assert "lung <l>" not in page  # class names are escaped

    picture = np.asarray(dict(_pictures(page))["one"].convert("RGB")).astype(int)
    assert picture.shape == (8, 30, 3)  # image, truth, prediction side by side
    assert (picture[:, :10] == 200).all()  # the gray image, in three channels

    # Inside each region (away from its outline) the fill blends 40 % of the class colour.
    def blended(index):
        return [round(0.6 * 200 + 0.4 * channel) for channel in class_colour(index)]

    assert picture[3, 10 + 2].tolist() == blended(1)  # truth: lung
    assert picture[3, 10 + 8].tolist() == blended(2)  # truth: heart
    assert picture[3, 20 + 2].tolist() == [200, 200, 200]  # prediction: lung missed
    assert picture[3, 20 + 8].tolist() == blended(2)  # prediction: heart
