"""Issue 25: errors by depth range, boundary F1, aligned metrics, uncertainty ranking, A-vs-B with a block bootstrap,
single images and GIFs; every figure against an independent reference (hand values, numpy, known edges)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import compare
import evaluate
import model as model_lib
from checkpoint import save_checkpoint
from conftest import CONSTANT_DEPTH_M, message_lines, write_frame
from utils import (BOUNDARY_THRESHOLDS, align_depth, boundary_f1, depth_bin_sums, depth_range_mask, metric_sums,
                   sparsification, summarize, summarize_bins, add_sums)

T = lambda a: torch.tensor(np.asarray(a, dtype=np.float64))[None, None]  # HxW -> [1,1,H,W]


def bins_of(pred, gt, valid=None):
    return summarize_bins(add_sums({}, depth_bin_sums(T(pred), T(gt), valid)))


def test_depth_bin_table_by_hand():
    gt, pred = [[1.0, 3.0, 20.0, 12.0]], [[2.0, 2.0, 15.0, 12.0]]  # errors +1, -1, -5 (at the clip), 0
    rows = {r["bin"]: r for r in bins_of(pred, gt)}
    assert list(rows) == ["0-2 m", "2-5 m", "5-10 m", "10-15 m", "15-20 m", "20 m (clip)"]
    assert (rows["0-2 m"]["rmse"], rows["0-2 m"]["bias"], rows["0-2 m"]["share"]) == (1.0, 1.0, 0.25)
    assert (rows["2-5 m"]["bias"], rows["20 m (clip)"]["bias"], rows["10-15 m"]["rmse"]) == (-1.0, -5.0, 0.0)
    assert rows["20 m (clip)"]["sq_err_share"] == pytest.approx(25 / 27)
    assert rows["5-10 m"]["pixels"] == 0 and rows["5-10 m"]["rmse"] is None and rows["15-20 m"]["share"] == 0


def test_depth_bin_table_matches_numpy_with_a_depth_range():
    rng = np.random.default_rng(0)
    gt = np.minimum(rng.uniform(0, 30, (2, 1, 9, 13)), 20.0)
    pred = gt + rng.normal(0, 2, gt.shape)
    valid = depth_range_mask(torch.tensor(gt), 1.0, 20.0, exclude_clip=True)
    rows = summarize_bins(add_sums({}, depth_bin_sums(torch.tensor(pred), torch.tensor(gt), valid)))
    keep = (gt >= 1) & (gt < 20)
    sq_total = ((pred - gt)[keep] ** 2).sum()
    for row, (lo, hi) in zip(rows, [(0, 2), (2, 5), (5, 10), (10, 15), (15, 20), (20, np.inf)]):
        m = keep & (gt >= lo) & (gt < hi)
        assert row["pixels"] == m.sum() and row["share"] == pytest.approx(m.sum() / keep.sum())
        if m.any():
            assert row["rmse"] == pytest.approx(np.sqrt(((pred - gt)[m] ** 2).mean()))
            assert row["bias"] == pytest.approx((pred - gt)[m].mean())
            assert row["sq_err_share"] == pytest.approx(((pred - gt)[m] ** 2).sum() / sq_total)
    assert rows[-1]["pixels"] == 0  # --exclude_clip: nothing at the clip is scored
    # the metrics of the same mask are those of the kept pixels alone (numpy), SILog per image
    m = summarize(add_sums({}, metric_sums(torch.tensor(pred), torch.tensor(gt), valid)))
    p, g = np.maximum(pred, 1e-3), np.maximum(gt, 1e-3)
    assert m["rmse"] == pytest.approx(np.sqrt(((pred - gt)[keep] ** 2).mean()))
    assert m["abs_rel"] == pytest.approx((np.abs(pred - gt) / g)[keep].mean())
    assert m["delta1"] == pytest.approx((np.maximum(p / g, g / p) < 1.25)[keep].mean())
    d = [np.log(p[i][keep[i]]) - np.log(g[i][keep[i]]) for i in range(2)]
    weights = [keep[i].sum() for i in range(2)]
    assert m["silog"] == pytest.approx(np.average([100 * np.sqrt((x ** 2).mean() - x.mean() ** 2) for x in d],
                                                  weights=weights))


def test_align_recovers_a_known_scale_and_shift():
    rng = np.random.default_rng(1)
    gt = torch.tensor(rng.uniform(1, 19, (2, 1, 8, 10)))
    lstsq = align_depth((gt - 0.7) / 2.5, gt, "lstsq")
    median = align_depth(gt / 3.0, gt, "median")
    assert torch.allclose(lstsq, gt, atol=1e-9) and torch.allclose(median, gt, atol=1e-9)
    # per image: a second image with another scale is aligned by its own
    pred = torch.cat([gt[:1] * 0.5, gt[1:] * 2.0])
    assert torch.allclose(align_depth(pred, gt, "median"), gt, atol=1e-9)


def box_scene(box_m, wall_m=10.0, cols=(5, 11), h=12, w=16):
    """A wall with a box in front: rows 4..7, columns cols[0]..cols[1]-1; its edges are known exactly."""
    d = np.full((h, w), wall_m)
    d[4:8, cols[0]:cols[1]] = box_m
    return T(d)


def test_boundary_f1_on_a_scene_with_known_edges():
    gt = box_scene(4.0)
    assert boundary_f1(gt, gt).item() == pytest.approx(1.0)
    assert boundary_f1(torch.full_like(gt, 7.0), gt).item() == 0.0  # a flat prediction finds no edge
    # the box one column to the right: its left/right edges all missed, 5 of 6 top/bottom pairs found, at every
    # threshold: recall = precision = (0 + 5/6 + 0 + 5/6) / 4 = 5/12 = F1
    assert boundary_f1(box_scene(4.0, cols=(6, 12)), gt).item() == pytest.approx(5 / 12)
    # an edge of ratio 1.1 is an edge only at the thresholds below 1.1: the weight of those (t / sum t)
    faint = box_scene(10.0 / 1.1)
    t = np.linspace(1.05, 1.25, 10)
    assert np.allclose(BOUNDARY_THRESHOLDS, t)
    assert boundary_f1(faint, faint).item() == pytest.approx(t[t < 1.1].sum() / t.sum())


def test_sparsification_by_hand_and_by_ranking():
    err, unc = torch.tensor([3.0, 0.0, 4.0, 0.0]), torch.tensor([1.0, 0.0, 2.0, 0.0])
    s = sparsification(err, unc, steps=2)  # remove 0% and 50%: RMSE 2.5, then 0 (the two errors went first)
    assert s["curve"] == pytest.approx([2.5, 0.0]) and s["ause"] == 0.0 and s["aurg"] == pytest.approx(1.25)
    rng = np.random.default_rng(2)
    e = torch.tensor(rng.exponential(1.0, 5000))
    assert sparsification(e, e)["ause"] == 0.0
    assert sparsification(e, -e)["aurg"] < 0 < sparsification(e, e + torch.tensor(rng.normal(0, 0.3, 5000)))["aurg"]


def ar1(n, rho, rng):
    """A stationary AR(1) series: neighbouring values correlated by rho, as neighbouring frames' differences are."""
    x = np.zeros(n)
    x[0] = rng.normal() / math.sqrt(1 - rho ** 2)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + rng.normal()
    return x


def test_block_bootstrap_holds_the_true_mean_difference():
    rng = np.random.default_rng(3)
    assert np.allclose(compare.block_bootstrap(np.full(50, 0.3), np.mean, block=5, samples=200), 0.3)
    # differences 0.3 + correlated noise (as of neighbouring frames): 95% intervals over blocks of 20 frames hold the
    # true mean nearly as often as asked; over single frames (as if neighbours were independent) about half as often
    covered = {1: 0, 20: 0}
    for k in range(40):
        d = 0.3 + ar1(400, 0.8, rng) * 0.1
        for block in covered:
            low, high = compare.block_bootstrap(d, np.mean, block=block, samples=300, seed=k)
            covered[block] += low <= 0.3 <= high
    assert covered[20] >= 32 and covered[1] <= 0.6 * covered[20], covered


# ------------------------------------------------------------------------------------------------
# the command lines, on tiny frames with known depth and constant-depth models

@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A split folder of 4 numbered 24x32 frames whose depth spans every bin (clip included)."""
    root = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(4)
    depths = []
    for k in range(4):
        depth = np.minimum(rng.uniform(0.5, 26.0, (24, 32)), 20.0).astype(np.float32)
        write_frame(str(root), None, str(k + 1), rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), depth)
        depths.append(depth.astype(np.float64))
    return str(root), np.stack(depths)


@pytest.fixture(scope="module")
def eight_m_ckpt(tmp_path_factory):
    net = model_lib.build_model("effnet_unet")
    with torch.no_grad():
        net.decoder.out.weight.zero_()
        net.decoder.out.bias.fill_(8.0)
    path = str(tmp_path_factory.mktemp("eight") / "eight.pth")
    save_checkpoint(path, {"model": dict(net.config), "state_dict": net.state_dict(), "input_size": None})
    return path


def test_evaluate_range_bins_align_error_maps_uncertainty_and_gif(scene, constant_depth_ckpt, tmp_path):
    root, gt = scene
    out = tmp_path / "m.json"
    assert evaluate.main(["--data", root, "--ckpt", constant_depth_ckpt, "--amp", "none", "--min_depth", "2",
                          "--max_depth", "15", "--align", "median", "--uncertainty", "--out", str(out),
                          "--save_dir", str(tmp_path / "preds"), "--gif", str(tmp_path / "seq.gif")]) == 0
    m = json.load(open(out))
    keep, err = (gt >= 2) & (gt <= 15), CONSTANT_DEPTH_M - gt
    assert m["rmse"] == pytest.approx(np.sqrt((err[keep] ** 2).mean()), abs=1e-6)
    bins = {r["bin"]: r for r in m["depth_bins"]}
    in_bin = keep & (gt >= 5) & (gt < 10)
    assert bins["5-10 m"]["bias"] == pytest.approx(err[in_bin].mean(), abs=1e-6)
    assert bins["0-2 m"]["pixels"] == 0 and bins["20 m (clip)"]["pixels"] == 0
    aligned = np.concatenate([np.median(gt[i][keep[i]]) - gt[i][keep[i]] for i in range(4)])  # a constant, scaled
    assert m["aligned"]["rmse"] == pytest.approx(np.sqrt((aligned ** 2).mean()), abs=1e-6)
    assert m["boundary_f1"] == 0.0  # a flat prediction has no edge
    assert m["uncertainty"]["frames"] == 4
    unc = np.load(tmp_path / "preds" / "1_uncertainty.npy")
    assert unc.shape == (24, 32) and np.abs(unc).max() < 1e-5  # a constant model agrees with its flipped twin
    error_png = np.array(Image.open(tmp_path / "preds" / "1_error.png"))
    assert error_png.shape == (24, 32, 3)
    gif = Image.open(tmp_path / "seq.gif")
    assert gif.n_frames == 4 and gif.size == (3 * 32, 24) and gif.info["comment"] == evaluate.GIF_COMMENT


def test_single_image_and_list_and_bad_inputs(scene, constant_depth_ckpt, tmp_path, capsys):
    root, _ = scene
    photo = os.path.join(root, "rgb", "2.jpeg")
    assert evaluate.main(["--data", photo, os.path.join(root, "rgb", "3.jpeg"), "--ckpt", constant_depth_ckpt,
                          "--amp", "none", "--save_dir", str(tmp_path / "one")]) == 0
    assert np.load(tmp_path / "one" / "2.npy") == pytest.approx(np.full((24, 32), CONSTANT_DEPTH_M), abs=1e-5)
    assert os.path.exists(tmp_path / "one" / "3.png")
    capsys.readouterr()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.jpg").write_bytes(b"not a jpeg at all")
    os.makedirs(tmp_path / "photos")
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "photos" / "beach.png")
    cases = [([str(tmp_path / "notes.txt")], "notes.txt: not an image file"),
             ([str(tmp_path / "fake.jpg")], "fake.jpg: unreadable image"),
             ([str(tmp_path / "photos"), "--align", "lstsq"], "has no depth maps to align to"),
             ([str(tmp_path / "photos"), "--gif", str(tmp_path / "x.gif")], "without a frame number (e.g. 'beach')")]
    for data, expected in cases:
        save_dir = tmp_path / f"out_{len(expected)}"
        assert evaluate.main(["--data"] + data + ["--ckpt", constant_depth_ckpt, "--save_dir", str(save_dir)]) == 2
        lines = message_lines(capsys.readouterr().err)
        assert len(lines) == 1 and expected in lines[0], lines
        assert not save_dir.exists() and not (tmp_path / "x.gif").exists()


def test_compare_two_models_of_known_difference(scene, constant_depth_ckpt, eight_m_ckpt, tmp_path, capsys):
    root, gt = scene
    out = tmp_path / "cmp.json"
    assert compare.main(["--data", root, "--ckpt", constant_depth_ckpt, "--compare", eight_m_ckpt, "--amp", "none",
                         "--block", "2", "--samples", "300", "--out", str(out),
                         "--save_dir", str(tmp_path / "figs")]) == 0
    r = json.load(open(out))
    rmse = lambda c: np.sqrt(((c - gt) ** 2).mean())
    frame_rmse = lambda c: np.sqrt(((c - gt) ** 2).mean(axis=(1, 2)))
    assert r["rmse_a"] == pytest.approx(rmse(7.0), abs=1e-6) and r["rmse_b"] == pytest.approx(rmse(8.0), abs=1e-6)
    d = frame_rmse(8.0) - frame_rmse(7.0)
    assert r["b_wins_rmse"] == pytest.approx(np.mean(d < 0))
    assert r["mean_frame_rmse_b_minus_a"] == pytest.approx(d.mean())
    low, high = r["rmse_b_minus_a_ci"]
    assert low <= r["rmse_b_minus_a"] <= high
    csv_rows = open(tmp_path / "figs" / "per_frame.csv").read().strip().splitlines()
    assert len(csv_rows) == 5
    capsys.readouterr()
    assert compare.main(["--data", root, "--ckpt", constant_depth_ckpt, "--compare", str(tmp_path / "cmp.json")]) == 2
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cmp.json" in lines[0], lines
