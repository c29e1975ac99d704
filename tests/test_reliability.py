"""Fault suite: SIGKILL/SIGINT and resume, disk trouble, hostile checkpoints, broken data, numerics, determinism.

    python -m pytest -q tests/test_reliability.py

What it guarantees and what it does not test: docs/reliability.md. Every training here runs on tiny synthetic
scenes (48x64 frames, 16 train / 4 val) with a small model, on one CPU thread (in-process runs set
torch's thread count to 1, subprocesses get OMP_NUM_THREADS=1), so that runs in this process and in
child processes give the same numbers to the last bit.
"""
import csv
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import evaluate
import losses
import main as main_mod
import model as model_lib
import utils
import rundir
from conftest import ROOT, exploit, message_lines, run_script, small_scenes
from checkpoint import CKPT_FORMAT, save_checkpoint
from safe_load import safe_load
from utils import TEMP_NAME, UserError, atomic_write

MAIN = os.path.join(ROOT, "main.py")
EPOCHS = 6  # evaluation (metrics.csv row, best.pth) every 2 epochs: at 2, 4 and 6
RUN = ["--model", "unet_res", "--encoder", "mobilenetv3_small_050", "--no-pretrained", "--batch_size", "4",
       "--train_eval_frames", "4", "--visualize_every", "0", "--amp", "none", "--device", "cpu", "--seed", "5",
       "--evaluate_every", "2", "--max_epochs", str(EPOCHS)]  # 16 frames / batch 4: 4 steps per epoch
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
QUIET = pytest.mark.filterwarnings("error")  # a warning would be more lines on a user's stderr: fail instead
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Synthetic scenes at 48x64: 16 train, 4 val, 4 test frames."""
    return small_scenes(tmp_path_factory, "small", 16, seed=1)


@pytest.fixture(scope="module")
def reference(small_root, tmp_path_factory):
    """An uninterrupted run of RUN (in this process): its folder, and seconds per epoch."""
    out = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    assert main_mod.main(["--data_dir", small_root, "--ckpt_dir", str(out), "--ckpt_name", "ref"] + RUN) == 0
    run_dir = str(out / "ref")
    assert safe_load(os.path.join(run_dir, "best.pth"))["epoch"] == EPOCHS  # the scenarios below rely on it
    return {"dir": run_dir, "epoch_s": (time.monotonic() - t0) / EPOCHS}


def train_args(small_root, ckpt_dir, name, *extra):
    return ["--data_dir", small_root, "--ckpt_dir", str(ckpt_dir), "--ckpt_name", name] + RUN + list(extra)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def temps(folder):
    return [os.path.join(p, f) for p, _, files in os.walk(folder) for f in files if TEMP_NAME.match(f)]


TIMING = ("images_per_s", "train_minutes")  # metrics.csv columns that measure the clock, not the run


def assert_same_run(run_dir, ref_dir):
    """metrics.csv rows and the final and best weights of two runs agree to 1e-6."""
    rows, ref_rows = read_csv(os.path.join(run_dir, "metrics.csv")), read_csv(os.path.join(ref_dir, "metrics.csv"))
    assert len(rows) == len(ref_rows) == EPOCHS
    for row, ref in zip(rows, ref_rows):
        assert row.keys() == ref.keys()
        for key in ref:
            if key not in TIMING and ref[key] != "":
                assert float(row[key]) == pytest.approx(float(ref[key]), abs=1e-6), (row["epoch"], key)
    for name in ("last.pth", "best.pth"):
        a, b = safe_load(os.path.join(run_dir, name)), safe_load(os.path.join(ref_dir, name))
        assert (a["epoch"], a["step"], a["best"]) == (b["epoch"], b["step"], b["best"]), name
        assert max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item()
                   for k in b["state_dict"]) <= 1e-6
    assert temps(run_dir) == []


def one_line(stderr, *fragments):
    """The single line a command printed on stderr (tqdm bars aside); it holds every fragment."""
    lines = message_lines(stderr)
    assert len(lines) == 1, lines
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------
# kill and resume

TEMP_OF = {kind: re.compile(rf"^\.{kind}[^.]*\.pth\.[a-z0-9_]{{8}}\.tmp$") for kind in ("last", "best", "epoch")}


def kill_cycle(cmd, run_dir, trigger, log_path, rng, epoch_s):
    """Run cmd until trigger, then SIGKILL it. Triggers: 'spawn' (0.2-3 s after start: imports, data),
    'train' (0-0.6 epochs after training starts), 'tmp:KIND' (the moment a temp file of last/best/epochNNN.pth
    appears: inside atomic_write), 'tmp:KIND@final' (the same, in the last epoch), 'none' (never)."""
    kind, _, final = trigger.partition("@")
    left_before = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD, cwd=ROOT)
    start = time.monotonic()
    fire_at = start + rng.uniform(0.2, 3.0) if kind == "spawn" else None
    train_delay = rng.uniform(0.0, 0.6) * epoch_s
    log_text = lambda: Path(log_path).read_text(errors="replace")
    while p.poll() is None:
        now = time.monotonic()
        if now - start > 300:
            p.kill()
            pytest.fail(f"{trigger}: still running after 300 s:\n{log_text()[-3000:]}")
        if kind == "train" and fire_at is None and "run folder" in log_text():
            fire_at = now + train_delay
        fire = fire_at is not None and now >= fire_at
        if kind.startswith("tmp:") and os.path.isdir(run_dir):
            fire = any(TEMP_OF[kind[4:]].match(f) for f in os.listdir(run_dir)) and \
                (not final or f"epoch {EPOCHS}:" in log_text())
        if fire:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            left = ([f for f in os.listdir(run_dir) if TEMP_NAME.match(f) and f not in left_before]
                    if os.path.isdir(run_dir) else [])
            return {"killed": True, "temps": left, "log": log_text()}  # temps: the writes this kill cut short
        time.sleep(0.002)
    return {"killed": False, "rc": p.returncode, "log": log_text()}


def test_sigkill_at_random_moments_and_inside_checkpoint_writes_then_resume_equals_uninterrupted(
        small_root, reference, tmp_path):
    """12 SIGKILLs (random moments, and inside atomic_write of last.pth, best.pth, epochNNN.pth), each
    followed by `main.py --resume RUN/last.pth` (or the same command again when no last.pth exists yet);
    after every kill best.pth and last.pth load weights-only; the finished run equals an uninterrupted one."""
    run_dir = str(tmp_path / "runs" / "k")
    last = os.path.join(run_dir, "last.pth")
    fresh = [sys.executable, MAIN] + train_args(small_root, tmp_path / "runs", "k")
    plan = ["tmp:last", "spawn", "train", "tmp:best", "tmp:last", "train", "tmp:epoch", "spawn", "tmp:last", "train",
            "tmp:last@final", "tmp:best@final"]
    rng = random.Random(1234)
    kills, in_write, restarts = 0, 0, 0
    for i, trigger in enumerate(plan + ["none"]):
        cmd = [sys.executable, MAIN, "--resume", last] if os.path.exists(last) else fresh
        r = kill_cycle(cmd, run_dir, trigger, str(tmp_path / f"log{i}.txt"), rng, reference["epoch_s"])
        done = safe_load(last)["epoch"] if os.path.exists(last) else None
        print(f"cycle {i:2d} {trigger:15s} {'killed' if r['killed'] else 'exited'}; temps {r.get('temps')}; "
              f"last.pth: {done} epochs")
        if not r["killed"]:
            assert r["rc"] == 0, f"cycle {i} ({trigger}) failed:\n{r['log'][-3000:]}"
            continue
        kills += 1
        in_write += any(".pth." in t for t in r["temps"])
        restarts += done is None
        for name in ("last.pth", "best.pth"):  # whatever the moment, what is there loads
            if os.path.exists(os.path.join(run_dir, name)):
                ckpt = torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)
                assert ckpt["format"] == "depthkit-checkpoint-v1" and ckpt["state_dict"]
    assert kills >= 10 and in_write >= 5 and restarts >= 1, (kills, in_write, restarts)
    assert os.listdir(tmp_path / "runs") == ["k"]  # restarts continued in the same folder
    assert_same_run(run_dir, reference["dir"])
    # a kill inside an epochNNN.pth write loses that snapshot; last.pth and best.pth are what a run needs
    assert {"last.pth", "best.pth", f"epoch{EPOCHS:03d}.pth"} <= set(os.listdir(run_dir))


@pytest.mark.parametrize("best_pth", ["stale", "missing"])
def test_kill_between_last_and_best_is_repaired_on_resume(reference, tmp_path, capsys, best_pth):
    """A kill after last.pth but before best.pth of the same epoch: the resume writes best.pth again."""
    run_dir = str(tmp_path / "ref")
    shutil.copytree(reference["dir"], run_dir)
    best = os.path.join(run_dir, "best.pth")
    if best_pth == "stale":  # best.pth still holds the previous best epoch
        shutil.copyfile(os.path.join(run_dir, f"epoch{EPOCHS - 2:03d}.pth"), best)
    else:
        os.remove(best)
    (tmp_path / "ref" / ".best.pth.abcd1234.tmp").write_bytes(b"half a checkpoint")
    assert main_mod.main(["--resume", os.path.join(run_dir, "last.pth")]) == 0
    assert "rewrote best.pth" in capsys.readouterr().out
    assert_same_run(run_dir, reference["dir"])


def test_sigint_sigterm_and_double_sigint_then_resume_equals_uninterrupted(
        small_root, reference, tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-epoch saves an exact-resume last.pth; SIGTERM likewise; a second Ctrl-C stops at once
    (last.pth keeps the last finished epoch). Resuming after each ends where an uninterrupted run ends."""
    real_step = main_mod.train_step
    plan = {}

    def step_then_signal(*a, **k):
        loss = real_step(*a, **k)
        plan["n"] = plan.get("n", 0) + 1
        for sig in plan.get(plan["n"], ()):
            signal.raise_signal(sig)
        return loss
    monkeypatch.setattr(main_mod, "train_step", step_then_signal)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    last = str(tmp_path / "s" / "last.pth")

    plan.clear(); plan[2] = [signal.SIGINT]  # global step 2: epoch 1, 2 of 4 steps
    assert main_mod.main(train_args(small_root, tmp_path, "s")) == 130
    assert "SIGINT: saved last.pth at step 2" in capsys.readouterr().out
    ckpt = safe_load(last)
    assert (ckpt["epoch"], ckpt["step"], ckpt["in_epoch"]["steps"]) == (0, 2, 2)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # handlers put back

    plan.clear(); plan[5] = [signal.SIGTERM]  # global step 7: epoch 2, 3 of 4 steps
    assert main_mod.main(["--resume", last]) == 130
    assert "SIGTERM: saved last.pth at step 7" in capsys.readouterr().out
    assert safe_load(last)["in_epoch"]["steps"] == 3

    plan.clear(); plan[7] = [signal.SIGINT, signal.SIGINT]  # global step 14: epoch 4; twice: stop at once
    assert main_mod.main(["--resume", last]) == 130
    assert "interrupted twice" in capsys.readouterr().out
    ckpt = safe_load(last)
    assert (ckpt["epoch"], ckpt["step"], ckpt["in_epoch"]) == (3, 12, None)

    plan.clear()
    assert main_mod.main(["--resume", last]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert_same_run(str(tmp_path / "s"), reference["dir"])


def test_same_seed_same_numbers(small_root, reference, tmp_path):
    assert main_mod.main(train_args(small_root, tmp_path, "again")) == 0
    rows = read_csv(tmp_path / "again" / "metrics.csv")
    ref_rows = read_csv(os.path.join(reference["dir"], "metrics.csv"))
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in ref_rows]  # identical to the last digit
    a, b = weights(tmp_path / "again" / "last.pth"), weights(os.path.join(reference["dir"], "last.pth"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def claimed_dir(args):
    """The run folder main.py claims for these arguments (its lock released at once)."""
    run_dir, lock = rundir.claim_run_dir(args)
    utils.unlock(lock)
    return run_dir


def test_restarting_in_a_folder_left_before_the_first_checkpoint(small_root, tmp_path):
    """A run killed before its first last.pth leaves metrics/figures/temp files: the same command continues
    there (clearing the temp files). Anything else in the folder still counts as a run never overwritten."""
    run_dir = tmp_path / "r"
    (run_dir / "figures").mkdir(parents=True)
    (run_dir / rundir.RUN_MARKER).write_text("")  # the first file a run writes
    (run_dir / "metrics.csv").write_text("epoch\n1\n")
    (run_dir / ".last.pth.k2j4_9zq.tmp").write_bytes(b"partial")
    (run_dir / "figures" / ".epoch002_val3.png.a1b2c3d4.tmp").write_bytes(b"partial")
    args, _ = main_mod.parse_args(train_args(small_root, tmp_path, "r"))
    assert claimed_dir(args) == str(run_dir)
    utils.remove_stale_temps(str(run_dir))
    assert temps(str(run_dir)) == [] and (run_dir / "metrics.csv").exists()
    (run_dir / ".notes.tmp").write_text("mine")  # not an atomic_write temp name: kept
    (run_dir / "best.pth").write_bytes(b"a checkpoint")
    with pytest.raises(UserError, match="already holds a run"):
        claimed_dir(args)
    utils.remove_stale_temps(str(run_dir))
    assert (run_dir / ".notes.tmp").exists()


# ------------------------------------------------------------------------------------------------
# disk trouble

@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, stage):
    target = tmp_path / "last.pth"
    target.write_bytes(b"the previous checkpoint" * 100)
    before = target.read_bytes()

    def write(f):
        f.write(b"x" * 5000)
        if stage == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(b"y" * 5000)
    if stage != "write":
        def fail(*a):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(utils.os, stage, fail)
    with pytest.raises(OSError) as err:
        atomic_write(target, write)
    monkeypatch.undo()
    assert err.value.filename == str(target) and str(target) in str(err.value)  # a write error names its file
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["last.pth"]


def test_atomic_write_gives_the_usual_file_permissions(tmp_path):
    atomic_write(tmp_path / "a.pth", lambda f: f.write(b"x"))
    with open(tmp_path / "b.pth", "wb") as f:
        f.write(b"x")
    assert os.stat(tmp_path / "a.pth").st_mode == os.stat(tmp_path / "b.pth").st_mode  # not mkstemp's 0600


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(small_root, tmp_path):
    """A real kernel error: the resumed process may not write files over 1 MiB (RLIMIT_FSIZE, like a quota)."""
    assert main_mod.main(train_args(small_root, tmp_path, "d", "--stop_after_epochs", "1")) == 0
    last = tmp_path / "d" / "last.pth"
    before = sha(last)
    limit = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, resource.getrlimit(" \
            "resource.RLIMIT_FSIZE)[1])); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", limit, MAIN, "--resume", str(last)], cwd=ROOT, env=ONE_THREAD,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    one_line(r.stderr, f"error: {last}: could not write checkpoint (File too large); the previous file is intact")
    assert sha(last) == before and temps(str(tmp_path / "d")) == []
    assert main_mod.main(["--resume", str(last), "--stop_after_epochs", "2"]) == 0  # and it resumes from there


def test_full_disk_at_metrics_csv_is_one_line(small_root, tmp_path, monkeypatch, capsys):
    real = rundir.atomic_write

    def disk_full_for_metrics(path, write_fn):
        if not str(path).endswith("metrics.csv"):
            return real(path, write_fn)

        def half_then_full(f):
            f.write(b"epoch,step\n")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, half_then_full)
    monkeypatch.setattr(rundir, "atomic_write", disk_full_for_metrics)
    assert main_mod.main(train_args(small_root, tmp_path, "m", "--max_epochs", "2")) == 2
    one_line(capsys.readouterr().err, "error: [Errno 28] No space left on device", str(tmp_path / "m" / "metrics.csv"))
    assert temps(str(tmp_path / "m")) == [] and not (tmp_path / "m" / "metrics.csv").exists()


def test_evaluate_output_that_cannot_be_written_is_one_line(reference, small_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    ckpt = os.path.join(reference["dir"], "best.pth")
    for flag, where in (("--out", tmp_path / "afile" / "m.json"), ("--save_dir", tmp_path / "afile")):
        assert evaluate.main(["--data", small_root, "--ckpt", ckpt, "--amp", "none", flag, str(where)]) == 2
        one_line(capsys.readouterr().err, "error: [Errno", str(tmp_path / "afile"))


# ------------------------------------------------------------------------------------------------
# hostile checkpoints (test_evaluate.py covers: torch.save exploit, raw pickle exploit, weights of another
# model, truncated, random bytes, missing file)

def hostile_checkpoint(kind, ref_best, path, victim):
    """Write a checkpoint of the given kind at path; returns extra evaluate.py flags it needs."""
    good = safe_load(ref_best)
    config, state = dict(good["model"]), good["state_dict"]
    if kind == "empty":
        Path(path).write_bytes(b"")
    elif kind == "folder":
        os.makedirs(path)
    elif kind == "legacy_format_exploit":  # the pre-1.6 (non-zip) format goes through another unpickler
        torch.save({"state_dict": exploit(victim)}, path, _use_new_zipfile_serialization=False)
    elif kind == "numpy_inside":
        torch.save({"model": config, "state_dict": {"w": np.zeros(3)}}, path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    elif kind == "strings_for_weights":
        torch.save({"model": config, "state_dict": {"w": "not a tensor"}}, path)
    elif kind == "unknown_model":
        save_checkpoint(path, {"model": {"name": "evil"}, "state_dict": state})
    elif kind == "unknown_option":
        save_checkpoint(path, {"model": dict(config, rm_rf=True), "state_dict": state})
    elif kind == "unknown_encoder":
        save_checkpoint(path, {"model": dict(config, encoder="no_such_net"), "state_dict": state})
    elif kind == "bare_state_dict_of_another_model":
        torch.save(model_lib.build_model("unet_res", encoder="resnet18").state_dict(), path)
        return ["--model", "unet_res", "--encoder", "mobilenetv3_small_050"]
    elif kind == "nan_weights":
        bad = {k: v.clone() for k, v in state.items()}
        bad["decoder.out.weight"][0, 0] = float("nan")
        save_checkpoint(path, {"model": config, "state_dict": bad})
    elif kind == "asks_to_fetch_and_read_files":  # options that would download or read: ignored, weights are here
        save_checkpoint(path, {"model": dict(config, pretrained=True, encoder_weights=str(victim)),
                               "state_dict": state})
    elif kind == "raw_pickle_exploit":  # pickle's default protocol: torch calls it an unsupported operand
        Path(path).write_bytes(pickle.dumps({"state_dict": exploit(victim)}))
    elif kind == "absurd_widths":  # a 3 MB file describing a decoder of ~10^12 parameters
        save_checkpoint(path, {"model": dict(config, decoder_channels=[2 ** 20] * 5), "state_dict": state})
    elif kind == "inflating_records":  # a small file with one deflated record of 64 MiB of zeros
        buf = io.BytesIO()
        torch.save({"model": config, "state_dict": state, "format": CKPT_FORMAT}, buf)
        with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                dst.writestr(info, src.read(info))
            bomb = zipfile.ZipInfo(src.namelist()[0].split("/")[0] + "/data/bomb")
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(bomb, "w") as f:
                for _ in range(64):
                    f.write(bytes(2 ** 20))
    elif kind == "named_pipe":  # opening it would block forever
        os.mkfifo(path)
    return []


HOSTILE = {  # kind: (exit status, the line on stderr; {ckpt} is the file)
    "empty": (2, "error: {ckpt}: checkpoint file is empty (0 bytes)"),
    "folder": (2, "error: {ckpt}: is a folder, not a checkpoint file"),
    "legacy_format_exploit": (2, "error: {ckpt}: refused: it holds Python objects other than tensors and plain types"),
    "numpy_inside": (2, "error: {ckpt}: refused: it holds Python objects other than tensors and plain types"),
    "not_a_dict": (2, "error: {ckpt}: not a checkpoint (holds a list, expected a dict)"),
    "strings_for_weights": (2, "error: {ckpt}: its state_dict holds something other than tensors"),
    "unknown_model": (2, "error: {ckpt}: cannot build the model it describes (unknown model 'evil'"),
    "unknown_option": (2, "error: {ckpt}: cannot build the model it describes "
                       "(model unet_res: got an unexpected keyword "
                          "argument 'rm_rf'"),
    "unknown_encoder": (2, "error: {ckpt}: cannot build the model it describes (unknown timm encoder 'no_such_net'"),
    "bare_state_dict_of_another_model": (2, "error: {ckpt}: weights do not fit model 'unet_res': "),
    "nan_weights": (3,
                    "warning: {ckpt}: 1 tensor(s) hold NaN/inf (e.g. decoder.out.weight); predictions will be wrong"),
    "asks_to_fetch_and_read_files": (0, None),
    "raw_pickle_exploit": (2, "error: {ckpt}: refused: it holds Python objects other than tensors and plain types "
                              "(loading it could run code)"),
    "absurd_widths": (2, "error: {ckpt}: weights do not fit model 'unet_res': "),
    "inflating_records": (2, "error: {ckpt}: refused: its records inflate to "),
    "named_pipe": (2, "error: {ckpt}: not a regular file (a named pipe, device or socket); refused"),
}


@QUIET
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_evaluate_refuses_hostile_checkpoints_in_one_line(reference, small_root, tmp_path, capsys, kind):
    ckpt, victim = str(tmp_path / f"{kind}.pth"), tmp_path / "pwned"
    extra = hostile_checkpoint(kind, os.path.join(reference["dir"], "best.pth"), ckpt, victim)
    rc = evaluate.main(["--data", small_root, "--split", "val", "--ckpt", ckpt, "--amp", "none",
                        "--out", str(tmp_path / "m.json"), "--save_dir", str(tmp_path / "preds")] + extra)
    status, line = HOSTILE[kind]
    err = capsys.readouterr().err
    assert rc == status, err
    if line:
        assert "weights_only" not in one_line(err, line.format(ckpt=ckpt))  # never advice to load it unsafely
    else:
        assert message_lines(err) == []
    assert not victim.exists()  # no code ran (and exit 0 for asks_to_fetch...: nothing was fetched or read)
    if kind == "nan_weights":  # evaluated, but the NaN metrics are null in the JSON, never a number
        m = json.loads((tmp_path / "m.json").read_text())
        assert m["rmse"] is None and m["frames"] == 4


def resume_checkpoint(kind, ref_last, path, victim):
    """A broken or hostile checkpoint handed to `main.py --resume`."""
    ckpt = safe_load(ref_last)
    if kind == "exploit":
        torch.save({"args": exploit(victim)}, path)
    elif kind == "raw_pickle_exploit":
        import pickle
        Path(path).write_bytes(pickle.dumps(exploit(victim)))
    elif kind == "truncated":
        Path(path).write_bytes(Path(ref_last).read_bytes()[:os.path.getsize(ref_last) // 2])
    elif kind == "random_bytes":
        Path(path).write_bytes(np.random.default_rng(0).bytes(10000))
    elif kind == "empty":
        Path(path).write_bytes(b"")
    elif kind == "folder":
        os.makedirs(path)
    elif kind == "evaluation_only":
        save_checkpoint(path, {"model": ckpt["model"], "state_dict": ckpt["state_dict"]})
    elif kind == "no_optimizer":
        torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, path)
    elif kind == "weights_of_another_model":
        torch.save(dict(ckpt, state_dict=model_lib.build_model("unet_res", encoder="resnet18").state_dict()), path)
    elif kind == "unknown_model":
        torch.save(dict(ckpt, model={"name": "evil"}), path)
    elif kind == "optimizer_of_another_model":
        torch.save(dict(ckpt, optimizer={"state": {}, "param_groups": []}), path)
    elif kind == "damaged_rng":
        torch.save(dict(ckpt, rng={"torch": torch.zeros(3)}), path)


RESUME = {
    "exploit": "refused: it holds Python objects other than tensors and plain types",
    "raw_pickle_exploit": "refused: it holds Python objects other than tensors and plain types",
    "truncated": "not a readable checkpoint (truncated, corrupt or not a PyTorch file",
    "random_bytes": "not a readable checkpoint",
    "empty": "checkpoint file is empty (0 bytes)",
    "folder": "is a folder, not a checkpoint file",
    "missing": "checkpoint file not found",
    "evaluation_only":
        "not a main.py training checkpoint (no args, optimizer, epoch, step, best, history, rng recorded)",
    "no_optimizer": "not a main.py training checkpoint (no optimizer recorded)",
    "weights_of_another_model": "weights do not fit model 'unet_res': ",
    "unknown_model": "cannot build the model it describes (unknown model 'evil'",
    "optimizer_of_another_model": "cannot resume from it (damaged training state: "
                                  "ValueError: loaded state dict has a different "
                                  "number of parameter groups)",
    "damaged_rng": "cannot resume from it (damaged training state: TypeError: ",
}


@QUIET
@pytest.mark.parametrize("kind", list(RESUME))
def test_resume_refuses_hostile_or_broken_checkpoints_in_one_line(reference, tmp_path, capsys, kind):
    path, victim = str(tmp_path / "last.pth"), tmp_path / "pwned"
    resume_checkpoint(kind, os.path.join(reference["dir"], "last.pth"), path, victim)
    assert main_mod.main(["--resume", path]) == 2
    one_line(capsys.readouterr().err, f"error: {path}: {RESUME[kind]}")
    assert not victim.exists()
    assert sorted(os.listdir(tmp_path)) == (["last.pth"] if kind != "missing" else [])  # nothing written beside it


def test_resume_exploit_in_a_real_process(reference, tmp_path):
    path, victim = tmp_path / "last.pth", tmp_path / "pwned"
    resume_checkpoint("exploit", os.path.join(reference["dir"], "last.pth"), str(path), victim)
    r = run_script("main.py", ["--resume", path], env=ONE_THREAD)
    assert r.returncode == 2 and r.stdout == ""
    one_line(r.stderr, f"error: {path}: refused")
    assert not victim.exists()


# ------------------------------------------------------------------------------------------------
# broken data

def split_folder(small_root, dest, n=6):
    """A split folder (rgb/ + depth/) of the first n training frames."""
    for sub, ext in (("rgb", ".jpeg"), ("depth", ".npy")):
        os.makedirs(os.path.join(dest, sub))
        for i in range(n):
            shutil.copy(os.path.join(small_root, sub, "train", f"{i}{ext}"), os.path.join(dest, sub, f"{i}{ext}"))
    return str(dest)


def damage(rgb_dir, depth_dir, frame, case, victim=None):
    """Break one frame as `case` says; returns what the message must name (the file, or the frame)."""
    rgb, depth = os.path.join(rgb_dir, f"{frame}.jpeg"), os.path.join(depth_dir, f"{frame}.npy")
    if case == "empty_jpeg":
        Path(rgb).write_bytes(b"")
    elif case == "truncated_jpeg":
        Path(rgb).write_bytes(Path(rgb).read_bytes()[:os.path.getsize(rgb) // 3])
    elif case == "text_named_jpeg":
        Path(rgb).write_text("this is not an image\n")
    elif case == "depth_png_as_image":
        os.remove(rgb)
        rgb = rgb[:-5] + ".png"
        Image.fromarray((np.load(depth) * 1000).astype(np.uint16)).save(rgb)
    elif case == "empty_npy":
        Path(depth).write_bytes(b"")
    elif case == "npy_wrong_shape":
        np.save(depth, np.stack([np.load(depth)] * 3, -1))
    elif case == "npy_millimetres_uint16":
        np.save(depth, (np.load(depth) * 1000).astype(np.uint16))
    elif case == "npy_nan":
        d = np.load(depth)
        d[5, 5] = np.nan
        np.save(depth, d)
    elif case == "npy_pickle_exploit":
        np.save(depth, np.array([exploit(victim)], dtype=object), allow_pickle=True)
    elif case == "npy_negative":
        np.save(depth, -np.load(depth))
    elif case == "npy_millimetres_float":
        np.save(depth, np.load(depth) * 1000)
    elif case in ("named_pipe_jpeg", "named_pipe_npy"):  # opening one would block forever
        os.remove(rgb if "jpeg" in case else depth)
        os.mkfifo(rgb if "jpeg" in case else depth)
    elif case == "huge_png_header":  # 144 megapixels claimed in a 100-byte file: refused before decoding
        os.remove(rgb)
        rgb = rgb[:-5] + ".png"
        Path(rgb).write_bytes(png_header(12000, 12000))
    elif case == "image_without_depth":
        os.remove(depth)
        return f"(e.g. {frame})"
    elif case == "depth_without_image":
        os.remove(rgb)
        return f"(e.g. {frame})"
    return rgb if ("jpeg" in case or "png" in case) else depth


BROKEN = {
    "empty_jpeg": "empty file (0 bytes)",
    "truncated_jpeg": "unreadable image (OSError: ",
    "text_named_jpeg": "unreadable image (UnidentifiedImageError: cannot identify image file",
    "depth_png_as_image": "a I;16 image (16/32-bit or float, single channel; a depth map?), not an 8-bit RGB image",
    "empty_npy": "empty file (0 bytes)",
    "npy_wrong_shape": "depth must be a 2-D HxW map, got shape (48, 64, 3)",
    "npy_millimetres_uint16": "depth must be a float array of metres, got dtype uint16",
    "npy_nan": "depth has 1 NaN/inf value(s)",
    "npy_pickle_exploit": "unreadable depth file (ValueError: Object arrays cannot be loaded when allow_pickle=False)",
    "image_without_depth": "unpaired frames: 1 image(s) without depth in",
    "depth_without_image": "unpaired frames: 1 depth map(s) without image in",
    "npy_negative": "negative value(s) (min -",
    "npy_millimetres_float": "is far beyond 100 m, so not metres (millimetres?); convert it, or pass "
                             "--allow_unusual_depth",
    "named_pipe_jpeg": "not a regular file (a named pipe, device or socket); refused",
    "named_pipe_npy": "not a regular file (a named pipe, device or socket); refused",
    "huge_png_header": "image is 12000x12000 (144 megapixels), over the limit of 40",
}


def png_header(width, height):
    """A PNG that claims width x height RGB pixels but holds almost no data: PIL reads its size from the header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


@QUIET
@pytest.mark.parametrize("case", list(BROKEN))
def test_evaluate_names_the_broken_file(reference, small_root, tmp_path, capsys, case):
    data = split_folder(small_root, tmp_path / "data")
    blame = damage(os.path.join(data, "rgb"), os.path.join(data, "depth"), 2, case, tmp_path / "pwned")
    assert evaluate.main(["--data", data, "--ckpt", os.path.join(reference["dir"], "best.pth"), "--amp", "none"]) == 2
    one_line(capsys.readouterr().err, "error: ", BROKEN[case], blame)
    assert not (tmp_path / "pwned").exists()


@QUIET
def test_evaluate_skip_bad_skips_and_lists_every_bad_file(reference, small_root, tmp_path, capsys):
    data = split_folder(small_root, tmp_path / "data")
    cases = {2: "empty_jpeg", 3: "npy_nan", 4: "npy_millimetres_uint16"}
    blamed = [damage(os.path.join(data, "rgb"), os.path.join(data, "depth"), i, case) for i, case in cases.items()]
    rc = evaluate.main(["--data", data, "--ckpt", os.path.join(reference["dir"], "best.pth"), "--amp", "none",
                        "--skip_bad", "--out", str(tmp_path / "m.json")])
    out = capsys.readouterr()
    assert rc == 0 and message_lines(out.err) == []
    skipped = [line for line in out.out.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 3 and all(any(b in line for line in skipped) for b in blamed)
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["frames"] == 3 and np.isfinite(m["rmse"])
    assert sorted(s["file"] for s in m["skipped"]) == [os.path.join(data, "rgb", f"{i}.jpeg") for i in cases]


@QUIET
def test_evaluate_empty_split_names_the_folder(reference, tmp_path, capsys):
    for sub in ("rgb/test", "depth/test"):
        os.makedirs(tmp_path / "root" / sub)
    assert evaluate.main(["--data", str(tmp_path / "root"), "--ckpt", os.path.join(reference["dir"], "best.pth")]) == 2
    one_line(capsys.readouterr().err,
             f"error: {tmp_path / 'root'}: no images found (looked for .jpeg/.jpg/.png in rgb/test/")


def odd_but_fine(rgb_dir, depth_dir, frames):
    """Rewrite four frames as grayscale JPEG, RGBA PNG, palette PNG and CMYK JPEG, under names with spaces
    and non-ASCII letters (each keeps its place in the numeric order). Returns the new names."""
    names = [f"{frames[0]} frame ä", f"{frames[1]} 日本", f"{frames[2]} with space", f"{frames[3]} ü"]
    for frame, name, mode, ext in zip(frames, names, ["L", "RGBA", "P", "CMYK"], [".jpeg", ".png", ".png", ".jpeg"]):
        Image.open(os.path.join(rgb_dir, f"{frame}.jpeg")).convert(mode).save(os.path.join(rgb_dir, name + ext))
        os.remove(os.path.join(rgb_dir, f"{frame}.jpeg"))
        os.replace(os.path.join(depth_dir, f"{frame}.npy"), os.path.join(depth_dir, name + ".npy"))
    return names


@QUIET
def test_evaluate_grayscale_rgba_palette_cmyk_and_unicode_names_work(reference, small_root, tmp_path, capsys):
    data = split_folder(small_root, tmp_path / "data")
    names = odd_but_fine(os.path.join(data, "rgb"), os.path.join(data, "depth"), [0, 1, 2, 3])
    assert evaluate.main(["--data", data, "--ckpt", os.path.join(reference["dir"], "best.pth"), "--amp", "none",
                          "--out", str(tmp_path / "m.json"), "--save_dir", str(tmp_path / "preds")]) == 0
    assert message_lines(capsys.readouterr().err) == []
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["frames"] == 6 and np.isfinite(m["rmse"]) and m["skipped"] == []
    assert all(np.load(tmp_path / "preds" / f"{n}.npy").shape == (48, 64) for n in names)


def dataset_root(small_root, dest):
    shutil.copytree(small_root, dest)
    return str(dest)


MAIN_BROKEN = {  # (split, case): the message (val frames are numbered 16-19)
    ("train", "empty_jpeg"): "empty file (0 bytes)",
    ("train", "npy_millimetres_uint16"): "depth must be a float array of metres, got dtype uint16",
    ("train", "image_without_depth"): "unpaired frames: 1 image(s) without depth in",
    ("val", "npy_nan"): "depth has 1 NaN/inf value(s)",
    ("val", "text_named_jpeg"): "unreadable image (UnidentifiedImageError: cannot identify image file",
    ("train", "npy_millimetres_float"): "is far beyond 100 m, so not metres",
    ("val", "npy_negative"): "negative value(s)",
    ("train", "named_pipe_jpeg"): "not a regular file (a named pipe, device or socket); refused",
}


@QUIET
@pytest.mark.parametrize("split,case", list(MAIN_BROKEN))
def test_main_names_the_broken_training_file(small_root, tmp_path, capsys, split, case):
    root = dataset_root(small_root, tmp_path / "data")
    blame = damage(os.path.join(root, "rgb", split), os.path.join(root, "depth", split),
                   2 if split == "train" else 17, case)
    assert main_mod.main(train_args(root, tmp_path / "runs", "b", "--max_epochs", "1")) == 2
    one_line(capsys.readouterr().err, "error: ", MAIN_BROKEN[(split, case)], blame)
    assert not os.path.exists(tmp_path / "runs" / "b" / "last.pth")


@QUIET
def test_main_empty_val_split_is_one_line(small_root, tmp_path, capsys):
    root = dataset_root(small_root, tmp_path / "data")
    for sub in ("rgb", "depth"):
        shutil.rmtree(os.path.join(root, sub, "val"))
        os.makedirs(os.path.join(root, sub, "val"))
    assert main_mod.main(train_args(root, tmp_path / "runs", "e", "--max_epochs", "1")) == 2
    one_line(capsys.readouterr().err, f"error: {root}: no images found (looked for .jpeg/.jpg/.png in rgb/val/")


def test_main_broken_file_read_by_a_dataloader_worker_is_one_line(small_root, tmp_path):
    """--cache off --workers 1: the file is read in a worker process, mid-epoch; still one line, no traceback."""
    root = dataset_root(small_root, tmp_path / "data")
    bad = damage(os.path.join(root, "rgb", "train"), os.path.join(root, "depth", "train"), 7, "truncated_jpeg")
    r = run_script("main.py", train_args(root, tmp_path / "runs", "w", "--cache", "off", "--workers", "1"),
                   env=ONE_THREAD)
    assert r.returncode == 2
    one_line(r.stderr, f"error: {bad}: unreadable image")


@QUIET
def test_main_trains_on_grayscale_rgba_palette_cmyk_and_unicode_names(small_root, tmp_path, capsys):
    root = dataset_root(small_root, tmp_path / "data")
    odd_but_fine(os.path.join(root, "rgb", "train"), os.path.join(root, "depth", "train"), [0, 5, 10, 15])
    names = odd_but_fine(os.path.join(root, "rgb", "val"), os.path.join(root, "depth", "val"), [16, 17, 18, 19])
    assert main_mod.main(train_args(root, tmp_path / "runs", "u", "--max_epochs", "1")) == 0
    assert message_lines(capsys.readouterr().err) == []
    figures = os.listdir(tmp_path / "runs" / "u" / "figures")  # figures of val frames 0, 2, 3 carry their names
    assert all(any(names[i] in f for f in figures) for i in (0, 2, 3))


# ------------------------------------------------------------------------------------------------
# numerics

def term_that_goes_bad(at_call, how, on_call=None):
    """A stand-in for the 'mse' loss term: right, except on training call `at_call`, where it returns NaN
    ('nan_loss'), inf ('inf_loss') or a finite value with NaN gradients ('nan_grad': d sqrt(x)/dx at 0 is inf,
    times 0)."""
    real, calls = losses.TERMS["mse"], [0]

    def term(pred, gt):
        calls[0] += 1
        out = real(pred, gt)
        if calls[0] == at_call:
            if on_call:
                on_call()
            out = out * float(how[:3]) if how.endswith("_loss") else out + (pred * 0).abs().sqrt().mean()
        return out
    return term


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        small_root, reference, tmp_path, monkeypatch, capsys):
    last = tmp_path / "n" / "last.pth"
    seen = {}
    monkeypatch.setitem(losses.TERMS, "mse", term_that_goes_bad(6, "nan_loss", lambda: seen.update(sha=sha(last))))
    assert main_mod.main(train_args(small_root, tmp_path, "n")) == 1
    one_line(capsys.readouterr().err,
             f"error: loss is nan at step 6 (epoch 2); stopping. The last good checkpoint is kept: {last}")
    assert sha(last) == seen["sha"] and safe_load(last)["step"] == 4  # untouched since epoch 1 ended
    monkeypatch.undo()
    assert main_mod.main(["--resume", str(last)]) == 0  # and the kept checkpoint continues to the same end
    assert_same_run(str(tmp_path / "n"), reference["dir"])


def test_inf_loss_before_any_checkpoint_says_so(small_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(losses.TERMS, "mse", term_that_goes_bad(2, "inf_loss"))
    assert main_mod.main(train_args(small_root, tmp_path, "n0")) == 1
    one_line(capsys.readouterr().err,
             "error: loss is inf at step 2 (epoch 1); stopping. No checkpoint had been written yet.")
    assert not (tmp_path / "n0" / "last.pth").exists()


def test_nan_gradients_never_replace_a_good_checkpoint(small_root, tmp_path, monkeypatch, capsys):
    """A finite loss with NaN gradients on the last step of epoch 2 poisons the weights: the epoch-end
    save refuses them, names the step, and last.pth stays the one of epoch 1."""
    last = tmp_path / "g" / "last.pth"
    seen = {}
    monkeypatch.setitem(losses.TERMS, "mse", term_that_goes_bad(8, "nan_grad", lambda: seen.update(sha=sha(last))))
    assert main_mod.main(train_args(small_root, tmp_path, "g", "--max_epochs", "2")) == 1
    one_line(capsys.readouterr().err, "error: weights hold NaN/inf (e.g. ", "after step 8 (epoch 2); stopping. "
             f"The last good checkpoint is kept: {last}")
    assert sha(last) == seen["sha"] and not (tmp_path / "g" / "best.pth").exists()


def tiny_step_setup(device="cpu"):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 1, 3, padding=1).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rgb, depth = torch.rand(2, 3, 8, 8, device=device), torch.rand(2, 1, 8, 8, device=device) * 20
    return net, opt, rgb, depth


def test_overflowing_step_is_skipped_by_an_enabled_grad_scaler_not_fatal():
    """The fp16 path's logic, on CPU: GradScaler finds inf/NaN gradients, skips that optimizer step and halves
    its scale; training goes on. (Real fp16 autocast overflow needs CUDA: see the CUDA-only test below.)"""
    net, opt, rgb, depth = tiny_step_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    bad_grad = lambda p, g: ((p - g) ** 2).mean() + (p * 0).abs().sqrt().mean()
    before = [p.detach().clone() for p in net.parameters()]
    loss = main_mod.train_step(net, None, rgb, depth, lambda p, g: (bad_grad(p, g), {}), opt, None, scaler, None, False)
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # skipped
    main_mod.train_step(net, None, rgb, depth, lambda p, g: (((p - g) ** 2).mean(), {}), opt, None, scaler, None, False)
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # and the next step trains


def test_disabled_grad_scaler_is_a_plain_step():
    """On a CPU main.py's GradScaler is disabled (no fp16): train_step is exactly loss.backward(); step()."""
    net, opt, rgb, depth = tiny_step_setup()
    twin = torch.nn.Conv2d(3, 1, 3, padding=1)
    twin.load_state_dict(net.state_dict())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    mse = lambda p, g: (((p - g) ** 2).mean(), {})
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    main_mod.train_step(net, None, rgb, depth, mse, opt, None, scaler, None, False)
    mse(twin(rgb), depth)[0].backward()
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_fp16_on_a_cpu_is_refused_in_one_line(small_root, tmp_path, capsys):
    assert main_mod.main(train_args(small_root, tmp_path, "f", "--amp", "fp16")) == 2
    one_line(capsys.readouterr().err, "error: --amp fp16 is for CUDA; on a CPU use --amp bf16 or none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
def test_fp16_overflow_steps_are_skipped_on_cuda():
    import model as model_lib
    torch.manual_seed(0)
    net = model_lib.build_model("unet_res", encoder="mobilenetv3_small_050").cuda().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)  # far too large: the first steps overflow in fp16
    rgb, depth = torch.rand(4, 3, 48, 64, device="cuda"), torch.rand(4, 1, 48, 64, device="cuda") * 20
    loss_fn = losses.build_loss("mse+0.15*ssim+0.05*edge")
    before = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    main_mod.train_step(net, None, rgb, depth, loss_fn, opt, None, scaler, torch.float16, True)
    assert scaler.get_scale() < 2.0 ** 40
    assert all(torch.equal(before[k], p) for k, p in net.named_parameters())  # skipped, not fatal
    for _ in range(40):
        main_mod.train_step(net, None, rgb, depth, loss_fn, opt, None, scaler, torch.float16, True)
    assert any(not torch.equal(before[k], p) for k, p in net.named_parameters())
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------------
# hostile inputs, round two: flags, devices, large photos, implausible depth, mixed sizes, output collisions
# (hostile checkpoints and broken data of this round are in HOSTILE, RESUME, BROKEN and MAIN_BROKEN above)

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


def test_working_size_keeps_the_aspect_ratio_near_the_training_pixels():
    assert model_lib.working_size((3000, 4000), None, 144 * 256) == (160, 224)  # a 12-megapixel photo
    assert model_lib.working_size((4000, 3000), None, 144 * 256) == (224, 160)
    assert model_lib.working_size((144, 256), None, 144 * 256) == (144, 256)  # the data itself: unchanged
    assert model_lib.working_size((200, 300), None, 144 * 256) == (200, 300)  # not much larger: unchanged
    assert model_lib.working_size((3000, 4000), (224, 224), 144 * 256) == (224, 224)  # a fixed input size wins
    assert model_lib.working_size((3000, 4000), None, None) == (3000, 4000)  # training size unknown


@QUIET
def test_large_photos_are_predicted_at_the_training_size_and_resized_back(reference, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("portrait", (1200, 900)), ("landscape", (900, 1200))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{name}.jpeg")
    seen, fit = [], model_lib.fit_input
    monkeypatch.setattr(model_lib, "fit_input", lambda rgb, size: seen.append(tuple(size)) or fit(rgb, size))
    assert evaluate.main(["--data", str(photos), "--ckpt", os.path.join(reference["dir"], "best.pth"), "--amp", "none",
                          "--save_dir", str(tmp_path / "preds"), "--out", str(tmp_path / "m.json")]) == 0
    assert message_lines(capsys.readouterr().err) == []
    assert safe_load(os.path.join(reference["dir"], "best.pth"))["train_hw"] == [48, 64]
    assert sorted(seen) == [(64, 64), (64, 64)]  # 48x64 training frames: ~3072 pixels, multiples of 32
    assert np.load(tmp_path / "preds" / "portrait.npy").shape == (1200, 900)
    assert np.load(tmp_path / "preds" / "landscape.npy").shape == (900, 1200)
    m = json.loads((tmp_path / "m.json").read_text())  # images only: --out is still written
    assert m["rmse"] is None and m["frames"] == m["predictions"] == 2


@QUIET
def test_a_split_in_millimetres_needs_the_flag_and_sky_at_100_m_is_fine(reference, small_root, tmp_path, capsys):
    data = split_folder(small_root, tmp_path / "data", n=4)
    for i in range(4):
        depth = os.path.join(data, "depth", f"{i}.npy")
        np.save(depth, np.load(depth) * 1000)
    args = ["--data", data, "--ckpt", os.path.join(reference["dir"], "best.pth"), "--amp", "none"]
    assert evaluate.main(args) == 2
    one_line(capsys.readouterr().err, "error: ", "so not metres (millimetres?)", "--allow_unusual_depth")
    assert evaluate.main(args + ["--allow_unusual_depth", "--out", str(tmp_path / "mm.json")]) == 0
    assert message_lines(capsys.readouterr().err) == []
    sky = np.full((48, 64), 100.0, np.float32)  # the dataset's convention: sky at 100 m, here 70% of the frame
    sky[-15:] = 8.0
    for i in range(4):
        np.save(os.path.join(data, "depth", f"{i}.npy"), sky)
    assert evaluate.main(args + ["--out", str(tmp_path / "sky.json")]) == 0
    assert message_lines(capsys.readouterr().err) == []


@QUIET
@pytest.mark.parametrize("cache", ["on", "off"])
def test_main_refuses_frames_of_two_sizes_naming_one_of_each(small_root, tmp_path, capsys, cache):
    root = dataset_root(small_root, tmp_path / "data")
    rgb, depth = os.path.join(root, "rgb", "train", "3.jpeg"), os.path.join(root, "depth", "train", "3.npy")
    Image.open(rgb).resize((56, 40)).save(rgb)
    np.save(depth, np.ones((40, 56), np.float32))
    assert main_mod.main(train_args(root, tmp_path / "runs", "m", "--cache", cache)) == 2
    one_line(capsys.readouterr().err, "frames of two sizes in train: ", os.path.join(root, "rgb", "train", "0.jpeg"),
             "is 48x64", f"{rgb} is 40x56", "training needs one size")
    assert not os.path.exists(tmp_path / "runs")


@QUIET
def test_save_dir_names_that_would_collide_are_refused_before_anything_is_written(reference, small_root, tmp_path,
                                                                                  capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("2968", "2968_color"):
        shutil.copy(os.path.join(small_root, "rgb", "test", "20.jpeg"), photos / f"{name}.jpeg")
    assert evaluate.main(["--data", str(photos), "--ckpt", os.path.join(reference["dir"], "best.pth"), "--amp", "none",
                          "--save_dir", str(tmp_path / "preds")]) == 2
    one_line(capsys.readouterr().err, "error: --save_dir: frames '2968' and '2968_color' would both write "
                                      "2968_color.png; rename one")
    assert not (tmp_path / "preds").exists()


def test_a_folder_holding_only_a_users_metrics_and_curves_is_never_taken_for_a_killed_run(small_root, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("my own numbers\n")
    (run_dir / "curves.png").write_bytes(b"my own figure")
    args, _ = main_mod.parse_args(train_args(small_root, tmp_path, "r"))
    with pytest.raises(UserError, match="already holds a run"):
        claimed_dir(args)
    args.ckpt_name = None
    args.ckpt_dir, args.model = str(tmp_path), "r"
    assert claimed_dir(args) == str(tmp_path / "r-2")
    assert (run_dir / "metrics.csv").read_text() == "my own numbers\n"
