"""The HTML evaluation report: written by `medseg evaluate --report`, and every image loads."""

import base64
import io
import re

from PIL import Image

from medseg.cli import main
from medseg.report import pick_cases


def test_report_page_embeds_loadable_images(synthetic_root, tmp_path, tiny_flags):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(synthetic_root),
                "--out",
                str(run),
                "--epochs",
                "1",
                *tiny_flags,
            ]
        )
        == 0
    )
    report = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(run),
            "--data",
            str(synthetic_root / "test"),
            "--out",
            str(tmp_path / "eval"),
            "--report",
            str(report),
            "--quiet",
        ]
    )
    assert code == 0

    page = (report / "index.html").read_text()
    assert "Thresholded Jaccard" in page and "Worst cases" in page and "Best cases" in page
    sources = re.findall(r'<img alt="[^"]*" src="([^"]+)"', page)
    assert len(sources) == 1 + 3 * 2  # histograms, then 2 best, 2 median, 2 worst
    for source in sources:
        assert source.startswith("data:image/png;base64,")  # nothing to fetch: opens offline
        picture = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        picture.load()  # a corrupt PNG would raise here
        assert picture.width > 0 and picture.height > 0


def test_pick_cases_orders_by_dice():
    rows = [{"dice": value} for value in (0.5, 0.9, 0.1, 0.7, 0.3)]
    cases = pick_cases(rows, per_kind=1)
    assert cases == {"best": [1], "median": [0], "worst": [2]}  # Dice 0.9, 0.5, 0.1
