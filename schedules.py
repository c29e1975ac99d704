"""Learning-rate schedules, per optimisation step: onecycle, wsd (warm-up, stable, decay), cyclic (triangular2),
cosine, none (`make_scheduler`); with --time_budget, onecycle and cosine follow the clock instead (`follow_clock`).

Over steps they are torch's schedulers (wsd: a LambdaLR of `wsd_factor`), whose state_dict each checkpoint keeps, so
a resumed run continues its schedule exactly. On the clock the LR is a function of the fraction of the budget used,
which torch's schedulers (functions of a step count) cannot give: `one_cycle_factor` and `cosine_factor` are the same
shapes over a continuous fraction (tests/test_main.py compares the first with torch's OneCycleLR).
"""
import functools
import math

import torch

ONE_CYCLE = dict(pct_start=0.3, div_factor=25.0, final_div_factor=1e4)  # torch's OneCycleLR defaults, written out
CYCLIC = dict(max_factor=5, up_steps=1000, down_steps=2000)  # the ResNet-34 report: lr up to 5x, 1000 up, 2000 down
WSD = dict(warmup_epochs=1.0, start_factor=1 / 25, decay_fraction=0.2)  # linear warm-up from lr/25; 1-sqrt decay to 0


def make_scheduler(args, optimizer, total_steps, steps_per_epoch=1):
    """Per-step LR schedule over total_steps (None for none, and for onecycle/cosine with --time_budget: those follow
    the clock instead, see `follow_clock`)."""
    total = max(1, total_steps)
    lrs = [g["lr"] for g in optimizer.param_groups]
    if on_clock(args):
        return None
    if args.scheduler == "wsd":
        decay_start = total - round(decay_epochs(args, total / steps_per_epoch) * steps_per_epoch)
        shape = functools.partial(wsd_factor, warmup_steps=max(1, round(WSD["warmup_epochs"] * steps_per_epoch)),
                                  decay_start=decay_start, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
        scheduler.total_steps = total  # kept in its state_dict: a resumed run checks its length like onecycle's
        return scheduler
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=total, **ONE_CYCLE)
    if args.scheduler == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=lrs,
                                                 max_lr=[CYCLIC["max_factor"] * lr for lr in lrs],
                                                 step_size_up=CYCLIC["up_steps"], step_size_down=CYCLIC["down_steps"],
                                                 mode="triangular2", cycle_momentum=False)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def wsd_factor(step, warmup_steps, decay_start, total_steps):
    """Warmup-stable-decay: linear from WSD's start_factor to 1 over warmup_steps, 1 until decay_start, then 1-sqrt
    down to 0 at total_steps (Hägele et al. 2024, "Scaling laws and compute-optimal training beyond fixed training
    durations"). Up to decay_start it does not depend on the length, so one constant run serves every length."""
    if step < warmup_steps:
        return WSD["start_factor"] + (1 - WSD["start_factor"]) * step / warmup_steps
    if step < decay_start:
        return 1.0
    return max(0.0, 1.0 - math.sqrt((step - decay_start) / max(1, total_steps - decay_start)))


def decay_epochs(args, max_epochs):
    """wsd: epochs of the final decay (--decay_epochs, default WSD's decay_fraction of the run)."""
    return WSD["decay_fraction"] * max_epochs if args.decay_epochs is None else args.decay_epochs


def decay_from(args, max_epochs):
    """wsd: the epoch its decay starts at."""
    return max_epochs - decay_epochs(args, max_epochs)


def on_clock(args):
    """With --time_budget, onecycle and cosine run on the clock (`follow_clock`), not over steps."""
    return bool(args.time_budget) and args.scheduler in ("onecycle", "cosine")


def follow_clock(run):
    """With --time_budget, onecycle and cosine run on the clock: each group's LR is its base LR times the schedule's
    factor at the fraction of the budget trained so far, so the schedule ends exactly when the budget does."""
    if not on_clock(run.args):
        return
    shape = one_cycle_factor if run.args.scheduler == "onecycle" else cosine_factor
    factor = shape(run.train_seconds / (60 * run.args.time_budget))
    for group, base_lr in zip(run.optimizer.param_groups, run.base_lrs):
        group["lr"] = base_lr * factor


def one_cycle_factor(progress):
    """OneCycleLR's shape (cosine up from lr/div for pct_start, cosine down to lr/(div*final_div)) at progress
    in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    pct, div, final_div = ONE_CYCLE["pct_start"], ONE_CYCLE["div_factor"], ONE_CYCLE["final_div_factor"]
    cos = lambda a, b, t: b + (a - b) * (1 + math.cos(math.pi * t)) / 2
    if progress < pct:
        return cos(1 / div, 1.0, progress / pct)
    return cos(1.0, 1 / (div * final_div), (progress - pct) / (1 - pct))


def cosine_factor(progress):
    """CosineAnnealingLR's shape (to 0) at progress in [0, 1]."""
    return (1 + math.cos(math.pi * min(progress, 1.0))) / 2
