"""The README's quick start and docs/evaluation.md's evaluation commands, run as written (on synthetic scenes, with
small budgets), so the documentation cannot drift from the code; and the documentation's links and front page.

Each command is taken from the page itself and run in a folder that holds what the README says it needs:
./DepthEstimationUnreal (synthetic scenes made by the project's generator, with a test split) and checkpoints/
(the repository's own). Training commands get small-budget flags appended; the recipes also get --no-pretrained
(their ImageNet weights need the network, which tests never touch). Every command must exit 0.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from utils import METRIC_NAMES

BUDGET = ["--max_epochs", "1", "--batch_size", "4", "--visualize_every", "0", "--train_eval_frames", "4"]


DOCS = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOC_PAGES = ["README.md", "checkpoints/README.md"] + DOCS


def readme_commands(section, page="README.md"):
    """The `python`/`torchrun` lines of the indented code blocks under the heading `## section` of `page`."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^#{{1,2}} |\Z)", text, re.S | re.M)
    assert match, f"{page} has no section '## {section}'"
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
    yield folder
    shutil.rmtree(folder)  # the runs' checkpoints: CI's disk is small


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
            if "--recipe" in command:  # no later command uses it; ConvNeXt-Base's checkpoints are 3 GB of disk
                shutil.rmtree(os.path.dirname(readme_folder / best.group(1)))


def test_readme_evaluation_commands_run_as_written(readme_folder):
    """docs/evaluation.md's Evaluation section, on a model the quick start's first command trains here if needed."""
    if not (readme_folder / "runs" / "effnet_unet" / "best.pth").exists():
        run_in(readme_folder, "python main.py")
    commands = readme_commands("Evaluation (evaluate.py)", "docs/evaluation.md")
    assert commands
    for command in commands:
        out = run_in(readme_folder, command)
        assert all(re.search(rf"^{name}\s+\d", out, re.M) for name in METRIC_NAMES), out


def relative_links(page):
    """(target, file it resolves to) for each relative link or image of a markdown page; code spans left out."""
    text = re.sub(r"`[^`\n]*`", "", open(os.path.join(ROOT, page), encoding="utf-8").read())
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [(t, os.path.normpath(os.path.join(ROOT, os.path.dirname(page), t.split("#")[0])))
            for t in targets if not re.match(r"[a-z]+:|#", t)]


def test_every_relative_link_leads_to_a_file():
    links = {page: relative_links(page) for page in DOC_PAGES}
    assert len(links["README.md"]) >= 10
    broken = [f"{page}: {target}" for page, found in links.items() for target, path in found
              if not os.path.exists(path)]
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_readme_front_page_is_short_links_every_docs_page_and_states_the_test_command():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size < 15_000, f"README.md is {size} bytes: move details to docs/"
    linked = {path for _, path in relative_links("README.md")}
    unlinked = [page for page in DOCS if os.path.join(ROOT, page) not in linked]
    assert not unlinked, f"README.md links none of {unlinked}"
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    test_command = re.search(r"^python -m pytest.*$", ci, re.M).group(0)
    assert f"    {test_command}\n" in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
