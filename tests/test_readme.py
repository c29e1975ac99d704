"""The README's quick start and evaluation commands, run as written (on synthetic scenes, with small budgets), so
the README cannot drift from the code.

Each command is taken from README.md itself and run in a folder that holds what the README says it needs:
./DepthEstimationUnreal (synthetic scenes made by the project's generator, with a test split) and checkpoints/
(the repository's own). Training commands get small-budget flags appended; the recipes also get --no-pretrained
(their ImageNet weights need the network, which tests never touch). Every command must exit 0.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from utils import METRIC_NAMES

BUDGET = ["--max_epochs", "1", "--batch_size", "4", "--visualize_every", "0", "--train_eval_frames", "4"]


def readme_commands(section):
    """The `python`/`torchrun` lines of the indented code blocks under the README heading `section`."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"README.md has no section '## {section}'"
    lines = [line[4:].split(" #")[0].strip() for line in match.group(1).splitlines() if line.startswith("    ")]
    return [line for line in lines if line.startswith(("python ", "torchrun "))]


def as_run(command):
    """argv for one README command: scripts from the repository, small budgets for training."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--master_port", "29541"] + words[1:]
    else:
        words = [sys.executable] + words[1:]
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    words[script] = os.path.join(ROOT, words[script])
    if words[script].endswith("main.py") and not {"--list-models", "--export"} & set(words):
        if "--resume" not in words:  # a resumed run keeps its own settings
            words += BUDGET + (["--no-pretrained"] if "--recipe" in words else [])
    return words


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    import synthetic
    folder = tmp_path_factory.mktemp("readme")
    synthetic.make_dataset(str(folder / "DepthEstimationUnreal"), n_train=12, n_val=4, n_test=4, seed=1,
                           height=72, width=128, progress=False)
    os.symlink(os.path.join(ROOT, "checkpoints"), folder / "checkpoints")
    return folder


def run_in(folder, command):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(as_run(command), cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"README command failed: {command}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    return r.stdout


def test_readme_quick_start_runs_as_written(readme_folder):
    commands = readme_commands("Quick start")
    assert len(commands) >= 8 and any(c.startswith("torchrun") for c in commands)
    for command in commands:
        out = run_in(readme_folder, command)
        if " evaluate.py " in f" {command} ":
            assert re.search(r"rmse\s+\d", out) and re.search(r"silog\s+\d", out), out
        elif "--list-models" in command:
            assert "effnet_unet" in out
        elif "--recipe" in command:
            assert "not as in the report:" in out and "linear" in out
        else:  # a training run ends by saying where its best.pth is and how to evaluate it
            best = re.search(r"^best checkpoint: (\S+)$", out, re.M)
            assert best and os.path.exists(readme_folder / best.group(1)), out[-1500:]
            assert re.search(r"^evaluate it: python evaluate.py .*--ckpt \S+best.pth$", out, re.M)


def test_readme_evaluation_commands_run_as_written(readme_folder):
    """The Evaluation section's commands, on a model the quick start's first command trains here if needed."""
    if not (readme_folder / "runs" / "effnet_unet" / "best.pth").exists():
        run_in(readme_folder, "python main.py")
    commands = readme_commands("Evaluation (evaluate.py)")
    assert commands
    for command in commands:
        out = run_in(readme_folder, command)
        assert all(re.search(rf"^{name}\s+\d", out, re.M) for name in METRIC_NAMES), out
