"""evaluate.py: numbers that mean what they say, both protocols, clear errors. Hostile and wrong checkpoints:
test_hostile_checkpoints.py; never overwriting a user's file: test_outputs.py."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import evaluate
from conftest import run_eval
from dataset import load_depth_m
from utils import ssim


@pytest.fixture(scope="module")
def first_run(ckpt_path, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert evaluate.main(["--data", synthetic_root, "--ckpt", ckpt_path, "--batch_size", "4", "--amp", "none",
                          "--out", str(out / "m.json"), "--save_dir", str(out / "preds")]) == 0
    return out


def gt_and_preds(synthetic_root, preds_dir):
    names = sorted((f[:-4] for f in os.listdir(os.path.join(synthetic_root, "depth", "test"))), key=int)
    gt = [load_depth_m(os.path.join(synthetic_root, "depth", "test", n + ".npy")) for n in names]
    pred = [np.load(os.path.join(preds_dir, n + ".npy")) for n in names]
    return names, gt, pred


def test_metrics_equal_those_of_the_saved_predictions(first_run, synthetic_root):
    m = json.load(open(first_run / "m.json"))
    names, gt, pred = gt_and_preds(synthetic_root, first_run / "preds")
    g, p = np.stack(gt).astype(np.float64), np.stack(pred).astype(np.float64)
    assert m["frames"] == len(names) == 6 and m["protocol"] == "split"
    assert m["rmse"] == pytest.approx(math.sqrt(((p - g) ** 2).mean()), abs=1e-6)
    assert m["mae"] == pytest.approx(np.abs(p - g).mean(), abs=1e-6)
    assert m["ssim"] == pytest.approx(ssim(torch.tensor(p)[:, None], torch.tensor(g)[:, None]).item(), abs=1e-6)
    ratio = np.maximum(p / g, g / p)
    assert m["delta1"] == pytest.approx((ratio < 1.25).mean(), abs=1e-9)
    # the 16-bit PNG holds millimetres, the coloured PNG exists, the CSV has one row per frame
    from PIL import Image
    mm = np.array(Image.open(first_run / "preds" / f"{names[0]}.png"))
    assert mm.dtype == np.uint16 and np.abs(mm / 1000.0 - pred[0]).max() <= 0.0005 + 1e-6
    assert os.path.exists(first_run / "preds" / f"{names[0]}_color.png")
    assert len(open(first_run / "preds" / "per_image.csv").read().strip().splitlines()) == 7
    assert len([f for f in os.listdir(first_run / "preds") if f.startswith(("best_", "worst_"))]) == 6


def test_flicker_equals_that_of_the_saved_predictions(first_run, synthetic_root):
    m = json.load(open(first_run / "m.json"))
    names, gt, pred = gt_and_preds(synthetic_root, first_run / "preds")  # test frames numbered one after another
    pred_change = gt_change = static_pixels = 0.0
    for t in range(len(names) - 1):
        truth = np.abs(gt[t + 1].astype(np.float64) - gt[t])
        static = truth < evaluate.STATIC_M
        pred_change += np.abs(pred[t + 1].astype(np.float64) - pred[t])[static].sum()
        gt_change, static_pixels = gt_change + truth[static].sum(), static_pixels + static.sum()
    assert m["flicker_pairs"] == len(names) - 1 == 5
    assert m["flicker"] == pytest.approx((pred_change - gt_change) / static_pixels, abs=1e-6)


def test_two_runs_identical(first_run, ckpt_path, synthetic_root, tmp_path):
    assert evaluate.main(["--data", synthetic_root, "--ckpt", ckpt_path, "--batch_size", "3", "--amp", "none",
                          "--out", str(tmp_path / "m2.json")]) == 0
    a, b = json.load(open(first_run / "m.json")), json.load(open(tmp_path / "m2.json"))
    for k in ("rmse", "ssim", "mae", "abs_rel", "delta1"):
        assert a[k] == pytest.approx(b[k], abs=1e-12)  # and batch size 3 vs 4 changes nothing


def test_course_protocol_is_the_mean_over_batches(first_run, ckpt_path, synthetic_root, tmp_path):
    assert evaluate.main(["--data", synthetic_root, "--ckpt", ckpt_path, "--batch_size", "4", "--amp", "none",
                          "--protocol", "course", "--out", str(tmp_path / "c.json")]) == 0
    c = json.load(open(tmp_path / "c.json"))
    _, gt, pred = gt_and_preds(synthetic_root, first_run / "preds")
    g, p = np.stack(gt).astype(np.float64), np.stack(pred).astype(np.float64)
    batches = [slice(0, 4), slice(4, 6)]  # 6 frames at batch 4: the last batch is short
    rmse = np.mean([math.sqrt(((p[s] - g[s]) ** 2).mean()) for s in batches])
    ss = np.mean([ssim(torch.tensor(p[s])[:, None], torch.tensor(g[s])[:, None]).item() for s in batches])
    assert c["protocol"] == "course"
    assert c["rmse"] == pytest.approx(rmse, abs=1e-6) and c["ssim"] == pytest.approx(ss, abs=1e-6)
    split = json.load(open(first_run / "m.json"))
    assert abs(c["rmse"] - split["rmse"]) > 1e-6  # the two protocols really differ here


def test_checkpoint_saved_for_another_device_loads_on_cpu(ckpt_path, synthetic_root, tmp_path, monkeypatch):
    ckpt = torch.load(ckpt_path, weights_only=True)
    with monkeypatch.context() as m:  # record every tensor as living on cuda:0, as a GPU run would
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, tmp_path / "gpu.pth")
    assert b"cuda:0" in (tmp_path / "gpu.pth").read_bytes()
    assert evaluate.main(["--data", synthetic_root, "--ckpt", str(tmp_path / "gpu.pth"), "--device", "cpu",
                          "--amp", "none", "--out", str(tmp_path / "g.json")]) == 0


@pytest.mark.parametrize("case,expected", [("corrupt_jpeg", "unreadable image"), ("bad_npy", "unreadable depth file"),
                                           ("size", "but its image is"), ("nan", "NaN/inf")])
def test_bad_inputs_one_line_each_and_skip_bad(ckpt_path, synthetic_root, tmp_path, case, expected):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(synthetic_root, "rgb", "test"), data / "rgb")
    shutil.copytree(os.path.join(synthetic_root, "depth", "test"), data / "depth")
    name = sorted(os.listdir(data / "rgb"))[0][:-5]
    rgb, depth = data / "rgb" / f"{name}.jpeg", data / "depth" / f"{name}.npy"
    if case == "corrupt_jpeg":
        rgb.write_bytes(rgb.read_bytes()[:300])
    elif case == "bad_npy":
        depth.write_bytes(b"not a numpy file")
    elif case == "size":
        np.save(depth, np.ones((100, 100), np.float32))
    elif case == "nan":
        d = np.load(depth); d[0, 0] = np.inf; np.save(depth, d)
    r = run_eval(["--data", str(data), "--ckpt", ckpt_path, "--amp", "none"])
    assert (r.returncode == 2 and expected in r.stderr and name in r.stderr
            and r.stderr.strip().count("\n") == 0), r.stderr
    r = run_eval(["--data", str(data), "--ckpt", ckpt_path, "--amp", "none", "--skip_bad", "--out",
                  str(tmp_path / "s.json")])
    assert r.returncode == 0 and "skipped" in r.stdout
    m = json.load(open(tmp_path / "s.json"))
    assert m["frames"] == 5 and len(m["skipped"]) == 1 and name in m["skipped"][0]["file"]


def test_image_only_folder_predicts_without_metrics(ckpt_path, synthetic_root, tmp_path):
    shutil.copytree(os.path.join(synthetic_root, "rgb", "test"), tmp_path / "imgs")
    r = run_eval(["--data", str(tmp_path / "imgs"), "--ckpt", ckpt_path, "--amp", "none", "--save_dir",
                  str(tmp_path / "p")])
    assert r.returncode == 0 and "no metrics" in r.stdout and "rmse" not in r.stdout
    preds = sorted(f for f in os.listdir(tmp_path / "p") if f.endswith(".npy"))
    assert len(preds) == 6 and np.load(tmp_path / "p" / preds[0]).shape == (144, 256)
