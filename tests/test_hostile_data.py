"""Broken, odd and almost-right data in evaluate.py and main.py: one line naming the file (or the frame), --skip_bad
skipping and listing it, and images that are odd but fine (photos as phones write them, large photos, grayscale,
CMYK, unicode names) read as they are displayed.

    python -m pytest -q tests/test_hostile_data.py

Guarantees and limits: docs/reliability.md.
"""
import errno
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import evaluate
import main as main_mod
import model as model_lib
from conftest import (ONE_THREAD, QUIET, evaluate_out, exploit, message_lines, one_line, run_script, split_copy,
                     train_args)
from safe_load import safe_load

pytestmark = pytest.mark.usefixtures("one_thread")


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
# data that is almost right: implausible depth, mixed sizes, odd shapes, unreadable files

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
# photos as phones and other tools write them, and large ones

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
