"""k-fold cross-validation: splits (disjoint, covering, stratified, stable), a 2-fold run's
folder and cv_summary.json, one fold at a time, refusals, and a fold killed and resumed."""

import csv
import json
import shutil
import time

import numpy as np
import pytest
from test_budget import TINY, FakeClock, throttle
from test_resume import file_id, kill, start, wait_for

import medseg
from medseg.cli import main
from medseg.core.errors import MedsegError
from medseg.data.folder import Sample, train_pairs
from medseg.data.splits import (
    Profile,
    check_splits,
    fold_samples,
    make_splits,
    stratified_folds,
    units_of,
)
from medseg.engine.checkpoint import load_checkpoint

EPOCH = ["--epochs", "1"]


def covered_once(splits, units):
    vals = [set(split["val"]) for split in splits]
    assert set().union(*vals) == set(units)
    assert sum(len(val) for val in vals) == len(units)  # disjoint
    for split, val in zip(splits, vals, strict=True):
        assert set(split["train"]) == set(units) - val
        assert split["train"] == sorted(split["train"]) and split["val"] == sorted(split["val"])


def test_binary_splits_deal_every_run_of_k_foreground_sizes_to_every_fold():
    rng = np.random.default_rng(3)
    fractions = rng.permutation(np.linspace(0.01, 0.6, 20))  # ids in no order of size
    units = {f"img{i:02d}": Profile((), float(f)) for i, f in enumerate(fractions)}
    splits = stratified_folds(units, 4, seed=0)
    covered_once(splits, units)
    by_size = sorted(units, key=lambda unit: units[unit].foreground)
    for split in splits:
        ranks = sorted(by_size.index(unit) for unit in split["val"])
        # One of the 4 smallest, one of the next 4, ... one of the 4 largest.
        assert [rank // 4 for rank in ranks] == [0, 1, 2, 3, 4]
    assert stratified_folds(units, 4, seed=0) == splits  # stable
    assert stratified_folds(units, 4, seed=1) != splits


def test_label_map_splits_spread_each_combination_of_classes_and_sizes_differ_by_one_at_most():
    units = {f"a{i}": Profile((1,), 0.1 + i / 100) for i in range(7)}
    units |= {f"b{i}": Profile((1, 2), 0.2 + i / 100) for i in range(5)}
    units |= {"c0": Profile((2,), 0.3)}
    splits = stratified_folds(units, 3, seed=0)
    covered_once(splits, units)
    for split in splits:
        counts = [sum(unit.startswith(group) for unit in split["val"]) for group in "ab"]
        assert counts[0] in (2, 3) and counts[1] in (1, 2)
    assert sorted(len(split["val"]) for split in splits) == [4, 4, 5]


def test_make_splits_reads_the_label_maps_and_keeps_an_nnunet_case_together(label_map_root):
    splits = make_splits(label_map_root, k=2, seed=0, mask_suffix="_segmentation",
                         by_case=False, progress=False)  # fmt: skip
    ids = [pair.id for pair in train_pairs(label_map_root, mask_suffix="_segmentation")]
    covered_once(splits, ids)
    assert make_splits(label_map_root, k=2, seed=0, mask_suffix="_segmentation",
                       by_case=False, progress=False) == splits  # fmt: skip

    slices = [Sample(f"{case}_z{k}", None, None) for case in ("A", "B", "C") for k in (3, 10)]
    units = units_of(slices, by_case=True)
    assert {unit: [s.id for s in samples] for unit, samples in units.items()} == {
        "A": ["A_z3", "A_z10"], "B": ["B_z3", "B_z10"], "C": ["C_z3", "C_z10"],
    }  # fmt: skip
    train, val = fold_samples(slices, {"train": ["A", "C"], "val": ["B"]})
    assert [s.id for s in val] == ["B_z3", "B_z10"]
    assert [s.id for s in train] == ["A_z3", "A_z10", "C_z3", "C_z10"]


def test_splits_that_no_longer_fit_the_data_are_refused():
    units = {"a", "b", "c", "d"}
    good = [{"train": ["c", "d"], "val": ["a", "b"]}, {"train": ["a", "b"], "val": ["c", "d"]}]
    check_splits(good, units, where="s.json", k=2)
    with pytest.raises(MedsegError, match="holds 2 folds, not the 3 of --folds 3"):
        check_splits(good, units, where="s.json", k=3)
    with pytest.raises(MedsegError, match="1 ids of train/ are in no fold"):
        check_splits(good, units | {"e"}, where="s.json")
    overlapping = [good[0], {"train": ["b"], "val": ["a", "c", "d"]}]
    with pytest.raises(MedsegError, match="fold 1 validates on ids of an earlier fold"):
        check_splits(overlapping, units, where="s.json")
    with pytest.raises(MedsegError, match="too few for 5 folds"):
        stratified_folds({u: Profile((), 0.1) for u in units}, 5, seed=0)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_fold_alone_then_the_rest_gives_the_layout_and_cv_summary(
    synthetic_root, tmp_path, tiny_flags, capsys
):
    run = tmp_path / "cv"
    flags = ["--data", str(synthetic_root), "--out", str(run), *tiny_flags, *EPOCH]
    assert main(["train", *flags, "--folds", "2", "--fold", "1"]) == 0
    out = capsys.readouterr().out
    assert "folds 0 of" in out and "have not finished" in out
    assert not (run / "fold_0").exists() and not (run / "cv_summary.json").exists()
    fold_1 = [file_id(run / "fold_1" / name) for name in ("metrics.csv", "checkpoints/best.pt")]
    splits = json.loads((run / "splits.json").read_text())

    assert main(["train", *flags, "--folds", "2"]) == 0  # fold 1 is kept, fold 0 trained
    out = capsys.readouterr().out
    assert "fold 1 has finished already; kept as it is" in out
    assert [file_id(run / "fold_1" / n) for n in ("metrics.csv", "checkpoints/best.pt")] == fold_1
    assert json.loads((run / "splits.json").read_text()) == splits  # written first, reused
    for fold in ("fold_0", "fold_1"):
        for name in ("config.yaml", "run.json", "metrics.csv", "checkpoints/best.pt", "train.log"):
            assert (run / fold / name).is_file(), f"{fold}/{name}"

    summary = json.loads((run / "cv_summary.json").read_text())
    dices = [float(read_csv(run / f"fold_{i}" / "metrics.csv")[0]["val_dice"]) for i in (0, 1)]
    assert [fold["val_dice"] for fold in summary["per_fold"]] == dices
    assert summary["mean"]["val_dice"] == pytest.approx(np.mean(dices))
    assert summary["std"]["val_dice"] == pytest.approx(abs(dices[0] - dices[1]) / np.sqrt(2))
    assert "cross-validation of" in out and "mean ± std" in out

    # Out of fold: every train/ image once, each predicted by the fold that validated on it.
    rows = read_csv(run / "cv_per_image.csv")
    assert sorted(row["id"] for row in rows) == [f"SYN_{i:04d}" for i in range(12)]
    for row in rows:
        assert row["id"] in splits[int(row["fold"])]["val"]
    assert summary["out_of_fold"]["images"] == 12
    assert summary["out_of_fold"]["dice"] == pytest.approx(
        np.mean([float(row["dice"]) for row in rows]), abs=1e-5
    )
    low, high = summary["out_of_fold"]["dice_ci95"]
    assert low <= summary["out_of_fold"]["dice"] <= high
    assert f"(95% interval {low:.4f}-{high:.4f})" in out
    # The same numbers as medseg evaluate gives fold 0's model on fold 0's validation images.
    folder = tmp_path / "fold0-val"
    for kind, name in (("images", "{}.jpg"), ("masks", "{}_segmentation.png")):
        (folder / kind).mkdir(parents=True)
        for image_id in splits[0]["val"]:
            shutil.copyfile(synthetic_root / "train" / kind / name.format(image_id),
                            folder / kind / name.format(image_id))  # fmt: skip
    scored = tmp_path / "scored"
    assert main(["evaluate", "--checkpoint", str(run / "fold_0"), "--data", str(folder),
                 "--out", str(scored), "--quiet"]) == 0  # fmt: skip
    evaluated = {row["id"]: float(row["dice"]) for row in read_csv(scored / "per_image.csv")}
    assert evaluated == {row["id"]: float(row["dice"]) for row in rows if row["fold"] == "0"}

    log = (run / "train.log").read_text()
    assert "fold 0 of" in log and "fold 1 of" in log and "mean ± std" in log
    fold_log = (run / "fold_0" / "train.log").read_text()
    assert "epoch 1/1" in fold_log and "fold 1" not in fold_log


def test_another_k_other_splits_a_started_fold_and_a_single_run_are_refused(
    synthetic_root, tmp_path, tiny_flags, capsys
):
    run = tmp_path / "cv"
    run.mkdir()
    splits = make_splits(synthetic_root, k=2, seed=0, mask_suffix="_segmentation",
                         by_case=False, progress=False)  # fmt: skip
    (run / "splits.json").write_text(json.dumps(splits))
    flags = ["--data", str(synthetic_root), "--out", str(run), *tiny_flags, *EPOCH]
    capsys.readouterr()

    def refused(*extra):
        before = sorted(path.name for path in run.rglob("*"))
        assert main(["train", *flags, *extra]) == 2
        assert sorted(path.name for path in run.rglob("*")) == before  # nothing written
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert "holds 2 folds, not the 3 of --folds 3" in refused("--folds", "3")
    assert "is not a fold of" in refused("--fold", "2")
    assert "is a k-fold run (it has splits.json)" in refused()
    (run / "fold_0").mkdir()
    (run / "fold_0" / "metrics.csv").write_text("epoch,val_dice\n1,0.5\n")
    assert "--resume" in refused("--folds", "2", "--fold", "0")
    shutil.rmtree(run / "fold_0")
    (synthetic_root / "train" / "images" / "SYN_0003.jpg").unlink()
    (synthetic_root / "train" / "masks" / "SYN_0003_segmentation.png").unlink()
    assert "other splits than train/ now" in refused("--folds", "2")

    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    (single / "metrics.csv").write_text("epoch\n1\n")
    assert main(["train", *flags[:2], "--out", str(single), "--folds", "2"]) == 2
    assert "holds a single training run" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fold_killed_mid_run_resumes_at_its_last_epoch_with_finished_folds_untouched(
    synthetic_root, tmp_path
):
    run = tmp_path / "cv"
    last = run / "fold_1" / "checkpoints" / "last.pt"
    process = start("--data", synthetic_root, "--out", run, "--backbone", "resnet18",
                    "--image-size", "64", "--no-pretrained", "--batch-size", "4", "--quiet",
                    "--folds", "2", "--epochs", "2")  # fmt: skip
    wait_for(last.exists, process)
    kill(process)  # fold 0 finished; fold 1 killed after its first epoch
    assert load_checkpoint(last)["epoch"] == 1
    assert not (run / "cv_summary.json").exists()
    fold_0 = {path: file_id(path) for path in (run / "fold_0").rglob("*") if path.is_file()}
    time.sleep(0.01)

    finish = start("--resume", run)
    out, err = finish.communicate(timeout=600)
    assert finish.returncode == 0, err
    assert {path: file_id(path) for path in fold_0} == fold_0  # untouched
    assert [row["epoch"] for row in read_csv(run / "fold_1" / "metrics.csv")] == ["1", "2"]
    assert "resuming" in out and "after epoch 1 of 2" in out
    log = (run / "fold_1" / "train.log").read_text()  # the killed command's lines, then these
    assert log.count("training DeepLabv3+") == 2 and "after epoch 1 of 2" in log
    assert log.splitlines()[-1].startswith("epoch 2/2")
    summary = json.loads((run / "cv_summary.json").read_text())
    assert [fold["epochs"] for fold in summary["per_fold"]] == [2, 2]


def test_an_nnunet_root_is_split_by_case_and_scored_out_of_fold_per_class(tmp_path):
    pytest.importorskip("nibabel")
    from test_nnunet import write_nnunet_root

    cases = ("brain1", "brain2", "brain3", "brain4")
    root = write_nnunet_root(tmp_path / "Dataset001_Brain", train=cases)
    run = tmp_path / "cv"
    flags = ["--no-pretrained", "--backbone", "resnet18", "--image-size", "32", "--quiet"]
    assert main(["train", "--data", str(root), "--out", str(run), *flags, "--folds", "2",
                 *EPOCH]) == 0  # fmt: skip
    splits = json.loads((run / "splits.json").read_text())
    covered_once(splits, cases)  # nnU-Net's convention: case ids, each case in one fold
    rows = read_csv(run / "cv_per_image.csv")
    for row in rows:  # every slice predicted by the fold that validated on its case
        assert row["id"].split("_z")[0] in splits[int(row["fold"])]["val"]
    assert len(rows) == 4 * 3  # the 2 slices with labels and 1 of the 4 without, per case
    summary = json.loads((run / "cv_summary.json").read_text())
    assert set(summary["out_of_fold"]["per_class"]) == {"necrosis", "oedema"}
    assert set(summary["mean"]) >= {"val_dice_necrosis", "val_dice_oedema"}


@pytest.mark.slow
def test_a_k_fold_run_trains_under_torchrun_on_two_gloo_processes(synthetic_root, tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "cv"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
              "2", "-m", "medseg", "train", "--data", str(synthetic_root), "--out", str(run),
              "--backbone", "resnet18", "--image-size", "64", "--no-pretrained", "--batch-size",
              "4", "--quiet", "--folds", "2", *EPOCH]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("fold 1 of") == 1  # rank 0 speaks, once
    assert "2 processes" in (run / "fold_1" / "train.log").read_text()
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["out_of_fold"]["images"] == 12


def test_folds_ended_by_their_time_limit_are_finished_and_summarised(
    synthetic_root, tmp_path, monkeypatch
):
    # Every loss costs 10 s of a fake clock: 10 planned epochs do not fit in 300 s.
    throttle(monkeypatch, FakeClock(cost=10.0))
    overrides = {**TINY, "train.epochs": 10, "train.time_limit": 300.0}
    run = tmp_path / "cv"
    medseg.train(data=synthetic_root, out=run, folds=2, overrides=overrides, progress=False)

    summary = json.loads((run / "cv_summary.json").read_text())
    assert all(1 <= fold["epochs"] < 10 for fold in summary["per_fold"])
    last = load_checkpoint(run / "fold_0" / "checkpoints" / "last.pt")
    assert last["budget"]["epochs"] == summary["per_fold"][0]["epochs"]
