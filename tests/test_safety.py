"""Safety: files medseg loads never run code, output names cannot leave the output folder, and
``--deterministic`` reruns give identical numbers on the CPU."""

import csv
import hashlib
import shutil

import pytest
import torch

from medseg.cli import main
from medseg.engine.checkpoint import load_checkpoint
from medseg.prediction.outputs import mask_name


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def evil_file(path, marker, *, medseg_like=True):
    content = {"payload": Payload(marker)}
    if medseg_like:  # dressed as a medseg checkpoint, so only the pickle check stands in the way
        content = {"format": "medseg-checkpoint", "version": 1, **content}
    torch.save(content, path)
    return path


@pytest.mark.parametrize("command", ["predict", "evaluate", "visualize", "resume", "pretrained"])
def test_pickle_carrying_code_is_refused_without_running(capsys, synthetic_root, tmp_path, command):
    marker = tmp_path / "code-ran"
    evil = evil_file(tmp_path / "evil.pt", marker, medseg_like=command != "pretrained")
    out = tmp_path / "out"
    test = synthetic_root / "test"
    argv = {
        "predict": ["predict", "--checkpoint", evil, "--input", test / "images", "--output", out],
        "evaluate": ["evaluate", "--checkpoint", evil, "--data", test, "--out", out],
        "visualize": ["visualize", "--checkpoint", evil, "--data", test, "--out", out],
        "resume": ["train", "--resume", out, "--data", synthetic_root],
        "pretrained": [
            "train", "--data", synthetic_root, "--out", out, "--backbone", "resnet18",
            "--image-size", "64", "--pretrained", evil,
        ],
    }[command]  # fmt: skip
    if command == "resume":
        (out / "checkpoints").mkdir(parents=True)
        shutil.copyfile(evil, out / "checkpoints" / "last.pt")
    before = hashlib.sha256(evil.read_bytes()).hexdigest()

    code = main([str(arg) for arg in [*argv, "--quiet"]])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "may carry code" in err
    assert not marker.exists()
    assert hashlib.sha256(evil.read_bytes()).hexdigest() == before
    if command != "resume":
        assert not out.exists()

    torch.load(evil, weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()


CRAFTED_NAMES = [
    "a..b.jpg",
    "x\\..\\..\\outside.jpg",  # backslashes are ordinary characters on POSIX
    "semi;colon $(touch x) `id`.jpg",
    "new\nline.jpg",
    "-rf.jpg",
    "ümlaut ñ 中文.jpg",
    "dotted.name.with.many.parts.png",
]


def test_output_names_come_from_input_stems_only(capsys, tiny_checkpoint, synthetic_root, tmp_path):
    inbox = tmp_path / "inbox" / "nested"
    inbox.mkdir(parents=True)
    source = synthetic_root / "test" / "images" / "SYN_0012.jpg"
    for name in CRAFTED_NAMES:
        shutil.copyfile(source, inbox / name)
    hidden = tmp_path / "inbox" / "..evil.jpg"  # a single file whose name starts with dots
    shutil.copyfile(source, hidden)
    output = tmp_path / "out"

    def outside():
        return sorted(p for p in tmp_path.rglob("*") if p != output and output not in p.parents)

    outside_before = outside()

    common = ["--checkpoint", tiny_checkpoint, "--output", output, "--device", "cpu", "--quiet"]
    for source_arg in (inbox, hidden, inbox / ".." / "nested" / "a..b.jpg"):
        code = main([str(arg) for arg in ["predict", "--input", source_arg, *common, "--overlay"]])
        assert code == 0, capsys.readouterr().err

    written = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    stems = [name.rsplit(".", 1)[0] for name in [*CRAFTED_NAMES, hidden.name]]
    expected = [f"{stem}_{kind}.png" for stem in stems for kind in ("segmentation", "overlay")]
    assert written == sorted([*expected, ".medseg-predict.json"])  # all directly in output/
    assert outside() == outside_before
    assert mask_name(tmp_path / ".." / ".." / "etc" / "passwd.jpg") == "passwd_segmentation.png"


def train_twice_deterministically(synthetic_root, tmp_path, capsys):
    runs = []
    for name in ("first", "second"):
        run = tmp_path / name
        argv = [
            "train", "--data", str(synthetic_root), "--out", str(run), "--backbone", "resnet18",
            "--image-size", "64", "--no-pretrained", "--epochs", "2", "--batch-size", "4",
            "--deterministic", "--quiet",
        ]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        runs.append(run)
    return runs


def test_deterministic_runs_give_identical_metrics_on_the_cpu(synthetic_root, tmp_path, capsys):
    first, second = train_twice_deterministically(synthetic_root, tmp_path, capsys)
    assert torch.are_deterministic_algorithms_enabled()

    def rows(run):
        with open(run / "metrics.csv", newline="") as handle:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(handle)]

    assert rows(first) == rows(second)
    assert len(rows(first)) == 2 and rows(first)[0]["train_loss"] != rows(first)[1]["train_loss"]
    weights = [load_checkpoint(run / "checkpoints" / "last.pt")["model"] for run in (first, second)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
