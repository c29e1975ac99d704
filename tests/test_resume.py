"""Kills, signals and --resume: a run resumed after SIGKILL at any moment (inside checkpoint writes too), Ctrl-C or
SIGTERM ends exactly where an uninterrupted run ends; what a resume refuses, and where it writes.

    python -m pytest -q tests/test_resume.py

Guarantees and limits: docs/reliability.md. Runs on tiny synthetic scenes on one CPU thread (conftest.py: the
reference run, the cut run), so that runs in this process and in child processes give the same numbers to the last
bit. main.py's own resume tests (--stop_after_epochs, --branch, the schedule's length): tests/test_main.py.
"""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as main_mod
import rundir
from conftest import EPOCHS, MAIN, ONE_THREAD, QUIET, ROOT, assert_same_run, one_line, train_args
from safe_load import safe_load
from utils import TEMP_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


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


# ------------------------------------------------------------------------------------------------
# resume with changed settings, and from a folder main.py did not make

@QUIET
@pytest.mark.parametrize("flags,refused", [
    (["--batch_size", "2"], "--batch_size (4 -> 2)"),
    (["--model", "unet", "--lr", "0.01"], "--model (unet_res -> unet), --lr (0.001 -> 0.01)"),
])
def test_resume_refuses_flags_that_would_change_the_run(cut_run, capsys, flags, refused):
    last = os.path.join(cut_run, "last.pth")
    with open(last, "rb") as f:
        before = f.read()
    assert main_mod.main(["--resume", last] + flags) == 2
    one_line(capsys.readouterr().err, f"error: --resume {last}: a resumed run keeps the settings it was made with; "
                                      f"it cannot change {refused}")
    with open(last, "rb") as f:
        assert f.read() == before


@QUIET
def test_resume_after_the_data_lost_a_frame_is_refused(root, cut_run, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(root, data)
    os.remove(os.path.join(data, "rgb", "train", "5.jpeg"))
    os.remove(os.path.join(data, "depth", "train", "5.npy"))
    last = os.path.join(cut_run, "last.pth")
    assert main_mod.main(["--resume", last, "--data_dir", data]) == 2
    one_line(capsys.readouterr().err, f"--resume {last}: the run was made on other frames",
             "train 8 -> 7 frames, 1 gone (e.g. 5)", "resuming would change the run")


@QUIET
def test_resume_from_a_users_folder_writes_nothing_there_and_says_what_it_kept(root, cut_run, tmp_path, capsys):
    """The checkpoint sits among a user's own files (metrics.csv, an epoch file, a temp-looking file): the run goes on
    in a new run folder; the data folder moved (same frames) and --workers differ: said, and accepted."""
    users = tmp_path / "downloads"
    users.mkdir()
    shutil.copy(os.path.join(cut_run, "last.pth"), users / "last.pth")
    mine = {"metrics.csv": b"my,own\n", "epoch001.pth": b"my notes", ".notes.abcd1234.tmp": b"mine too"}
    for name, data in mine.items():
        (users / name).write_bytes(data)
    before = {f: (users / f).read_bytes() for f in os.listdir(users)}
    moved = str(tmp_path / "moved")
    shutil.copytree(root, moved)
    capsys.readouterr()
    assert main_mod.main(["--resume", str(users / "last.pth"), "--data_dir", moved, "--workers", "1",
                          "--ckpt_dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert {f: (users / f).read_bytes() for f in os.listdir(users)} == before
    assert "this session uses --data_dir " + moved + ", --workers 1" in out
    assert "the run's own frames, from a moved folder" in out and "its folder was not made by main.py" in out
    new = tmp_path / "runs" / "cut"
    assert rundir.RUN_MARKER in os.listdir(new) and safe_load(str(new / "last.pth"))["epoch"] == 2
    ref = safe_load(os.path.join(cut_run, "last.pth"))
    assert ref["frames"]["train"] == [str(i) for i in range(8)]  # the record the comparison uses
