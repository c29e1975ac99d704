"""evaluate.py --ply: back-projection through a pinhole camera, checked on known geometry, and the files it writes."""
import math
import os

import numpy as np
import pytest

import evaluate
import synthetic
from conftest import CONSTANT_DEPTH_M
from dataset import load_rgb_uint8
from evaluate import backproject, camera_intrinsics, ply_bytes

PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def read_ply(path):
    """(header lines, vertices) of a binary PLY written by evaluate.py."""
    data = open(path, "rb").read()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode().splitlines()
    return header, np.frombuffer(data[end:], dtype=PLY_VERTEX)


def plane_fit(points):
    """(unit normal, distance from the origin, largest residual) of the least-squares plane through points."""
    centre = points.mean(0)
    normal = np.linalg.svd(points - centre)[2][-1]
    residual = np.abs((points - centre) @ normal).max()
    return normal, abs(centre @ normal), residual


def test_the_default_camera_is_unreals_90_degrees_and_intrinsics_override_it():
    fx, fy, cx, cy = camera_intrinsics((144, 256))
    assert (fx, fy, cx, cy) == pytest.approx((128.0, 128.0, 127.5, 71.5))  # W/2 / tan(45 deg)
    assert camera_intrinsics((144, 256), 60.0)[0] == pytest.approx(128 / math.tan(math.radians(30)))
    assert camera_intrinsics((144, 256), 60.0, (100.0, 90.0, 120.0, 70.0)) == (100.0, 90.0, 120.0, 70.0)


def test_constant_depth_backprojects_to_a_plane_at_that_depth():
    camera = camera_intrinsics((9, 16))
    points = backproject(np.full((9, 16), 7.0, dtype=np.float32), camera)
    assert points.shape == (144, 3) and np.all(points[:, 2] == 7.0)
    # the 90 degree camera: the outermost pixel centres lie at x = +-z * 7.5 / 8
    assert points[:, 0].min() == pytest.approx(-7.0 * 7.5 / 8) and points[:, 0].max() == pytest.approx(7.0 * 7.5 / 8)
    assert points[0, 1] == pytest.approx(-7.0 * 4 / 8)  # first row above the axis: y points down


def test_a_rendered_floor_backprojects_to_a_plane_at_the_camera_height():
    # synthetic.py's renderer: a floor y=0 seen from 1.5 m up, pitched 20 degrees down, a 90 degree camera
    camera = {"position": (0.0, 1.5, 0.0), "yaw": 0.3, "pitch": math.radians(-20), "fov_deg": 90.0}
    _, depth_m = synthetic.render([{"kind": "plane", "point": (0, 0, 0), "normal": (0, 1, 0)}], camera, {}, 36, 64)
    floor = depth_m < 20  # the floor below the horizon; sky (100 m) is left out as --ply does past the clip
    assert 0.3 < floor.mean() < 0.9
    points = backproject(depth_m, camera_intrinsics(depth_m.shape))[floor.reshape(-1)]
    normal, distance, residual = plane_fit(points)
    assert residual < 1e-4 and distance == pytest.approx(1.5, abs=1e-4)
    # its normal, in camera coordinates (y down), is the world's up turned by the pitch
    assert abs(normal @ [0, -math.cos(math.radians(20)), -math.sin(math.radians(20))]) == pytest.approx(1, abs=1e-6)
    # a wrong field of view still gives a plane, but at the wrong height (0.9 m)
    wrong = backproject(depth_m, camera_intrinsics(depth_m.shape, 60.0))[floor.reshape(-1)]
    assert plane_fit(wrong)[1] == pytest.approx(0.9, abs=0.01) and plane_fit(wrong)[2] < 1e-4


def test_clip_and_nonfinite_pixels_are_left_out(tmp_path):
    import torch
    pred = np.full((4, 5), 3.0, dtype=np.float32)
    pred[0, 0], pred[1, 1], pred[2, 2], pred[3, 3] = 20.0, np.nan, 0.0, 19.9
    evaluate.save_point_cloud(str(tmp_path), "f", pred, torch.ones(3, 8, 10), (None, None))
    header, vertices = read_ply(tmp_path / "f.ply")
    assert "element vertex 17" in header and len(vertices) == 17 and vertices["z"].max() == pytest.approx(19.9)
    assert np.all(vertices["red"] == 255)  # white RGB, resized from 8x10 to the depth map's 4x5


def test_evaluate_writes_one_ply_per_frame(constant_depth_ckpt, synthetic_root, tmp_path):
    out = tmp_path / "clouds"
    assert evaluate.main(["--data", synthetic_root, "--ckpt", constant_depth_ckpt, "--amp", "none",
                          "--save_dir", str(out), "--ply", "--intrinsics", "128,128,127.5,71.5"]) == 0
    names = sorted(f[:-4] for f in os.listdir(os.path.join(synthetic_root, "depth", "test")))
    assert sorted(f[:-4] for f in os.listdir(out) if f.endswith(".ply")) == names
    expected = backproject(np.full((144, 256), CONSTANT_DEPTH_M), camera_intrinsics((144, 256)))
    for name in names:
        header, vertices = read_ply(out / f"{name}.ply")
        assert header[:2] == ["ply", "format binary_little_endian 1.0"]
        assert f"element vertex {144 * 256}" in header and len(vertices) == 144 * 256
        assert np.all(vertices["z"] == CONSTANT_DEPTH_M)
        assert np.allclose(np.stack([vertices["x"], vertices["y"]], 1), expected[:, :2], atol=1e-5)
        rgb = load_rgb_uint8(os.path.join(synthetic_root, "rgb", "test", f"{name}.jpeg")).reshape(-1, 3)
        assert np.array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), rgb)


@pytest.mark.parametrize("flags, message", [
    (["--ply"], "pass --save_dir DIR"),
    (["--fov", "60"], "pass --ply too"),
    (["--save_dir", "S", "--ply", "--fov", "60", "--intrinsics", "1,1,0,0"], "pass one"),
])
def test_camera_flags_that_go_nowhere_fail_in_one_line(constant_depth_ckpt, synthetic_root, tmp_path, capsys, flags,
                                                       message):
    flags = [str(tmp_path / "S") if f == "S" else f for f in flags]
    assert evaluate.main(["--data", synthetic_root, "--ckpt", constant_depth_ckpt] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not os.path.exists(tmp_path / "S")


@pytest.mark.parametrize("flags", [["--intrinsics", "1,2,3"], ["--intrinsics", "0,1,2,3"], ["--fov", "180"]])
def test_bad_camera_values_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", "d", "--ckpt", "c", "--save_dir", "s", "--ply"] + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flags[0] in err[0]


def test_ply_bytes_counts_match_the_header():
    header, vertices = ply_bytes(np.zeros((3, 3)), np.zeros((3, 3), np.uint8)).split(b"end_header\n")
    assert b"element vertex 3" in header and len(vertices) == 3 * PLY_VERTEX.itemsize
