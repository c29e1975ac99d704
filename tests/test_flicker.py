"""The flicker metric (evaluate.py): excess frame-to-frame change of the prediction where the truth is static."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import evaluate
from dataset import load_depth_m
from evaluate import STATIC_M, add_flicker, are_neighbours, summarize_flicker


def flicker_of(preds, depths, names=None):
    """summarize_flicker of a sequence fed frame by frame, as evaluate.py feeds it."""
    total, previous = {}, None
    for name, pred, depth in zip(names or [str(t) for t in range(len(preds))], preds, depths):
        previous = add_flicker(total, previous, name, torch.as_tensor(pred)[None], torch.as_tensor(depth)[None])
    return summarize_flicker(total) if total else {"flicker": math.nan, "flicker_pairs": 0}


def test_alternating_predictions_on_a_static_truth_flicker_by_twice_the_swing():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1, 19, (6, 8))
    d = 0.3
    preds = [depth + (d if t % 2 else -d) for t in range(5)]  # +-d around the truth: every step changes by 2d
    assert flicker_of(preds, [depth] * 5) == {"flicker": pytest.approx(2 * d), "flicker_pairs": 4}
    assert flicker_of([depth] * 5, [depth] * 5)["flicker"] == 0.0  # a perfect prediction


def test_only_static_pixels_count_and_the_truths_own_change_is_subtracted():
    depth_0 = np.full((4, 4), 5.0)
    depth_1 = depth_0 + 0.02  # every pixel moves by 2 cm: static (< 5 cm)
    depth_1[0] = 9.0  # the first row moves by 4 m: not static, left out whatever the prediction does
    pred_0, pred_1 = depth_0.copy(), depth_0 + 0.1
    pred_1[0] = 1.0
    # 12 static pixels: prediction changes 0.1, the truth 0.02 -> 0.08 excess
    assert flicker_of([pred_0, pred_1], [depth_0, depth_1])["flicker"] == pytest.approx(0.08)
    # a prediction that follows the truth exactly has no flicker, moving or not
    assert flicker_of([depth_0, depth_1], [depth_0, depth_1])["flicker"] == pytest.approx(0.0, abs=1e-12)
    assert STATIC_M == 0.05 and math.isnan(flicker_of([pred_0, pred_1], [depth_0, depth_0 + 1])["flicker"])


def test_only_frames_consecutive_in_numbering_are_paired():
    assert are_neighbours("41", "42") and are_neighbours("cam1_0009", "cam1_0010") and are_neighbours("9", "010")
    assert not are_neighbours("41", "43") and not are_neighbours("a", "b") and not are_neighbours("a1", "b2")
    assert not are_neighbours("42", "41") and not are_neighbours("x", "x1")
    depth = np.ones((2, 2))
    preds = [depth + t for t in range(4)]  # 1 m of change per step
    result = flicker_of(preds, [depth] * 4, names=["1", "2", "4", "5"])  # a cut between 2 and 4
    assert result == {"flicker": pytest.approx(1.0), "flicker_pairs": 2}
    assert flicker_of(preds, [depth] * 4, names=["a", "b", "c", "d"])["flicker_pairs"] == 0


def test_evaluate_reports_flicker_and_a_gap_is_a_cut(constant_depth_ckpt, synthetic_root, tmp_path, capsys):
    # a split folder of test frames 32..37 with frame 34 left out: pairs 32-33, 35-36, 36-37
    for kind, ext in (("rgb", ".jpeg"), ("depth", ".npy")):
        shutil.copytree(os.path.join(synthetic_root, kind, "test"), tmp_path / "seq" / kind)
        os.remove(tmp_path / "seq" / kind / f"34{ext}")
    assert evaluate.main(["--data", str(tmp_path / "seq"), "--ckpt", constant_depth_ckpt, "--amp", "none",
                          "--batch_size", "2", "--out", str(tmp_path / "m.json")]) == 0
    m = json.load(open(tmp_path / "m.json"))
    depth = {n: load_depth_m(str(tmp_path / "seq" / "depth" / f"{n}.npy")).astype(np.float64)
             for n in (32, 33, 35, 36, 37)}
    change = [np.abs(depth[b] - depth[a]) for a, b in ((32, 33), (35, 36), (36, 37))]
    static = np.concatenate([c[c < STATIC_M] for c in change])
    # the prediction is a constant (conftest.constant_depth_ckpt): it never changes, so flicker is minus the
    # truth's own change on the static pixels
    assert m["flicker_pairs"] == 3 and static.size > 0
    assert m["flicker"] == pytest.approx(-static.mean(), abs=1e-9)
    assert "flicker" in capsys.readouterr().out
