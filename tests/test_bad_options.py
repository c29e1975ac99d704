"""Bad option values and what this machine lacks: out-of-range flags and camera values stop at parse time in one line,
devices this machine lacks, --compile that cannot compile, a broken optional package.

    python -m pytest -q tests/test_bad_options.py

Guarantees and limits: docs/reliability.md.
"""
import os
import sys

import numpy as np
import pytest
import torch

import benchmark
import evaluate
import main as main_mod
from conftest import QUIET, evaluate_out, one_line, split_copy, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# flags and devices

BAD_FLAGS = [  # (script, flags, the one line after "error: argument ")
    ("main", ["--batch_size", "0"], "--batch_size: must be an integer >= 1, got 0"),
    ("main", ["--batch_size", "-1"], "--batch_size: must be an integer >= 1, got -1"),
    ("main", ["--lr", "-1"], "--lr: must be a number > 0, got -1"),
    ("main", ["--lr", "nan"], "--lr: must be a number > 0, got nan"),
    ("main", ["--max_epochs", "0"], "--max_epochs: must be an integer >= 1, got 0"),
    ("main", ["--evaluate_every", "0"], "--evaluate_every: must be an integer >= 1, got 0"),
    ("main", ["--workers", "-1"], "--workers: must be an integer >= 0, got -1"),
    ("main", ["--time_budget", "-5"], "--time_budget: must be a number > 0, got -5"),
    ("main", ["--ema", "1.5"], "--ema: must be a number in [0, 1), got 1.5"),
    ("main", ["--weight_decay", "-0.1"], "--weight_decay: must be a number >= 0, got -0.1"),
    ("main", ["--folds", "x"], "--folds: must be an integer >= 0, got 'x'"),
    ("main", ["--input_scale", "5"], "--input_scale: must be a number in [0.25, 4], got 5"),
    ("main", ["--decoder_channels", "64,0"], "--decoder_channels: must be positive integers joined by commas, got "
                                             "'64,0'"),
    ("benchmark", ["--deploy_batches", "1,x"], "--deploy_batches: must be positive integers joined by commas, got "
                                               "'1,x'"),
    ("evaluate", ["--batch_size", "0", "--protocol", "course"], "--batch_size: must be an integer >= 1, got 0"),
    ("benchmark", ["--steps", "0"], "--steps: must be an integer >= 1, got 0"),
    ("benchmark", ["--template_workers", "-2"], "--template_workers: must be an integer >= 0, got -2"),
]


@pytest.mark.parametrize("script,flags,line", BAD_FLAGS)
def test_out_of_range_flags_stop_at_parse_time_in_one_line(tmp_path, capsys, script, flags, line):
    module = {"main": main_mod, "evaluate": evaluate, "benchmark": benchmark}[script]
    needed = ["--data", str(tmp_path), "--ckpt", str(tmp_path / "c.pth")] if script == "evaluate" else []
    with pytest.raises(SystemExit) as stop:
        module.main(needed + flags)
    assert stop.value.code == 2
    one_line(capsys.readouterr().err, f"error: argument {line} (--help lists the flags)")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script,device,line", [
    ("main", "foo", "not a device name (cpu, cuda, cuda:1, mps)"),
    ("main", "cuda:7", "this machine has "),
    ("evaluate", "foo", "not a device name (cpu, cuda, cuda:1, mps)"),
    ("evaluate", "cuda:7", "this machine has "),
])
def test_devices_this_machine_lacks_are_one_line(reference, small_root, tmp_path, capsys, script, device, line):
    if script == "main":
        rc = main_mod.main(train_args(small_root, tmp_path, "d", "--device", device))
    else:
        rc = evaluate.main(["--data", small_root, "--ckpt", os.path.join(reference["dir"], "best.pth"),
                            "--device", device, "--out", str(tmp_path / "m.json")])
    assert rc == 2
    one_line(capsys.readouterr().err, f"error: --device {device}: {line}")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# the camera of --ply

@pytest.mark.parametrize("flags", [["--fov", "0"], ["--fov", "180"], ["--fov=-30"], ["--fov", "nan"],
                                   ["--fov", "inf"], ["--intrinsics", "0,100,32,24"], ["--intrinsics=-1,1,0,0"],
                                   ["--intrinsics", "1e-300,1e-300,32,24"], ["--intrinsics", "100,100,32"],
                                   ["--intrinsics", "100,100,32,nan"]])
def test_bad_camera_values_are_one_line_at_parse_time(flags, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", "d", "--ckpt", "c", "--save_dir", "s", "--ply"] + flags)
    assert e.value.code == 2
    one_line(capsys.readouterr().err, f"error: argument {flags[0].split('=')[0]}: must be")


def test_camera_from_extreme_fields_of_view_stays_finite():
    for fov in (1e-6, 179.999999):
        fx, fy, cx, cy = evaluate.camera_intrinsics((48, 64), fov)
        points = evaluate.backproject(np.full((48, 64), 20.0), (fx, fy, cx, cy)).astype(np.float32)
        assert np.isfinite(points).all()


# ------------------------------------------------------------------------------------------------
# --compile that cannot compile, a broken optional package

@QUIET
def test_compile_that_fails_falls_back_to_eager_with_the_same_numbers(root, ckpt, tmp_path, monkeypatch, capsys):
    data = split_copy(root, tmp_path / "data")
    ref = evaluate_out(["--data", data, "--ckpt", ckpt], tmp_path / "ref.json")

    def refuse(*a, **k):
        raise RuntimeError("torch.compile is not supported on this Python")
    monkeypatch.setattr(torch, "compile", refuse)
    got = evaluate_out(["--data", data, "--ckpt", ckpt, "--compile"], tmp_path / "got.json")
    one_line(capsys.readouterr().err, "warning: --compile: torch.compile is not available here (RuntimeError: "
                                      "torch.compile is not supported on this Python); running eager")
    assert {k: got[k] for k in evaluate.METRIC_NAMES} == {k: ref[k] for k in evaluate.METRIC_NAMES}


def test_an_installed_but_broken_onnx_is_one_line(tmp_path, monkeypatch, cut_run, capsys):
    fake = tmp_path / "site"
    (fake / "onnx").mkdir(parents=True)
    (fake / "onnx" / "__init__.py").write_text("raise OSError('libonnx.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "onnx", raising=False)
    assert main_mod.main(["--export", os.path.join(cut_run, "last.pth"), str(tmp_path / "m.onnx")]) == 2
    one_line(capsys.readouterr().err, "error: onnx is installed but importing it fails (OSError: libonnx.so: cannot "
                                      "open shared object file); reinstall it")
    assert not (tmp_path / "m.onnx").exists()
