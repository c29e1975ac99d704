import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_frame(root, split, name, rgb_u8, depth_m, ext=".jpeg"):
    """Write one frame in the dataset layout (split=None: a split folder given directly)."""
    rgb_dir = os.path.join(root, "rgb", split) if split else os.path.join(root, "rgb")
    depth_dir = os.path.join(root, "depth", split) if split else os.path.join(root, "depth")
    os.makedirs(rgb_dir, exist_ok=True)
    Image.fromarray(rgb_u8).save(os.path.join(rgb_dir, name + ext), quality=95)
    if depth_m is not None:
        os.makedirs(depth_dir, exist_ok=True)
        np.save(os.path.join(depth_dir, name + ".npy"), depth_m.astype(np.float32))


@pytest.fixture
def tiny_frames():
    """A function making random frames (rgb uint8 HxWx3, depth float32 HxW with values past the clip)."""
    def make(n, h=24, w=32, seed=0):
        rng = np.random.default_rng(seed)
        return [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                 rng.uniform(0.5, 40.0, (h, w)).astype(np.float32)) for _ in range(n)]
    return make


def small_scenes(tmp_path_factory, name, n_train, seed):
    """Synthetic scenes at 48x64 (n_train train, 4 val, 4 test frames, numbered across splits): the folder."""
    import synthetic
    root = str(tmp_path_factory.mktemp(name))
    synthetic.make_dataset(root, n_train=n_train, n_val=4, n_test=4, seed=seed, height=48, width=64, progress=False)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one CPU thread for a module (as subprocesses with OMP_NUM_THREADS=1), so that runs in the test process
    and in child processes give the same numbers to the last bit."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic DepthEstimationUnreal tree made by the project's own generator."""
    import synthetic
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_dataset(str(root), n_train=24, n_val=8, n_test=6, seed=0, progress=False)
    return str(root)


# ------------------------------------------------------------------------------------------------
# shared helpers for tests that run the scripts or feed them hostile files

def run_script(script, args, **kwargs):
    """Run one of the project's scripts (main.py, evaluate.py) in a fresh Python; text output captured."""
    import subprocess
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + [str(a) for a in args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, **kwargs)


def message_lines(stderr):
    """The lines a user reads on stderr: everything but tqdm progress bars."""
    import re
    return [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip() and "%|" not in line]


def exploit(victim):
    """An object whose unpickling creates the file `victim`: if that file appears, loading ran code."""
    class Payload:
        def __reduce__(self):
            return (open, (str(victim), "w"))
    return Payload()


@pytest.fixture(scope="session")
def constant_depth_ckpt(tmp_path_factory):
    """A checkpoint of a small model that predicts exactly CONSTANT_DEPTH_M everywhere (zero last conv, its bias)."""
    import torch
    import model as model_lib
    from checkpoint import save_checkpoint
    net = model_lib.build_model("effnet_unet")
    with torch.no_grad():
        net.decoder.out.weight.zero_()
        net.decoder.out.bias.fill_(CONSTANT_DEPTH_M)
    path = str(tmp_path_factory.mktemp("constant") / "constant.pth")
    save_checkpoint(path, {"model": dict(net.config), "state_dict": net.state_dict(), "input_size": None})
    return path


CONSTANT_DEPTH_M = 7.0
