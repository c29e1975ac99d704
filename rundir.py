"""A run's folder: claiming it (a new run never writes into another run's folder, two runs never share one), the CSV
files written into it, pruning old epoch checkpoints, and the line saying what a stopped run kept.

main.py writes RUN_MARKER first into a folder it claims; only a folder holding it is ever continued or pruned (the
overwrite policy of every output: outputs.py).
"""
import csv
import io
import itertools
import os
import re

from outputs import claim_folder, entries_in_the_way
from utils import UserError, atomic_write, lock_folder

RUN_MARKER = ".main_py_run"  # written first into a new run folder; only a folder with it is ever continued
STEP_LOG = "loss_steps.csv"  # step, epoch, loss, lr of every training step
EPOCH_FILE = re.compile(r"^epoch\d{3,}\.pth$")  # the epoch snapshots main.py writes (and prunes: no other file)
KILLED_RUN_FILES = ("metrics.csv", STEP_LOG, "curves.png", "figures")  # what a run killed before its first checkpoint
# leaves beside RUN_MARKER: the same command started again continues in such a folder (outputs.entries_in_the_way)


def claim_run_dir(args):
    """(run folder, the lock that claims it) for rank 0, by the overwrite policy (outputs.py). A resumed run continues
    in its checkpoint's folder, locked (refused while another main.py runs there); one whose checkpoint sits in a
    folder main.py did not make (no RUN_MARKER) continues in a new run folder, so nothing beside the checkpoint is
    written or pruned. A new run takes --ckpt_dir/--ckpt_name (default the model name; -2, -3 ... when taken): a folder
    counts as taken when it holds a run (anything but KILLED_RUN_FILES) or another main.py holds its lock, so two runs
    started at once never share one."""
    if args.resume:
        folder = os.path.dirname(os.path.abspath(args.resume))
        if os.path.exists(os.path.join(folder, RUN_MARKER)):
            lock = lock_folder(folder)
            if lock is None:
                raise UserError(f"--resume {args.resume}: another main.py is running in {folder} now; wait for it to "
                                "end (or stop it) and resume again")
            return folder, lock
    base = os.path.join(args.ckpt_dir, args.ckpt_name or args.model)
    explicit = bool(args.ckpt_name) and not args.resume
    for k in itertools.count(1):
        run_dir = base if k == 1 else f"{base}-{k}"
        taken = bool(entries_in_the_way(run_dir, RUN_MARKER, KILLED_RUN_FILES))
        lock = None if taken else claim_folder(run_dir, RUN_MARKER, b"a main.py run folder\n", KILLED_RUN_FILES)
        if lock is not None:
            if args.resume:
                print(f"--resume {args.resume}: its folder was not made by main.py, so nothing is written there; "
                      f"the run continues in {run_dir}")
            return run_dir, lock
        if explicit:
            raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}/last.pth or choose "
                            f"another --ckpt_name" if taken else
                            f"{run_dir} is in use by another main.py running now; choose another --ckpt_name")


def kept_checkpoint_note(run_dir):
    """The sentence a run stopped by an error ends on: which checkpoint it leaves."""
    last = os.path.join(run_dir, "last.pth")
    if os.path.exists(last):
        return f"The last good checkpoint is kept: {last}"
    return "No checkpoint had been written yet."


def write_csv(path, rows):
    """rows (dicts) as CSV, the columns in order of first appearance, written atomically."""
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def write_step_log(run_dir, step_log):
    """STEP_LOG in the run folder: the training loss of every step (this process's batch mean, before the step's
    update) and the decoder LR after it, written from the checkpointed record: exact across --resume."""
    path = os.path.join(run_dir, STEP_LOG)
    if step_log:
        write_csv(path, [dict(zip(("step", "epoch", "loss", "lr"), r)) for r in step_log])
    elif os.path.exists(path):  # a run of ours killed before its first checkpoint: its steps are run again
        os.remove(path)


def prune_epoch_files(run_dir, keep):
    """Delete all but the newest `keep` epoch checkpoints (EPOCH_FILE) of a run folder."""
    files = sorted(f for f in os.listdir(run_dir) if EPOCH_FILE.match(f))
    for f in files[: max(0, len(files) - keep)]:
        os.remove(os.path.join(run_dir, f))
