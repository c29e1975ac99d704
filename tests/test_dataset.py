"""Pairing, layouts, loading errors, clipping, caching and paired augmentation."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import write_frame
import dataset
from dataset import DepthDataset, augment_batch, cut_out, find_pairs, frame_sort_key, parse_augment, zoom_roll
from utils import UserError


def test_numeric_order_and_pairing(tmp_path, tiny_frames):
    names = ["10", "9", "100", "1", "2"]
    for name, (rgb, depth) in zip(names, tiny_frames(5)):
        write_frame(str(tmp_path), "train", name, rgb, depth)
    ds = DepthDataset(str(tmp_path), train=DepthDataset.TRAIN)
    assert ds.names == ["1", "2", "9", "10", "100"]
    assert [os.path.basename(p) for p in ds.depth_paths] == ["1.npy", "2.npy", "9.npy", "10.npy", "100.npy"]
    assert sorted(["b2", "10a", "10", "9"], key=frame_sort_key) == ["9", "10", "10a", "b2"]


def test_each_item_matches_its_own_depth_file(tmp_path, tiny_frames):
    frames = tiny_frames(4, seed=3)
    for i, (rgb, depth) in enumerate(frames):
        write_frame(str(tmp_path), "val", str(i), rgb, depth)
    ds = DepthDataset(str(tmp_path), train=False)  # False = val, as in the course template
    for i, (_, depth) in enumerate(frames):
        assert torch.equal(ds[i][1][0], torch.from_numpy(np.clip(depth, 0, 20)))


def test_missing_pairs_are_one_clear_error(tmp_path, tiny_frames):
    for i, (rgb, depth) in enumerate(tiny_frames(6)):
        write_frame(str(tmp_path), "train", str(i), rgb, depth)
    os.remove(tmp_path / "depth" / "train" / "2.npy")
    os.remove(tmp_path / "depth" / "train" / "4.npy")
    os.remove(tmp_path / "rgb" / "train" / "5.jpeg")
    with pytest.raises(UserError,
                       match=r"2 image\(s\) without depth .*e\.g\. 2, 4.*1 depth map\(s\) without image .*5"):
        DepthDataset(str(tmp_path), split="train")


def test_jpg_png_and_split_folder_given_directly(tmp_path, tiny_frames):
    (a, da), (b, db) = tiny_frames(2)
    write_frame(str(tmp_path), None, "0", a, da, ext=".jpg")
    write_frame(str(tmp_path), None, "1", b, db, ext=".png")
    ds = DepthDataset(str(tmp_path), split="test")  # no rgb/test: the folder is the split itself
    assert ds.names == ["0", "1"] and ds.has_depth
    rgb, _ = ds[1]
    assert torch.equal((rgb * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(b))  # PNG is lossless


def test_image_only_folder(tmp_path, tiny_frames):
    from PIL import Image
    for i, (rgb, _) in enumerate(tiny_frames(3)):
        Image.fromarray(rgb).save(tmp_path / f"{i}.jpeg")
    names, rgb_paths, depth_paths = find_pairs(str(tmp_path), "test")
    assert names == ["0", "1", "2"] and depth_paths is None
    ds = DepthDataset(str(tmp_path), split="test")
    rgb, depth = ds[0]
    assert not ds.has_depth and rgb.shape == (3, 24, 32) and depth.numel() == 0


def test_clipping_and_types(tmp_path, tiny_frames):
    rgb, _ = tiny_frames(1)[0]
    depth = np.full((24, 32), 100.0, np.float32)  # sky, as the dataset stores it
    depth[0, 0], depth[0, 1] = 0.0, 7.25
    write_frame(str(tmp_path), "train", "0", rgb, depth)
    for cache in (False, True):
        ds = DepthDataset(str(tmp_path), split="train", cache=cache)
        rgb_t, depth_t = ds[0]
        assert rgb_t.dtype == depth_t.dtype == torch.float32 and depth_t.shape == (1, 24, 32)
        assert 0 <= rgb_t.min() and rgb_t.max() <= 1
        assert depth_t[0, 0, 0] == 0 and depth_t[0, 0, 1] == 7.25 and depth_t[0, 5, 5] == 20.0
    depth[0, 0] = -3.0  # not metres: an error naming the file, never clipped to 0 silently
    write_frame(str(tmp_path), "train", "0", rgb, depth)
    with pytest.raises(UserError, match="0.npy: depth has 1 negative value"):
        DepthDataset(str(tmp_path), split="train", cache=True)


def test_cache_equals_uncached_and_stacks(tmp_path, tiny_frames):
    for i, (rgb, depth) in enumerate(tiny_frames(3)):
        write_frame(str(tmp_path), "train", str(i), rgb, depth.astype(np.float16).astype(np.float32))
    plain, cached = DepthDataset(str(tmp_path), split="train"), DepthDataset(str(tmp_path), split="train", cache=True)
    for i in range(3):
        assert torch.equal(plain[i][0], cached[i][0]) and torch.equal(plain[i][1], cached[i][1])
    rgb_u8, depth_h = cached.stacked()
    assert rgb_u8.dtype == torch.uint8 and rgb_u8.shape == (3, 3, 24, 32) and depth_h.dtype == torch.float16


@pytest.mark.parametrize("case", ["corrupt_jpeg", "empty_jpeg", "bad_shape", "nan", "int_dtype", "pickle_npy"])
def test_bad_files_name_the_file(tmp_path, tiny_frames, case):
    for i, (rgb, depth) in enumerate(tiny_frames(3)):
        write_frame(str(tmp_path), "val", str(i), rgb, depth)
    rgb_path, depth_path = tmp_path / "rgb" / "val" / "1.jpeg", tmp_path / "depth" / "val" / "1.npy"
    if case == "corrupt_jpeg":
        rgb_path.write_bytes(rgb_path.read_bytes()[:200])
    elif case == "empty_jpeg":
        rgb_path.write_bytes(b"")
    elif case == "bad_shape":
        np.save(depth_path, np.ones((20, 32), np.float32))
    elif case == "nan":
        bad = np.ones((24, 32), np.float32); bad[3, 3] = np.nan
        np.save(depth_path, bad)
    elif case == "int_dtype":
        np.save(depth_path, np.ones((24, 32), np.uint16))
    elif case == "pickle_npy":
        np.save(depth_path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad_file = str(rgb_path) if "jpeg" in case else str(depth_path)
    with pytest.raises(UserError) as err:
        DepthDataset(str(tmp_path), split="val", cache=True)
    assert bad_file in str(err.value) and "\n" not in str(err.value)
    ds = DepthDataset(str(tmp_path), split="val", skip_bad=True)
    assert ds.names == ["0", "2"] and ds.skipped[0][0] == str(rgb_path)


def test_flip_keeps_rgb_and_depth_aligned():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(64, 1, 6, 9, generator=g) * 20
    rgb = (depth / 20).expand(64, 3, 6, 9).clone()  # rgb encodes depth, so alignment is checkable
    rgb_a, depth_a = augment_batch(rgb, depth, flip=True, jitter=0.0, generator=g)
    assert torch.allclose(rgb_a[:, :1] * 20, depth_a, atol=1e-5)
    flipped = [(depth_a[i] != depth[i]).any().item() for i in range(64)]
    assert 15 < sum(flipped) < 49  # about half the images flipped
    for i in range(64):
        assert torch.equal(depth_a[i], depth[i].flip(-1) if flipped[i] else depth[i])


def test_jitter_changes_rgb_only_and_stays_in_range():
    g = torch.Generator().manual_seed(1)
    rgb, depth = torch.rand(8, 3, 10, 12, generator=g), torch.rand(8, 1, 10, 12, generator=g) * 20
    rgb_a, depth_a = augment_batch(rgb, depth, flip=False, jitter=0.4, generator=g)
    assert torch.equal(depth_a, depth) and not torch.equal(rgb_a, rgb)
    assert rgb_a.min() >= 0 and rgb_a.max() <= 1


def test_cache_keeps_float32_where_float16_would_round(tmp_path, tiny_frames):
    for i, (rgb, depth) in enumerate(tiny_frames(2)):
        write_frame(str(tmp_path), "train", str(i), rgb, depth)  # uniform floats: not float16 numbers
    plain, cached = DepthDataset(str(tmp_path), split="train"), DepthDataset(str(tmp_path), split="train", cache=True)
    assert cached.stacked()[1].dtype == torch.float32
    assert all(torch.equal(plain[i][1], cached[i][1]) for i in range(2))


def constant_rand(value):
    """A stand-in for augment_batch's random draws: every draw is `value`."""
    return lambda *shape: torch.full(shape, float(value))


@pytest.mark.parametrize("value", [0.0, 0.25, 0.5, 1.0])
def test_geo_samples_inside_the_frame_and_divides_depth_by_the_zoom(monkeypatch, value):
    """Whatever zoom, roll and shift are drawn (the extremes included), every sample falls inside the image, so no
    border shows; depth is divided by the zoom (x = f X / Z), and pixels at the clip stay at the clip."""
    grids, real = [], dataset.F.grid_sample
    monkeypatch.setattr(dataset.F, "grid_sample", lambda x, grid, **k: grids.append(grid) or real(x, grid, **k))
    depth = torch.full((2, 1, 36, 64), 8.0)
    depth[:, :, :10] = 20.0  # sky at the clip across the top
    rgb = torch.rand(2, 3, 36, 64)
    _, depth_a = zoom_roll(rgb, depth, constant_rand(value))
    assert all(g.abs().max() <= 1.0 + 1e-5 for g in grids)
    roll = math.radians((value * 2 - 1) * dataset.GEO_ROLL_DEG)
    zoom = max(1 + value * (dataset.GEO_ZOOM - 1), math.cos(roll) + 64 / 36 * abs(math.sin(roll)))
    values = sorted(torch.unique(depth_a).tolist())
    assert len(values) == 2 and values[0] == pytest.approx(8.0 / zoom, rel=1e-6) and values[1] == 20.0


def test_geo_keeps_rgb_and_depth_aligned():
    """RGB and depth go through one warp: a depth ramp written into the image stays where its depth is."""
    ramp = torch.linspace(2.0, 18.0, 64).view(1, 1, 1, 64).expand(4, 1, 36, 64).clone()
    rgb = (ramp / 20).expand(4, 3, 36, 64).clone()
    g = torch.Generator().manual_seed(0)
    rgb_a, depth_a = augment_batch(rgb, ramp, flip=False, jitter=0.0, geo=True, generator=g)
    zoom = (rgb_a[:, :1] * 20 / depth_a).flatten(1).median(1).values.view(4, 1, 1, 1)  # depth / zoom, not the image
    assert (zoom >= 1.0).all() and (zoom <= 1.3).all()
    step = 16.0 / 63  # the ramp's change per pixel: nearest (depth) and bilinear (RGB) differ by at most ~1 pixel's
    assert ((rgb_a[:, :1] * 20 - depth_a * zoom).abs() <= 1.5 * step * 1.3).float().mean() > 0.99


def test_photo_and_cutout_change_rgb_only_and_stay_in_range():
    g = torch.Generator().manual_seed(2)
    rgb, depth = torch.rand(8, 3, 20, 24, generator=g), torch.rand(8, 1, 20, 24, generator=g) * 20
    rgb_a, depth_a = augment_batch(rgb, depth, flip=False, jitter=0.0, photo=True, cutout=True, generator=g)
    assert torch.equal(depth_a, depth) and not torch.equal(rgb_a, rgb)
    assert rgb_a.min() >= 0 and rgb_a.max() <= 1 and torch.isfinite(rgb_a).all()


def test_cutout_fills_one_box_with_the_image_mean():
    rgb = torch.rand(1, 3, 20, 30)
    out = cut_out(rgb, constant_rand(0.0))  # drawn 0: cut (0 < p), smallest box, top-left corner
    changed = (out != rgb).any(1)[0]
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (0, 2, 0, 3)  # 0.1 * 20 rows, 0.1 * 30 cols
    assert torch.allclose(out[0, :, 0, 0], rgb.mean((2, 3))[0])


def test_augment_spec_parsing():
    assert parse_augment("none") is None
    assert parse_augment("flip+jitter") == {"flip": True, "jitter": 0.2, "geo": False, "photo": False, "cutout": False}
    for bad in ("", "flip+rotate", "+"):
        with pytest.raises(ValueError):
            parse_augment(bad)
