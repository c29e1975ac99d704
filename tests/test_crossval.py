"""Block cross-validation: the folds by hand and by their properties, and main.py --folds end to end, with the
held-out score checked against evaluate.py on the same frames."""
import json
import os
import statistics

import pytest

import evaluate
import main as main_mod
from dataset import DepthDataset, block_folds
from utils import UserError

FAST = ["--model", "unet_res", "--encoder", "mobilenetv3_small_050", "--no-pretrained", "--batch_size", "4",
        "--train_eval_frames", "8", "--visualize_every", "0", "--seed", "3", "--device", "cpu", "--amp", "none"]


def test_block_folds_by_hand():
    assert block_folds(10, 3, guard=1) == [([4, 5, 6, 7, 8, 9], [0, 1, 2]),
                                           ([0, 1, 8, 9], [3, 4, 5, 6]),
                                           ([0, 1, 2, 3, 4, 5], [7, 8, 9])]
    assert block_folds(4, 2, guard=0) == [([2, 3], [0, 1]), ([0, 1], [2, 3])]


@pytest.mark.parametrize("n, folds, guard", [(97, 2, 0), (97, 5, 3), (3469, 3, 50), (3469, 5, 50)])
def test_block_folds_partition_the_frames_and_keep_the_guard(n, folds, guard):
    result = block_folds(n, folds, guard)
    held = [h for _, h in result]
    assert sorted(i for h in held for i in h) == list(range(n))  # every frame held out exactly once
    assert max(map(len, held)) - min(map(len, held)) <= 1
    for train, block in result:
        assert block == list(range(block[0], block[-1] + 1))  # contiguous
        assert all(i < block[0] - guard or i > block[-1] + guard for i in train)  # nothing within the guard
        band = {i for i in range(block[0] - guard, block[-1] + guard + 1) if 0 <= i < n}
        assert set(train) | band == set(range(n)) and not set(train) & band


def test_block_folds_refuse_what_cannot_be_split():
    for n, folds, guard in [(10, 1, 0), (10, 2, -1), (3, 5, 0), (10, 2, 5)]:
        with pytest.raises(UserError):
            block_folds(n, folds, guard)


def test_dataset_of_several_splits_and_its_subsets(synthetic_root):
    frames = DepthDataset(synthetic_root, split=["train", "val"])
    assert frames.names == [str(i) for i in range(32)]  # train 0..23, then val 24..31: the sequence order
    sub = frames.subset([30, 2])
    assert sub.names == ["30", "2"] and len(sub) == 2
    rgb, depth = sub[0]
    val = DepthDataset(synthetic_root, split="val")
    assert (rgb == val[6][0]).all() and (depth == val[6][1]).all()


def test_cross_validation_end_to_end(small_synthetic_root, tmp_path, capsys):
    argv = ["--data_dir", small_synthetic_root, "--folds", "2", "--guard", "2", "--max_epochs", "1",
            "--ckpt_dir", str(tmp_path), "--ckpt_name", "cv"] + FAST
    assert main_mod.main(argv) == 0
    cv_dir = tmp_path / "cv"
    results = [json.loads((cv_dir / f"fold{k}" / "result.json").read_text()) for k in (1, 2)]
    assert [r["held_out"] for r in results] == [["0", "15"], ["16", "31"]]
    assert [r["n_train"] for r in results] == [14, 14]  # 32 frames - 16 held out - 2 guard frames
    rmse = [r["rmse"] for r in results]
    table = (cv_dir / "cv.md").read_text()
    assert f"{statistics.mean(rmse):.3f} ± {statistics.stdev(rmse):.3f}" in table
    assert len((cv_dir / "cv.csv").read_text().strip().splitlines()) == 3

    # the fold's score is the held-out block's, by its last weights: evaluate.py on those frames agrees
    held = tmp_path / "held"
    for sub in ("rgb", "depth"):
        os.makedirs(held / sub)
    for i in range(16):
        split = "train" if i < 24 else "val"
        os.symlink(os.path.join(small_synthetic_root, "rgb", split, f"{i}.jpeg"), held / "rgb" / f"{i}.jpeg")
        os.symlink(os.path.join(small_synthetic_root, "depth", split, f"{i}.npy"), held / "depth" / f"{i}.npy")
    out = tmp_path / "m.json"
    assert evaluate.main(["--data", str(held), "--ckpt", str(cv_dir / "fold1" / "last.pth"), "--amp", "none",
                          "--device", "cpu", "--out", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["rmse"] == pytest.approx(results[0]["rmse"], abs=1e-9)
    assert scored["ssim"] == pytest.approx(results[0]["ssim"], abs=1e-9)

    # the same command again: finished folds are kept, nothing retrains
    stamp = os.path.getmtime(cv_dir / "fold1" / "last.pth")
    capsys.readouterr()
    assert main_mod.main(argv) == 0
    assert os.path.getmtime(cv_dir / "fold1" / "last.pth") == stamp and "training in" not in capsys.readouterr().out


def test_cross_validation_continues_a_cut_fold(small_synthetic_root, tmp_path):
    argv = ["--data_dir", small_synthetic_root, "--folds", "2", "--guard", "2", "--max_epochs", "2",
            "--ckpt_dir", str(tmp_path), "--ckpt_name", "cv"] + FAST
    assert main_mod.main(argv + ["--fold", "1", "--ckpt_dir", str(tmp_path / "cv"), "--ckpt_name", "fold1",
                                 "--stop_after_epochs", "1"]) == 0
    assert not (tmp_path / "cv" / "fold1" / "result.json").exists()
    assert main_mod.main(argv) == 0  # resumes fold 1, then runs fold 2
    assert json.loads((tmp_path / "cv" / "fold1" / "result.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("extra, message", [(["--folds", "1"], "--folds must be 2 or more"),
                                            (["--fold", "2"], "--fold needs --folds"),
                                            (["--folds", "3", "--fold", "4"], "--fold between 1 and --folds")])
def test_bad_fold_flags_are_one_line(synthetic_root, tmp_path, capsys, extra, message):
    assert main_mod.main(["--data_dir", synthetic_root, "--ckpt_dir", str(tmp_path)] + FAST + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_train_splits_train_on_train_and_val(small_synthetic_root, tmp_path, capsys):
    """Shipping a recipe chosen by cross-validation: train on every frame (train+val), said plainly in the log."""
    assert main_mod.main(["--data_dir", small_synthetic_root, "--train_splits", "train+val", "--max_epochs", "1",
                          "--ckpt_dir", str(tmp_path), "--ckpt_name", "all"] + FAST) == 0
    out = capsys.readouterr().out
    assert "data " in out and "32 train / 8 val frames (val is trained on" in out
    assert "8 steps/epoch of batch 4" in out  # 32 frames / 4


def test_length_curve_table_from_branch_folders(tmp_path):
    """crossval.py reads foldK_eL/result.json (decayed branches) and foldK/metrics.csv (the constant runs) into one
    table: per-length fold figures and their mean ± sample std, checked against statistics.stdev."""
    import crossval
    figures = {(1, 10): (3.0, 0.40), (2, 10): (2.0, 0.50), (1, 20): (2.5, 0.45), (2, 20): (1.9, 0.55)}
    for (fold, length), (rmse, ssim) in figures.items():
        (tmp_path / f"fold{fold}_e{length}").mkdir()
        (tmp_path / f"fold{fold}_e{length}" / "result.json").write_text(json.dumps(
            {"fold": fold, "rmse": rmse, "ssim": ssim, "decay_from": length * 0.8}))
    for fold in (1, 2):
        (tmp_path / f"fold{fold}").mkdir()
        (tmp_path / f"fold{fold}" / "metrics.csv").write_text(
            "epoch,train_loss,val_rmse,val_ssim\n1,9.0,,\n4,5.0,3.5,0.3\n8,4.0,3.25,0.35\n"
            + ("12,3.5,3.0,0.4\n" if fold == 1 else "12,3.4,3.2,0.42\n16,3.3,3.1,0.44\n"))
    (tmp_path / "notes").mkdir()  # anything else is ignored
    branches, constant = crossval.read_length_runs(str(tmp_path))
    assert sorted(branches) == [10, 20] and constant[1] == [(4, 3.5, 0.3), (8, 3.25, 0.35), (12, 3.0, 0.4)]
    table = crossval.length_table(branches, constant)
    sd = statistics.stdev([3.0, 2.0])
    assert f"| 10 | 8 | 3.000 / 0.400 | 2.000 / 0.500 | 2.500 ± {sd:.3f} | 0.450 ± 0.071 |" in table
    assert "| 20 | 16 | 2.500 / 0.450 | 1.900 / 0.550 | 2.200 ± 0.424 | 0.500 ± 0.071 |" in table
    # the constant runs per epoch: mean ± std over the folds that reached it
    assert "| 8 | 3.250 / 0.350 | 3.250 / 0.350 | 3.250 ± 0.000 | 0.350 ± 0.000 |" in table
    sd = statistics.stdev([3.0, 3.2]), statistics.stdev([0.4, 0.42])
    assert f"| 12 | 3.000 / 0.400 | 3.200 / 0.420 | 3.100 ± {sd[0]:.3f} | 0.410 ± {sd[1]:.3f} |" in table
    assert "| 16 | — | 3.100 / 0.440 | 3.100 (1 fold) | 0.440 (1 fold) |" in table
    assert crossval.main([str(tmp_path)]) == 0
    assert (tmp_path / "length.md").read_text() == table and (tmp_path / "length.png").stat().st_size > 1000


def test_lever_versus_base_is_a_paired_difference(tmp_path, capsys):
    """crossval.py LEVER --versus BASE: per fold the lever's figures and its difference from the base's of the same
    fold and length; the mean ± sample std of those differences (statistics.stdev) and a count of folds better.
    Lengths or folds only one side has are left out."""
    import crossval
    base = {(1, 20): (3.0, 0.40), (2, 20): (2.0, 0.50), (3, 20): (2.5, 0.45), (1, 10): (3.1, 0.39)}
    lever = {(1, 20): (2.9, 0.42), (2, 20): (2.1, 0.53), (3, 20): (2.3, 0.46), (1, 5): (3.3, 0.3)}
    for folder, figures in (("base", base), ("lever", lever)):
        for (fold, length), (rmse, ssim) in figures.items():
            (tmp_path / folder / f"fold{fold}_e{length}").mkdir(parents=True)
            (tmp_path / folder / f"fold{fold}_e{length}" / "result.json").write_text(json.dumps(
                {"fold": fold, "rmse": rmse, "ssim": ssim, "decay_from": length * 0.8}))
    lever_dir, base_dir = str(tmp_path / "lever"), str(tmp_path / "base")
    assert crossval.main([lever_dir, "--versus", base_dir]) == 0
    table = (tmp_path / "lever" / "versus.md").read_text()
    d_rmse, d_ssim = [-0.1, 0.1, -0.2], [0.02, 0.03, 0.01]
    row = (f"| 20 | 2.900 / 0.420 (-0.100 / +0.020) | 2.100 / 0.530 (+0.100 / +0.030) | 2.300 / 0.460 (-0.200 / "
           f"+0.010) | {statistics.mean(d_rmse):+.3f} ± {statistics.stdev(d_rmse):.3f} | "
           f"{statistics.mean(d_ssim):+.3f} ± {statistics.stdev(d_ssim):.3f} | 2, 3 of 3 |")
    assert row in table and "| 20 | 2.900" in row and "| 10 |" not in table and "| 5 |" not in table
    assert table in capsys.readouterr().out
    (tmp_path / "other" / "fold1_e40").mkdir(parents=True)
    (tmp_path / "other" / "fold1_e40" / "result.json").write_text(json.dumps({"fold": 1, "rmse": 2.0, "ssim": 0.5}))
    assert crossval.main([str(tmp_path / "other"), "--versus", base_dir]) == 2
    assert "no length and fold in common" in capsys.readouterr().err
    assert crossval.main([lever_dir, "--against", base_dir]) == 2
    assert crossval.main([lever_dir, "--versus", str(tmp_path / "missing")]) == 2
    assert "missing: folder not found" in capsys.readouterr().err
