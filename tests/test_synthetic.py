"""synthetic.py: determinism, exact planar z-depth on hand-computable scenes, sky, occlusion, shadows, layout."""
import os

import numpy as np
from PIL import Image

import synthetic
from synthetic import FAR_M, make_dataset, project, render, render_frame

GREY = {"color": (0.6, 0.6, 0.6), "pattern": "flat"}
SUN_ABOVE = {"direction": (0.0, 1.0, 0.0)}


def test_same_seed_and_frame_give_identical_arrays():
    rgb, depth_m = render_frame(3, 5)
    assert rgb.dtype == np.uint8 and rgb.shape == (144, 256, 3)
    assert depth_m.dtype == np.float32 and depth_m.shape == (144, 256)
    rgb2, depth2 = render_frame(3, 5)
    assert rgb.tobytes() == rgb2.tobytes() and depth_m.tobytes() == depth2.tobytes()
    for other in (render_frame(3, 6), render_frame(4, 5)):
        assert not np.array_equal(other[0], rgb) and not np.array_equal(other[1], depth_m)


def test_fronto_parallel_plane_has_the_same_depth_everywhere():
    d = 7.25
    for camera in ({"position": (1.0, 2.0, 3.0), "yaw": 0.0, "pitch": 0.0, "fov_deg": 80.0},
                   {"position": (-2.0, 1.5, 4.0), "yaw": 0.7, "pitch": 0.2, "fov_deg": 65.0}):
        forward = synthetic.camera_basis(camera)[0][:, 0]
        wall = {"kind": "plane", "point": tuple(np.array(camera["position"]) + d * forward),
                "normal": tuple(-forward), "material": GREY}
        _, depth_m = render([wall], camera, SUN_ABOVE, 36, 64)
        assert np.abs(depth_m - d).max() < 1e-4          # planar z-depth: the corners too
    corner_ray = synthetic.camera_rays(camera, 36, 64)[1][:, 0]
    assert d * np.linalg.norm(corner_ray) > d + 1.0       # ray length would have failed the test above


def test_floor_depth_per_row_matches_the_pinhole_formula():
    h, pitch, fov, H, W = 1.6, -0.12, 70.0, 48, 64
    camera = {"position": (0.3, h, -1.0), "yaw": 0.4, "pitch": pitch, "fov_deg": fov}
    floor = {"kind": "plane", "point": (0, 0, 0), "normal": (0, 1, 0), "material": GREY}
    _, depth_m = render([floor], camera, SUN_ABOVE, H, W)
    v = np.tan(np.radians(fov) / 2) * H / W * (1 - 2 * (np.arange(H) + 0.5) / H)   # image-plane height per row
    down = -(np.sin(pitch) + v * np.cos(pitch))     # the ray's downward slope per metre of z-depth
    with np.errstate(divide="ignore"):
        expected = np.where(down > 0, h / down, np.inf)
    expected = np.where(expected <= FAR_M, expected, FAR_M)
    assert (expected < 5).any() and (expected == FAR_M).any()
    np.testing.assert_allclose(depth_m, np.repeat(expected[:, None], W, axis=1), rtol=1e-5, atol=1e-4)


def test_misses_are_exactly_far():
    camera = {"position": (0, 1.5, 0), "yaw": 0.0, "pitch": 0.0, "fov_deg": 75.0}
    rgb, depth_m = render([], camera, SUN_ABOVE, 20, 30)
    assert (depth_m == np.float32(100.0)).all() and FAR_M == 100.0
    floor = {"kind": "plane", "point": (0, 0, 0), "normal": (0, 1, 0), "material": GREY}
    _, depth_m = render([floor], camera, SUN_ABOVE, 20, 30)
    assert (depth_m[:10] == 100.0).all()             # above the horizon: sky
    assert (depth_m[-1] < 20.0).all()                # the bottom row sees the floor


def test_sphere_occludes_the_wall_behind_it():
    H, W = 45, 81                                    # odd: the centre pixel's ray is the optical axis
    camera = {"position": (0.0, 0.0, 0.0), "yaw": 0.0, "pitch": 0.0, "fov_deg": 60.0}
    scene = [{"kind": "plane", "point": (0, 0, 12.0), "normal": (0, 0, -1), "material": GREY},
             {"kind": "sphere", "center": (0, 0, 6.0), "radius": 1.5, "material": GREY}]
    _, depth_m = render(scene, camera, SUN_ABOVE, H, W)
    assert abs(depth_m[H // 2, W // 2] - (6.0 - 1.5)) < 1e-4
    assert abs(depth_m[0, 0] - 12.0) < 1e-4
    row, col, z = project(camera, (0, 0, 6.0), H, W)
    assert (row, col, z) == (H // 2, W // 2, 6.0)


def test_boxes_and_cylinders_on_the_optical_axis():
    camera = {"position": (0.0, 0.0, 0.0), "yaw": 0.0, "pitch": 0.0, "fov_deg": 60.0}
    cases = [({"kind": "box", "center": (0, 0, 8), "half_size": (1, 1, 0.5)}, 7.5),
             ({"kind": "box", "center": (0, 0, 8), "half_size": (0.5, 1, 1), "yaw": np.pi / 2}, 7.5),
             ({"kind": "box", "center": (0, 0, 8), "half_size": (1, 1, 1), "yaw": np.pi / 4}, 8 - np.sqrt(2)),
             ({"kind": "cylinder", "base": (0, -1, 8), "radius": 0.7, "height": 2}, 7.3),
             ({"kind": "cylinder", "base": (0, -3, 8), "radius": 0.7, "height": 2}, FAR_M)]   # below the axis
    for prim, expected in cases:
        _, depth_m = render([prim], camera, SUN_ABOVE, 45, 81)
        assert abs(depth_m[22, 40] - expected) < 1e-4, prim


def test_cast_shadow_darkens_the_floor():
    H, W = 96, 128
    camera = {"position": (0.0, 3.0, 0.0), "yaw": 0.0, "pitch": -0.35, "fov_deg": 75.0}
    light = {"direction": (1.0, 1.0, 0.0)}           # sun up and to +x: the shadow falls toward -x
    sphere = {"kind": "sphere", "center": (0, 1.2, 6.0), "radius": 0.8, "material": GREY}
    floor = {"kind": "plane", "point": (0, 0, 0), "normal": (0, 1, 0), "material": GREY}
    row, col, floor_z = project(camera, (-1.2, 0, 6.0), H, W)
    in_shadow = [round(row), round(col)]
    in_sun = [round(c) for c in project(camera, (1.2, 0, 6.0), H, W)[:2]]   # mirror image: same depth
    rgb, depth_m = render([floor, sphere], camera, light, H, W)
    assert abs(depth_m[tuple(in_shadow)] - depth_m[tuple(in_sun)]) < 1e-3   # both see the floor
    assert abs(depth_m[tuple(in_shadow)] - floor_z) < 0.2
    dark, bright = rgb[tuple(in_shadow)].astype(int).sum(), rgb[tuple(in_sun)].astype(int).sum()
    assert dark < bright - 60
    rgb_no_shadow, _ = render([floor, dict(sphere, casts_shadow=False)], camera, light, H, W)
    assert abs(int(rgb_no_shadow[tuple(in_shadow)].astype(int).sum()) - bright) <= 3   # the shadow is the cause


def test_make_dataset_writes_the_unreal_layout(tmp_path):
    out = make_dataset(str(tmp_path / "data"), n_train=3, n_val=2, n_test=1, seed=0, progress=False)
    assert out == str(tmp_path / "data")
    expected = {"train": [0, 1, 2], "val": [3, 4], "test": [5]}
    rgb_names = sorted(os.listdir(os.path.join(out, "rgb")))
    depth_names = sorted(os.listdir(os.path.join(out, "depth")))
    assert rgb_names == depth_names == sorted(expected)
    far_fraction = []
    for split, frames in expected.items():
        assert sorted(os.listdir(os.path.join(out, "rgb", split))) == sorted(f"{k}.jpeg" for k in frames)
        assert sorted(os.listdir(os.path.join(out, "depth", split))) == sorted(f"{k}.npy" for k in frames)
        for k in frames:
            depth_m = np.load(os.path.join(out, "depth", split, f"{k}.npy"))
            assert depth_m.dtype == np.float32 and depth_m.shape == (144, 256)
            assert np.isfinite(depth_m).all() and depth_m.min() > 0 and depth_m.max() <= 100.0
            with Image.open(os.path.join(out, "rgb", split, f"{k}.jpeg")) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (256, 144)
                jpeg = np.asarray(im)
            rgb, depth_again = render_frame(0, k)
            assert np.array_equal(depth_m, depth_again)
            assert np.abs(jpeg.astype(int) - rgb).mean() < 6
            far_fraction.append((depth_m > 20).mean())
    assert 0.05 < np.mean(far_fraction) < 0.7


def test_cli_writes_the_requested_splits(tmp_path):
    synthetic.main([str(tmp_path), "--train", "2", "--val", "1", "--seed", "1"])
    assert sorted(os.listdir(tmp_path / "rgb" / "train")) == ["0.jpeg", "1.jpeg"]
    assert os.listdir(tmp_path / "depth" / "val") == ["2.npy"]
    assert not (tmp_path / "rgb" / "test").exists()
