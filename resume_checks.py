"""What a run continued from a checkpoint (--resume, --branch) or started from one (--init) may change, checked before
it runs: each check names, in one line, every flag or frame that differs from what the checkpoint was made with.
"""
import os
from types import SimpleNamespace

from schedules import decay_from
from utils import UserError

# flags a resumed run may change: where and how fast it runs, how often it reports; every other flag is the run's own
SESSION_FLAGS = ("device", "workers", "cache", "amp", "channels_last", "compile", "max_epochs", "stop_after_epochs",
                 "evaluate_every", "visualize_every", "train_eval_frames", "keep", "allow_unusual_depth", "data_dir",
                 "ckpt_dir", "ckpt_name")
# flags that name this invocation, not the run: never taken from a checkpoint, never compared with it
NOT_KEPT = ("resume", "branch", "stop_after_epochs", "list_models")


def changed_flags(args, saved):
    """{flag: (the checkpoint's value, this invocation's)} for every flag, but NOT_KEPT, that differs."""
    return {k: (saved[k], v) for k, v in vars(args).items() if k in saved and saved[k] != v and k not in NOT_KEPT}


def check_resume_flags(args, saved, source):
    """A resumed run keeps its settings: UserError naming every flag given another value than the run was made with,
    except SESSION_FLAGS (machine, reporting, --data_dir: its frames are compared later), which are said in a line."""
    changed = changed_flags(args, saved)
    refused = [f"--{k} ({a} -> {b})" for k, (a, b) in changed.items() if k not in SESSION_FLAGS]
    if refused:
        raise UserError(f"--resume {source}: a resumed run keeps the settings it was made with; it cannot change "
                        f"{', '.join(refused)} (start a new run for other settings)")
    kept = [f"--{k} {b}" for k, (a, b) in changed.items() if k not in ("ckpt_dir", "ckpt_name")]
    if kept:
        print(f"resume {source}: this session uses {', '.join(kept)}; every other setting is the run's own")


def check_branch(args, ckpt, done, source):
    """A branch trains on from its checkpoint to a longer --max_epochs; with wsd its decay starts at or after the
    checkpoint, where the source run was still constant, so it equals a run of that length trained from scratch.
    Its folder defaults to the source's name + _e<max_epochs>, beside the source folder. done: the checkpoint's
    finished epochs."""
    kept = ("model", "encoder", "head", "drop_path", "input_scale", "decoder_channels", "folds", "fold", "guard",
            "train_splits", "batch_size", "seed")
    fixed = [k for k in kept if getattr(args, k) != ckpt["args"].get(k, getattr(args, k))]
    if fixed:
        raise UserError(f"--branch {source}: a branch keeps the run's model, data and batches; it cannot "
                        f"change {', '.join('--' + k for k in fixed)}")
    if args.max_epochs is None or args.max_epochs <= done:
        raise UserError(f"--branch {source}: it has {done} epoch(s) done; give a longer --max_epochs")
    if args.scheduler == "wsd":
        saved = SimpleNamespace(**ckpt["args"])
        own_start = decay_from(saved, saved.max_epochs) if saved.scheduler == "wsd" else -1
        start = decay_from(args, args.max_epochs)
        if own_start < done or start < done:
            raise UserError(f"--branch {source}: a wsd branch starts from a checkpoint in the constant phase and "
                            f"decays after it (decay from epoch {start:g}, checkpoint at epoch {done}, its own run "
                            + (f"decayed from epoch {own_start:g})" if saved.scheduler == "wsd" else
                               f"used --scheduler {saved.scheduler})"))
    if not args.ckpt_name:
        args.ckpt_name = f"{os.path.basename(os.path.dirname(os.path.abspath(source)))}_e{args.max_epochs}"
    changed = [f"--{k} {b} (the run's: {a})" for k, (a, b) in changed_flags(args, ckpt["args"]).items()
               if k not in SESSION_FLAGS + ("max_epochs", "decay_epochs")]
    if changed:
        print(f"branch {source}: it trains on with {', '.join(changed)}; the optimizer's moments are the run's")


def init_model_flags(ckpt):
    """The model flags a checkpoint's model answers to (--init takes them as defaults)."""
    held = ckpt["model"]
    return {"model": held.get("name"), "encoder": held.get("encoder"), "head": held.get("head"),
            "input_scale": held.get("input_scale", 1.0), "decoder_channels": held.get("decoder_channels")}


def check_init_flags(args, init):
    """--init: one line naming each model flag that asks for another model than the checkpoint holds."""
    text = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    differ = [f"--{k} {text(getattr(args, k))} (it holds {text(held)})" for k, held in init_model_flags(init).items()
              if getattr(args, k) is not None and getattr(args, k) != held]
    if differ:
        raise UserError(f"--init {args.init}: another model than the flags ask for: {'; '.join(differ)} "
                        f"(leave those flags out to take the checkpoint's)")


def frame_record(data):
    """The frames a run trains and is scored on (names per split, in order), kept in its checkpoints."""
    return {"dir": os.path.abspath(data.dir), "train": list(data.train.names), "val": list(data.val.names)}


def check_resumed_data(ckpt, data, source, log):
    """UserError when the data a resumed run finds is not the frames it was trained on (frames lost, added or renamed:
    the epochs would change); a moved data folder with the same frames is fine. Checkpoints from before the record
    are not checked."""
    was, now = ckpt.get("frames"), frame_record(data)
    if not isinstance(was, dict):
        return
    diffs = []
    for split in ("train", "val"):
        old, new = list(was.get(split) or []), now[split]
        if old != new:
            gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            diffs.append(f"{split} {len(old)} -> {len(new)} frames" + (f", {len(gone)} gone (e.g. {gone[0]})" if gone
                         else "") + (f", {len(added)} new (e.g. {added[0]})" if added else "")
                         + ("" if gone or added else ", in another order"))
    if diffs:
        raise UserError(f"--resume {source}: the run was made on other frames ({was.get('dir')}); {data.dir} now has: "
                        f"{'; '.join(diffs)}; resuming would change the run (restore the frames or start a new run)")
    if was.get("dir") != now["dir"]:
        log(f"resume {source}: data now read from {data.dir} (the run's own frames, from a moved folder)")
