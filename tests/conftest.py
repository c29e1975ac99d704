import contextlib
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The test command runs one pytest-xdist worker per core (-n auto): torch in a worker gets one thread, else the
# workers' threads oversubscribe the cores (2 workers x 2 threads on this project's 2-core VM: 10.4 minutes).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch
    torch.set_num_threads(1)


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


@contextlib.contextmanager
def torch_on_one_thread():
    """Torch on one CPU thread (as subprocesses with OMP_NUM_THREADS=1), so that runs in the test process and in child
    processes give the same numbers to the last bit."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one CPU thread for a module (`torch_on_one_thread`)."""
    with torch_on_one_thread():
        yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic DepthEstimationUnreal tree made by the project's own generator."""
    import synthetic
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_dataset(str(root), n_train=24, n_val=8, n_test=6, seed=0, progress=False)
    return str(root)


@pytest.fixture(scope="session")
def small_synthetic_root(tmp_path_factory):
    """synthetic_root's frames (24 train, 8 val, 6 test, numbered alike) at 48x64 instead of 144x256: for tests of
    training mechanics (resume, branches, folds, processes), where the frame size does not matter and time does."""
    import synthetic
    root = tmp_path_factory.mktemp("small_synthetic")
    synthetic.make_dataset(str(root), n_train=24, n_val=8, n_test=6, seed=0, height=48, width=64, progress=False)
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


# ------------------------------------------------------------------------------------------------
# the fault suites (test_resume, test_outputs, test_hostile_checkpoints, test_hostile_data, test_numerics,
# test_bad_options): tiny scenes at 48x64, a small model on one CPU thread, and the runs they share, made once a session

MAIN = os.path.join(ROOT, "main.py")
EPOCHS = 6  # evaluation (metrics.csv row, best.pth) every 2 epochs: at 2, 4 and 6
RUN = ["--model", "unet_res", "--encoder", "mobilenetv3_small_050", "--no-pretrained", "--batch_size", "4",
       "--train_eval_frames", "4", "--visualize_every", "0", "--amp", "none", "--device", "cpu", "--seed", "5",
       "--evaluate_every", "2", "--max_epochs", str(EPOCHS)]  # 16 frames / batch 4: 4 steps per epoch
SMALL = ["--model", "unet_res", "--encoder", "mobilenetv3_small_050", "--no-pretrained", "--batch_size", "4",
         "--train_eval_frames", "4", "--visualize_every", "0", "--amp", "none", "--device", "cpu", "--seed", "3",
         "--evaluate_every", "1", "--max_epochs", "2", "--keep", "1"]
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
QUIET = pytest.mark.filterwarnings("error")  # a warning would be more lines on a user's stderr: fail instead
TIMING = ("images_per_s", "train_minutes")  # metrics.csv columns that measure the clock, not the run


@pytest.fixture(scope="session")
def small_root(tmp_path_factory):
    """Synthetic scenes at 48x64: 16 train, 4 val, 4 test frames."""
    return small_scenes(tmp_path_factory, "small", 16, seed=1)


@pytest.fixture(scope="session")
def reference(small_root, tmp_path_factory):
    """An uninterrupted run of RUN (in this process): its folder, and seconds per epoch."""
    import main as main_mod
    from safe_load import safe_load
    out = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    with torch_on_one_thread():
        assert main_mod.main(["--data_dir", small_root, "--ckpt_dir", str(out), "--ckpt_name", "ref"] + RUN) == 0
    run_dir = str(out / "ref")
    assert safe_load(os.path.join(run_dir, "best.pth"))["epoch"] == EPOCHS  # the scenarios below rely on it
    return {"dir": run_dir, "epoch_s": (time.monotonic() - t0) / EPOCHS}


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    """Synthetic scenes at 48x64: train 0-7, val 8-11, test 12-15."""
    return small_scenes(tmp_path_factory, "h3data", 8, seed=2)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """An untrained small model's checkpoint (its predictions vary with the pixels, which is what these tests need)."""
    import torch
    import model as model_lib
    from checkpoint import save_checkpoint
    torch.manual_seed(0)
    net = model_lib.build_model("unet_res", encoder="mobilenetv3_small_050")
    path = str(tmp_path_factory.mktemp("h3ckpt") / "small.pth")
    save_checkpoint(path, {"model": dict(net.config), "state_dict": net.state_dict(), "input_size": None,
                                     "train_hw": [48, 64]})
    return path


@pytest.fixture(scope="session")
def cut_run(root, tmp_path_factory):
    """A main.py run stopped after epoch 1 of 2: its folder (last.pth at epoch 1)."""
    import main as main_mod
    out = tmp_path_factory.mktemp("h3runs")
    with torch_on_one_thread():
        assert main_mod.main(["--data_dir", root, "--ckpt_dir", str(out), "--ckpt_name", "cut", "--stop_after_epochs",
                              "1"] + SMALL) == 0
    return str(out / "cut")


@pytest.fixture(scope="session")
def ckpt_path(tmp_path_factory):
    """A checkpoint of unet_res/resnet18 with random weights but depth in a sensible range (evaluate.py's tests)."""
    import torch
    import model as model_lib
    from checkpoint import save_checkpoint
    torch.manual_seed(0)
    net = model_lib.build_model("unet_res", encoder="resnet18")
    with torch.no_grad():
        net.decoder.out.bias.fill_(8.0)  # random weights, but depth in a sensible range
    path = str(tmp_path_factory.mktemp("ckpt") / "best.pth")
    save_checkpoint(path, {"model": dict(net.config), "state_dict": net.state_dict(), "input_size": None})
    return path


def train_args(small_root, ckpt_dir, name, *extra):
    return ["--data_dir", small_root, "--ckpt_dir", str(ckpt_dir), "--ckpt_name", name] + RUN + list(extra)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def temps(folder):
    """The temp files killed atomic_write calls left in a folder (and its subfolders)."""
    from utils import TEMP_NAME
    return [os.path.join(p, f) for p, _, files in os.walk(folder) for f in files if TEMP_NAME.match(f)]


def assert_same_run(run_dir, ref_dir):
    """metrics.csv rows and the final and best weights of two runs agree to 1e-6."""
    from safe_load import safe_load
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


def split_copy(root, dest, split="test"):
    """A split folder (rgb/ + depth/) copied from the dataset root."""
    for sub in ("rgb", "depth"):
        shutil.copytree(os.path.join(root, sub, split), os.path.join(dest, sub))
    return str(dest)


def evaluate_out(args, out):
    import evaluate
    assert evaluate.main(args + ["--out", str(out), "--amp", "none", "--device", "cpu"]) == 0
    with open(out) as f:
        return json.load(f)


def run_eval(args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py")] + args, capture_output=True, text=True,
                          timeout=300)
