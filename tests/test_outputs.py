"""The overwrite policy (outputs.py) and how outputs are written: run folders and --save_dir claimed only when ours,
user files never overwritten, nothing written through a link, two processes at once, full disks and atomic writes.

    python -m pytest -q tests/test_outputs.py

Guarantees and limits: docs/reliability.md. Real processes only where the class is about processes (two runs at once,
a kill during evaluation); everything else runs in this process on tiny frames.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import evaluate
import main as main_mod
import rundir
import utils
from conftest import (MAIN, ONE_THREAD, QUIET, ROOT, SMALL, evaluate_out, one_line, run_eval, sha, split_copy, temps,
                     train_args)
from safe_load import safe_load
from utils import UserError, atomic_write, lock_folder, unlock

pytestmark = pytest.mark.usefixtures("one_thread")


ONE_EPOCH = SMALL[:-4] + ["--max_epochs", "1"]


# ------------------------------------------------------------------------------------------------
# run folders: what is ours, what a new run may continue, what --keep prunes

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


def test_prune_keeps_files_main_py_did_not_name(tmp_path):
    for name in ("epoch001.pth", "epoch002.pth", "epoch003.pth", "epoch_notes.pth", "epochs.pth"):
        (tmp_path / name).write_bytes(b"x")
    rundir.prune_epoch_files(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["epoch003.pth", "epoch_notes.pth", "epochs.pth"]


# ------------------------------------------------------------------------------------------------
# evaluate.py's and export's outputs: never over a user's file, never through a link

def test_never_overwrites_user_files(ckpt_path, synthetic_root, tmp_path):
    (tmp_path / "mine.json").write_text("{\"my\": \"notes\"}")
    r = run_eval(["--data", synthetic_root, "--ckpt", ckpt_path, "--out", str(tmp_path / "mine.json")])
    assert r.returncode == 2 and "not written by evaluate.py" in r.stderr
    assert (tmp_path / "mine.json").read_text() == "{\"my\": \"notes\"}"


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


def test_atomic_write_refuses_links_and_leaves_the_users_file(tmp_path):
    users = tmp_path / "users_notes.txt"
    users.write_text("mine")
    for link, target in (("linked.csv", users), ("dangling.csv", tmp_path / "nowhere")):
        os.symlink(target, tmp_path / link)
        with pytest.raises(UserError, match=f"{link}: is a symbolic link .* refused"):
            atomic_write(str(tmp_path / link), lambda f: f.write(b"ours"))
        assert os.path.islink(tmp_path / link)
    assert users.read_text() == "mine" and not (tmp_path / "nowhere").exists() and temps(tmp_path) == []


@QUIET
def test_evaluate_and_export_never_write_through_a_link(root, ckpt, tmp_path, capsys):
    users = tmp_path / "users.json"
    users.write_text('{"written_by": "evaluate.py", "mine": true}')  # even a file that looks like ours
    os.symlink(users, tmp_path / "out.json")
    data = split_copy(root, tmp_path / "data")
    assert evaluate.main(["--data", data, "--ckpt", ckpt, "--out", str(tmp_path / "out.json")]) == 2
    one_line(capsys.readouterr().err, "--out", "out.json: is a symbolic link")
    # a link named like a prediction inside a folder evaluate.py wrote before
    save = tmp_path / "preds"
    save.mkdir()
    (save / evaluate.MARKER).write_text("evaluate.py output: complete\n")
    os.symlink(users, save / "13.npy")
    assert evaluate.main(["--data", data, "--ckpt", ckpt, "--save_dir", str(save), "--amp", "none"]) == 2
    one_line(capsys.readouterr().err, "13.npy: is a symbolic link")
    for dst in ("copy.pth", "graph.pt"):  # --export: a link (even a dangling one) is an existing file
        os.symlink(tmp_path / f"nowhere_{dst}", tmp_path / dst)
        assert main_mod.main(["--export", ckpt, str(tmp_path / dst)]) == 2
        one_line(capsys.readouterr().err, f"{dst}: exists; export writes a new file only")
    assert users.read_text() == '{"written_by": "evaluate.py", "mine": true}' and os.path.islink(save / "13.npy")
    assert temps(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# two processes at once (real processes), and the locks they meet

def test_two_main_py_runs_started_at_once_with_one_name(root, tmp_path):
    """One trains to the end; the other refuses in one line; the folder holds one run, whole."""
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--data_dir", root, "--ckpt_dir", str(tmp_path),
           "--ckpt_name", "same"] + ONE_EPOCH
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    loser = next(err for rc, _, err in results if rc == 2)
    one_line(loser, "error: ", os.path.join(str(tmp_path), "same"), "choose another --ckpt_name")
    run_dir = tmp_path / "same"
    assert sorted(os.listdir(tmp_path)) == ["same"]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and temps(run_dir) == []  # header + epoch 1, written by one process
    assert safe_load(str(run_dir / "last.pth"))["epoch"] == 1


def test_a_locked_folder_is_taken_by_default_names_and_refused_to_resume(cut_run, tmp_path):
    args = main_mod.get_parser().parse_args(["--ckpt_dir", str(tmp_path), "--model", "unet_res"])
    os.makedirs(tmp_path / "unet_res")
    held = lock_folder(str(tmp_path / "unet_res"))
    try:  # another process (here: another descriptor) holds the folder: a new run goes to the next name
        run_dir, lock = rundir.claim_run_dir(args)
        unlock(lock)
        assert run_dir == str(tmp_path / "unet_res-2") and os.listdir(run_dir) == [rundir.RUN_MARKER]
        args.ckpt_name = "unet_res"
        with pytest.raises(UserError, match="is in use by another main.py running now"):
            rundir.claim_run_dir(args)
    finally:
        unlock(held)
    held = lock_folder(cut_run)
    try:
        args.resume = os.path.join(cut_run, "last.pth")
        with pytest.raises(UserError, match="another main.py is running in .* now"):
            rundir.claim_run_dir(args)
    finally:
        unlock(held)


def test_two_evaluations_into_one_save_dir_a_kill_then_the_same_command(root, ckpt, tmp_path):
    """Two evaluate.py processes started at once with one --save_dir; the one that writes is killed while it writes.
    The other has either refused in one line (it came while the folder was locked) or written every file itself
    (it came after the kill). The same command again then finishes: every file whole, the marker 'complete', no
    temp file left."""
    data = str(tmp_path / "data")
    for sub in ("rgb", "depth"):
        os.makedirs(os.path.join(data, sub))
    for i in range(24):  # enough frames that the writing takes a while
        for sub, ext in (("rgb", ".jpeg"), ("depth", ".npy")):
            shutil.copy(os.path.join(root, sub, "test", f"{12 + i % 4}{ext}"), os.path.join(data, sub, f"{i}{ext}"))
    save = tmp_path / "preds"
    args = ["--data", data, "--ckpt", ckpt, "--save_dir", str(save), "--amp", "none", "--device", "cpu"]
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py")] + args + ["--batch_size", "1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    deadline, killed = time.monotonic() + 300, None
    while time.monotonic() < deadline and killed is None and any(p.poll() is None for p in procs):
        if save.is_dir() and (temps(save) or len(list(save.glob("*.npy"))) >= 3):
            killed = next(p for p in procs if p.poll() is None)  # the writer (the other has refused or waits)
            killed.send_signal(signal.SIGKILL)
        time.sleep(0.002)
    assert killed is not None and killed.wait(timeout=60) == -signal.SIGKILL
    other = next(p for p in procs if p is not killed)
    rc, err = other.wait(timeout=300), other.stderr.read()
    assert rc in (0, 2), err
    if rc == 2:
        one_line(err, f"--save_dir {save}: another evaluate.py is writing this folder now")
    m = evaluate_out(args, tmp_path / "m.json")  # the same command, run to the end
    assert temps(save) == [] and (save / evaluate.MARKER).read_text() == "evaluate.py output: complete\n"
    assert m["frames"] == 24 and sorted(save.glob("*.npy")) == sorted(save / f"{i}.npy" for i in range(24))
    assert all(np.allclose(np.load(save / f"{i}.npy"), np.load(save / f"{i % 4}.npy"), atol=1e-5) for i in range(24))
    assert np.load(save / "0.npy").shape == (48, 64) and len((save / "per_image.csv").read_text().splitlines()) == 25


@QUIET
def test_an_evaluation_into_a_locked_save_dir_refuses_in_one_line(root, ckpt, tmp_path, capsys):
    data = split_copy(root, tmp_path / "data")
    (tmp_path / "preds").mkdir()
    held = lock_folder(str(tmp_path / "preds"))
    try:
        assert evaluate.main(["--data", data, "--ckpt", ckpt, "--save_dir", str(tmp_path / "preds")]) == 2
    finally:
        unlock(held)
    one_line(capsys.readouterr().err, "another evaluate.py is writing this folder now; wait for it")
    assert os.listdir(tmp_path / "preds") == []


# ------------------------------------------------------------------------------------------------
# disk trouble: failing writes, full disks

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


def fill_disk_after(monkeypatch, n_ok):
    """The (n_ok + 1)-th fsync, and every one after it, fails as a full disk does."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(utils.os, "fsync", fsync)


@QUIET
@pytest.mark.parametrize("target", ["save_dir", "out", "export"])
def test_a_full_disk_during_evaluation_or_export_is_one_line_and_leaves_nothing_half_written(
        root, ckpt, cut_run, tmp_path, monkeypatch, capsys, target):
    data = split_copy(root, tmp_path / "data")
    if target == "export":
        fill_disk_after(monkeypatch, 0)
        assert main_mod.main(["--export", os.path.join(cut_run, "last.pth"), str(tmp_path / "slim.pth")]) == 2
        one_line(capsys.readouterr().err, "No space left on device", "slim.pth")
        assert os.listdir(tmp_path) == ["data"]
        return
    out = tmp_path / "m.json"
    if target == "out":
        out.write_text('{"written_by": "evaluate.py", "rmse": 1.0}')
    fill_disk_after(monkeypatch, 5 if target == "save_dir" else 0)  # save_dir: the marker and a frame and a half
    args = ["--data", data, "--ckpt", ckpt, "--amp", "none", "--out", str(out)]
    assert evaluate.main(args + (["--save_dir", str(tmp_path / "preds")] if target == "save_dir" else [])) == 2
    one_line(capsys.readouterr().err, "No space left on device")
    assert temps(tmp_path) == []
    if target == "out":
        assert json.loads(out.read_text()) == {"written_by": "evaluate.py", "rmse": 1.0}  # the previous file, whole
    else:
        preds = tmp_path / "preds"
        assert (preds / evaluate.MARKER).read_text() == "evaluate.py output: in progress\n"  # not 'complete'
        for f in preds.glob("*.npy"):
            assert np.load(f).shape == (48, 64)  # what is there is whole
