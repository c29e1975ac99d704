"""Hostile inputs, round three (issue 27): outputs through symlinks, two processes at once, resume with changed
settings or from a user's folder, photos as phones write them, almost-right data, kills and full disks during
evaluation and export, bad camera values, broken optional packages and --compile failures.

    python -m pytest -q tests/test_hostile_inputs_3.py

Guarantees and limits: docs/reliability.md. Real processes only where the class is about processes (two runs at once,
a kill during evaluation); everything else runs in this process on tiny frames made here.
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
import torch
from PIL import Image

import dataset
import evaluate
import main as main_mod
import model as model_lib
import rundir
import utils
from checkpoint import save_checkpoint
from conftest import ROOT, message_lines, small_scenes
from safe_load import safe_load
from utils import TEMP_NAME, UserError, atomic_write, lock_folder, unlock

ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SMALL = ["--model", "unet_res", "--encoder", "mobilenetv3_small_050", "--no-pretrained", "--batch_size", "4",
         "--train_eval_frames", "4", "--visualize_every", "0", "--amp", "none", "--device", "cpu", "--seed", "3",
         "--evaluate_every", "1", "--max_epochs", "2", "--keep", "1"]
ONE_EPOCH = SMALL[:-4] + ["--max_epochs", "1"]
QUIET = pytest.mark.filterwarnings("error")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Synthetic scenes at 48x64: train 0-7, val 8-11, test 12-15."""
    return small_scenes(tmp_path_factory, "h3data", 8, seed=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained small model's checkpoint (its predictions vary with the pixels, which is what these tests need)."""
    torch.manual_seed(0)
    net = model_lib.build_model("unet_res", encoder="mobilenetv3_small_050")
    path = str(tmp_path_factory.mktemp("h3ckpt") / "small.pth")
    save_checkpoint(path, {"model": dict(net.config), "state_dict": net.state_dict(), "input_size": None,
                                     "train_hw": [48, 64]})
    return path


@pytest.fixture(scope="module")
def cut_run(root, tmp_path_factory):
    """A main.py run stopped after epoch 1 of 2: its folder (last.pth at epoch 1)."""
    out = tmp_path_factory.mktemp("h3runs")
    assert main_mod.main(["--data_dir", root, "--ckpt_dir", str(out), "--ckpt_name", "cut", "--stop_after_epochs",
                          "1"] + SMALL) == 0
    return str(out / "cut")


def one_line(stderr, *fragments):
    lines = message_lines(stderr)
    assert len(lines) == 1, lines
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    return lines[0]


def temps(folder):
    return [f for _, _, files in os.walk(folder) for f in files if TEMP_NAME.match(f)]


def split_copy(root, dest, split="test"):
    """A split folder (rgb/ + depth/) copied from the dataset root."""
    for sub in ("rgb", "depth"):
        shutil.copytree(os.path.join(root, sub, split), os.path.join(dest, sub))
    return str(dest)


def evaluate_out(args, out):
    assert evaluate.main(args + ["--out", str(out), "--amp", "none", "--device", "cpu"]) == 0
    with open(out) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# 2. outputs through symlinks: never written through, never replaced

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
# 3. two processes at once (real processes), and the locks they meet

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
# 7. resume with changed settings, and from a folder main.py did not make

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


def test_prune_keeps_files_main_py_did_not_name(tmp_path):
    for name in ("epoch001.pth", "epoch002.pth", "epoch003.pth", "epoch_notes.pth", "epochs.pth"):
        (tmp_path / name).write_bytes(b"x")
    rundir.prune_epoch_files(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["epoch003.pth", "epoch_notes.pth", "epochs.pth"]


# ------------------------------------------------------------------------------------------------
# 1. photos as phones and other tools write them

def png16(path, rgb16):
    """A 16-bit-per-channel RGB PNG (PIL writes none), written by hand."""
    import struct
    import zlib
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_photos_are_read_as_displayed_in_their_colours(tmp_path):
    rgb = np.zeros((24, 40, 3), np.uint8)  # three flat colour blocks: lossy formats stay close to them
    rgb[:, :20], rgb[:, 20:], rgb[:8] = (200, 40, 40), (40, 40, 200), (40, 200, 40)
    img = Image.fromarray(rgb)
    for orientation, undo in ((6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180),
                              (8, Image.Transpose.ROTATE_270), (2, Image.Transpose.FLIP_LEFT_RIGHT)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = img.transpose(undo)  # the pixels as the camera stored them
        stored.save(tmp_path / f"o{orientation}.JPG", exif=exif.tobytes(), quality=95)
        stored.save(tmp_path / f"raw{orientation}.jpg", quality=95)  # the same pixels, no tag
        shown = dataset.load_rgb_uint8(str(tmp_path / f"o{orientation}.JPG"))
        assert dataset.image_hw(str(tmp_path / f"o{orientation}.JPG")) == shown.shape[:2] == (24, 40)
        with Image.open(tmp_path / f"raw{orientation}.jpg") as stored_file:
            raw = np.asarray(stored_file.transpose(dataset.TURN[orientation]))
        assert np.array_equal(shown, raw)  # exactly the stored pixels, turned
        assert np.abs(shown.astype(int) - rgb).mean() < 6  # upright: close to the original, not sideways
    img.convert("CMYK").save(tmp_path / "cmyk.jpeg", quality=95)
    img.save(tmp_path / "progressive.jpeg", progressive=True, quality=95)
    png16(tmp_path / "deep.png", rgb.astype(np.uint16) * 257)
    rgba = np.dstack([rgb, np.full((24, 40), 255, np.uint8)])
    rgba[:, :4, 3] = 0  # transparent stripe: shown over white
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    img.quantize(3).save(tmp_path / "palette.png")
    img.convert("L").save(tmp_path / "gray.PNG")
    for ext in (".bmp", ".TIF", ".webp"):
        img.save(tmp_path / f"plain{ext}", **({"lossless": True} if ext == ".webp" else {}))
    lossy = {"cmyk.jpeg": 3, "progressive.jpeg": 6}
    for name in ["deep.png", "palette.png", "plain.bmp", "plain.TIF", "plain.webp"] + list(lossy):
        got = dataset.load_rgb_uint8(str(tmp_path / name)).astype(int)
        assert np.abs(got - rgb).mean() <= lossy.get(name, 0), name
    alpha = dataset.load_rgb_uint8(str(tmp_path / "alpha.png"))
    assert (alpha[:, :4] == 255).all() and np.array_equal(alpha[:, 4:], rgb[:, 4:])
    gray = dataset.load_rgb_uint8(str(tmp_path / "gray.PNG"))
    assert np.array_equal(gray[..., 0], np.asarray(img.convert("L"))) and (gray[..., 0] == gray[..., 2]).all()


@QUIET
def test_a_folder_of_photos_is_predicted_upright_and_tiny_ones_refused(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    upright = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(photos / "IMG_0001.JPG",
                                                                         exif=exif.tobytes(), quality=95)
    Image.fromarray(dataset.load_rgb_uint8(str(photos / "IMG_0001.JPG"))).save(photos / "IMG_0002.png")
    Image.fromarray(rng.integers(0, 256, (16, 400, 3), dtype=np.uint8)).save(photos / "pano.webp", lossless=True)
    Image.fromarray(upright[:4, :6]).save(photos / "icon.png")
    base = ["--data", str(photos), "--ckpt", ckpt, "--amp", "none", "--device", "cpu"]
    assert evaluate.main(base + ["--save_dir", str(tmp_path / "a")]) == 2
    one_line(capsys.readouterr().err, "icon.png: image is 6x4 pixels, too small")
    m = evaluate_out(base + ["--save_dir", str(tmp_path / "b"), "--skip_bad"], tmp_path / "m.json")
    assert m["predictions"] == 3 and [s["file"] for s in m["skipped"]] == [str(photos / "icon.png")]
    one, two = np.load(tmp_path / "b" / "IMG_0001.npy"), np.load(tmp_path / "b" / "IMG_0002.npy")
    assert one.shape == (40, 56) and np.allclose(one, two, atol=1e-5)  # as displayed, as the upright copy
    assert np.load(tmp_path / "b" / "pano.npy").shape == (16, 400)


# ------------------------------------------------------------------------------------------------
# 5. data that is almost right

@QUIET
def test_depth_maps_shaped_1hw_and_hw1_score_as_hw_and_a_symlinked_data_folder_works(root, ckpt, tmp_path):
    data = split_copy(root, tmp_path / "data")
    ref = evaluate_out(["--data", data, "--ckpt", ckpt], tmp_path / "ref.json")
    for i, path in enumerate(sorted((tmp_path / "data" / "depth").glob("*.npy"))[:2]):
        d = np.load(path)
        np.save(path, d[None] if i == 0 else d[..., None])
    os.symlink(data, tmp_path / "linked")
    got = evaluate_out(["--data", str(tmp_path / "linked"), "--ckpt", ckpt], tmp_path / "got.json")
    assert {k: got[k] for k in evaluate.METRIC_NAMES} == {k: ref[k] for k in evaluate.METRIC_NAMES}


@QUIET
@pytest.mark.parametrize("case,line", [
    ("uint16_mm", "got dtype uint16; integer depth is usually millimetres from a depth sensor: save it as float32"),
    ("inf_sky", "depth has 64 NaN/inf value(s) (+inf for sky? store a finite depth beyond the range"),
    ("0001_and_1", "are one number written two ways"),
    ("turned", "depth map is 64x48 but its image is 48x64 (HxW) (turned by 90 degrees"),
    ("unreadable", "unreadable depth file (no permission to read it)"),
])
def test_almost_right_data_is_one_line_naming_the_file(root, ckpt, tmp_path, capsys, monkeypatch, case, line):
    data = split_copy(root, tmp_path / "data")
    depth = os.path.join(data, "depth", "13.npy")
    if case == "uint16_mm":
        np.save(depth, (np.load(depth) * 1000).astype(np.uint16))
    elif case == "inf_sky":
        d = np.load(depth)
        d[0] = np.inf
        np.save(depth, d)
    elif case == "0001_and_1":
        for sub, ext in (("rgb", ".jpeg"), ("depth", ".npy")):
            shutil.copy(os.path.join(data, sub, "13" + ext), os.path.join(data, sub, "0013" + ext))
    elif case == "turned":
        np.save(depth, np.load(depth).T.copy())
    elif case == "unreadable":
        deny_reading(monkeypatch, depth)
    assert evaluate.main(["--data", data, "--ckpt", ckpt, "--amp", "none"]) == 2
    err = one_line(capsys.readouterr().err, "error: ", line)
    assert ("'13'" in err and "'0013'" in err) if case == "0001_and_1" else depth in err


def deny_reading(monkeypatch, *paths):
    """Take read permission away; as root (who reads anyway) the open itself is refused as the kernel would."""
    for p in paths:
        os.chmod(p, 0)
    if os.geteuid() == 0:
        import builtins
        real_open = builtins.open

        def no_read(file, *a, **k):
            if os.fspath(file) in paths if isinstance(file, (str, os.PathLike)) else False:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return real_open(file, *a, **k)
        monkeypatch.setattr(builtins, "open", no_read)


@QUIET
def test_unreadable_files_with_skip_bad_and_flicker_not_bridging_the_gap(root, ckpt, tmp_path, monkeypatch, capsys):
    """--skip_bad skips the unreadable frame and lists it; flicker then pairs 12-13 only (the skipped frame 14 is a
    gap in the numbering: 13 and 15 are not neighbours)."""
    data = split_copy(root, tmp_path / "data")
    full = evaluate_out(["--data", data, "--ckpt", ckpt], tmp_path / "full.json")
    assert full["flicker_pairs"] == 3
    rgb = os.path.join(data, "rgb", "14.jpeg")
    deny_reading(monkeypatch, rgb)
    assert evaluate.main(["--data", data, "--ckpt", ckpt, "--amp", "none"]) == 2
    one_line(capsys.readouterr().err, f"{rgb}: unreadable image (no permission to read it)")
    m = evaluate_out(["--data", data, "--ckpt", ckpt, "--skip_bad"], tmp_path / "m.json")
    assert m["frames"] == 3 and m["skipped"] == [{"file": rgb, "reason": f"{rgb}: unreadable image (no permission to "
                                                                          "read it)"}]
    assert m["flicker_pairs"] == 1  # 12-13 only


# ------------------------------------------------------------------------------------------------
# 4. full disks during --save_dir, --out and --export

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


# ------------------------------------------------------------------------------------------------
# 6. bad option values, --compile that cannot compile, a broken optional package

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
