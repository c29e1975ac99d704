"""A run's training state: what a checkpoint holds beyond the weights (`training_state`) and its inverse
(`restore_training_state`), written side by side; writing it into the run folder (`save_checkpoints`: never NaN
weights over a good checkpoint) and repairing what a kill left there (`repair_run_dir`). main.py imports this file.
"""
import os

import timm
import torch
import torchvision

from checkpoint import nonfinite_tensors, read_checkpoint, save_checkpoint
from rundir import kept_checkpoint_note, write_step_log
from utils import UserError, first_line, remove_stale_temps


def training_state(run):
    """The checkpoint: the model's description, state_dict (the weights evaluation uses: the average with --ema),
    train_state_dict (the raw weights, --ema only), and all a resume needs. `epoch` counts finished epochs; a run
    stopped within an epoch also records `in_epoch` (steps done, running loss, RNG states)."""
    weights = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}
    net, scheduler, scaler = run.net, run.scheduler, run.scaler
    return {
        "model": dict(net.config), "input_size": list(net.input_size) if net.input_size else None,
        "train_hw": run.train_hw,
        "state_dict": weights(run.eval_net), "train_state_dict": weights(net) if run.ema_net is not None else None,
        "epoch": run.epoch, "step": run.step, "in_epoch": run.in_epoch, "train_seconds": run.train_seconds,
        "optimizer": run.optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "best": run.best, "args": dict(vars(run.args)), "history": run.history, "step_log": run.step_log,
        "frames": run.frames,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__),
                     "torchvision": str(torchvision.__version__)},
    }


def epochs_done(ckpt):
    """Finished epochs of a checkpoint (those written before 2026-11-25 kept them as epoch_done; their epoch was
    one more when a run stopped within an epoch)."""
    return ckpt.get("epoch_done", ckpt.get("epoch"))


def restore_training_state(run, ckpt, source):
    """The inverse of `training_state` for what `build_run` did not already take from the checkpoint."""
    try:
        own_groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.args.branch:  # the moments are the source's; --lr, --encoder_lr, --weight_decay, ... the branch's own
            for group, own in zip(run.optimizer.param_groups, own_groups):
                group.update({k: v for k, v in own.items() if k != "lr" or run.scheduler is None})
        if run.scheduler is not None and ckpt.get("scheduler") is not None:
            length = lambda sched: getattr(sched, "total_steps", getattr(sched, "T_max", None))
            planned = length(run.scheduler)
            run.scheduler.load_state_dict(ckpt["scheduler"])
            if run.args.branch and run.args.scheduler == "wsd":  # a branch lays out its own length and LRs
                run.scheduler.total_steps = planned
                run.scheduler.base_lrs = [g["initial_lr"] for g in run.optimizer.param_groups]
                for group, base, factor in zip(run.optimizer.param_groups, run.scheduler.base_lrs,
                                               run.scheduler.lr_lambdas):
                    group["lr"] = base * factor(run.scheduler.last_epoch)
            elif length(run.scheduler) != planned:
                raise UserError(f"{source}: its {run.args.scheduler} schedule was laid out over "
                                f"{length(run.scheduler)} steps, and --max_epochs {run.max_epochs} asks for {planned}; "
                                f"a resumed run keeps its length (train longer in a new run)")
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        run.epoch = epochs_done(ckpt)
        run.step, run.best, run.history = ckpt["step"], ckpt["best"], ckpt["history"]
        run.step_log = [list(r) for r in ckpt.get("step_log") or []]  # checkpoints before 2026-12 kept none
        run.in_epoch, run.train_seconds = ckpt.get("in_epoch"), float(ckpt.get("train_seconds", 0.0))
        torch.set_rng_state(ckpt["rng"]["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a damaged or hand-made checkpoint
        raise UserError(f"{source}: cannot resume from it (damaged training state: {type(e).__name__}: "
                        f"{first_line(e)})") from None


def save_checkpoints(run, env, names):
    """Write the training state under each name in the run folder (rank 0). Weights holding NaN/inf (a step with a
    finite loss but NaN gradients) never replace a good checkpoint: FloatingPointError instead."""
    bad = nonfinite_tensors(run.net.state_dict())
    if bad:
        epoch = run.epoch + (1 if run.in_epoch else 0)
        raise FloatingPointError(f"weights hold NaN/inf (e.g. {bad[0]}) after step {run.step} (epoch {epoch}); "
                                 f"stopping. {kept_checkpoint_note(run.dir)}")
    if not env.main:
        return
    write_step_log(run.dir, run.step_log)
    state = training_state(run)
    for name in names:
        path = os.path.join(run.dir, name)
        try:
            save_checkpoint(path, state)
        except OSError as e:
            raise UserError(f"{path}: could not write checkpoint ({e.strerror or e}); "
                            "the previous file is intact") from None


def repair_run_dir(run, env):
    """Clear temp files a kill left (rank 0). A kill can also fall between writing last.pth and best.pth of one
    epoch: then best.pth is written again from the resumed state."""
    if not env.main:
        return
    remove_stale_temps(run.dir)
    write_step_log(run.dir, run.step_log)  # a kill after the log's write, before last.pth's, would leave it steps ahead
    if not run.in_epoch and run.best["epoch"] == run.epoch:  # only a resumed run has a best epoch here
        try:
            best = read_checkpoint(os.path.join(run.dir, "best.pth"), "--resume")
            stale = epochs_done(best) != run.epoch
        except UserError:
            stale = True
        if stale:
            save_checkpoints(run, env, ["best.pth"])
            env.log(f"rewrote best.pth (epoch {run.epoch}): a crash had cut its write short")
