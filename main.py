"""Train a monocular depth model. Hyperparameters are right below; every one is also a flag.

    python main.py                                   # effnet_unet, pretrained; synthetic scenes if no dataset
    python main.py --data_dir DepthEstimationUnreal  # the real data
    python main.py --recipe convnext_report          # a report's whole configuration (flags override it)
    python main.py --resume runs/effnet_unet/last.pth
    torchrun --nproc_per_node 2 main.py ...          # several GPUs (or CPU processes on gloo)

Every --evaluate_every epochs: RMSE/SSIM on train and val, a row in metrics.csv, curves.png,
figures of fixed val images, last.pth and (on a new best val RMSE) best.pth in the run folder.
"""
import argparse
import copy
import csv
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dataset as ds_lib
import model as model_lib
from losses import build_loss
from utils import (TEMP_NAME, UserError, atomic_write, evaluate_batches, export_checkpoint, fast_path, load_checkpoint, model_from_checkpoint,
                   pick_device, plot_curves, remove_stale_temps, save_checkpoint, seed_everything, summarize, visualize_img,
                   autocast, predict_depth)

# ------------------------------------------------------------------------------------------------
# hyperparameters (defaults of the flags below)
DATA_DIR = "./DepthEstimationUnreal"
MODEL = "effnet_unet"          # python main.py --list-models
HEAD = "clip"                  # unbounded output, clamped to [0, 20] at inference; or "sigmoid"
LOSS = "mse+0.15*ssim+0.05*edge"
OPTIMIZER = "adamw"
LR = 1e-3                      # decoder (and every parameter when --encoder_lr is not set)
ENCODER_LR = 1e-4              # pretrained encoder (3e-4 drifted further from ImageNet and did worse on val)
WEIGHT_DECAY = 1e-4
SCHEDULER = "onecycle"         # per step; or cyclic (triangular2), cosine, none
EMA = 0.998                    # weight averaging per step (0: off); evaluation, figures and best.pth use the average
BATCH_SIZE = 16
MAX_EPOCHS = 6                 # (4 on the synthetic quick start); val RMSE rose after ~4 epochs on the real data
TIME_BUDGET = None             # minutes of training (evaluation excluded); the LR schedule then follows the clock
EVALUATE_EVERY = 2             # epochs
VISUALIZE_EVERY = 500          # steps
AUGMENT = "flip+jitter"        # none, flip, jitter, flip+jitter
TRAIN_EVAL_FRAMES = 500        # train-split metrics on this many evenly spaced frames (0 = all)
KEEP = 2                       # epoch checkpoints kept besides best.pth and last.pth
FOLDS = 0                      # block cross-validation over train+val in frame order (0: train on train, score on val)
GUARD = 50                     # frames dropped from training on each side of a held-out block (near duplicates)
SEED = 0

RECIPES = {  # the two reports' configurations, as the reports give them
    "convnext_report": dict(model="convnext_unet", encoder="convnext_base", loss="mse+0.15*ssim+0.05*edge",
                            optimizer="adamw", encoder_lr=1e-4, lr=1e-3, weight_decay=1e-2, scheduler="onecycle",
                            batch_size=64, max_epochs=80, augment="none"),
    "resnet34_report": dict(model="resnet34", loss="rmse+ssim", optimizer="adam", lr=1e-3, encoder_lr=None,
                            weight_decay=1e-5, scheduler="cyclic", batch_size=32, max_epochs=100, augment="none"),
}
SYNTHETIC = dict(n_train=192, n_val=48, max_epochs=4)  # the no-dataset quick start
RESUME_KEYS = ("args", "model", "state_dict", "optimizer", "epoch_done", "step", "best", "history", "rng")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data_dir", default=None, help=f"dataset root (default {DATA_DIR}; synthetic scenes when that is missing)")
    a("--model", default=MODEL)
    a("--encoder", default=None, help="timm encoder name for the U-Net models")
    a("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="ImageNet encoder weights (--no-pretrained: from scratch)")
    a("--encoder-weights", "--encoder_weights", dest="encoder_weights", default=None, help="local encoder state dict")
    a("--head", default=HEAD, choices=["clip", "sigmoid"])
    a("--loss", default=LOSS)
    a("--optimizer", default=OPTIMIZER, choices=["adam", "adamw"])
    a("--lr", type=float, default=LR)
    a("--encoder_lr", type=float, default=ENCODER_LR, help="encoder learning rate (None: same as --lr)")
    a("--weight_decay", type=float, default=WEIGHT_DECAY)
    a("--scheduler", default=SCHEDULER, choices=["onecycle", "cyclic", "cosine", "none"])
    a("--batch_size", type=int, default=BATCH_SIZE)
    a("--max_epochs", type=int, default=None, help=f"default {MAX_EPOCHS} ({SYNTHETIC['max_epochs']} on synthetic scenes; "
                                                   f"no limit with --time_budget)")
    a("--time_budget", type=float, default=TIME_BUDGET, help="stop after this many minutes of training (for equal-time "
                                                              "comparisons); onecycle/cosine then run on the clock, not the step count")
    a("--ema", type=float, default=EMA, help="decay of the per-step weight average (0: off)")
    a("--evaluate_every", type=int, default=EVALUATE_EVERY)
    a("--visualize_every", type=int, default=VISUALIZE_EVERY)
    a("--augment", default=AUGMENT, help=f"'none' or '+'-joined: {', '.join(ds_lib.AUGMENTS)} (dataset.py)")
    a("--freeze", default="none", choices=["none", "stem", "encoder"], help="encoder parts kept frozen")
    a("--train_eval_frames", type=int, default=TRAIN_EVAL_FRAMES)
    a("--ckpt_dir", default="runs")
    a("--ckpt_name", default=None, help="run folder name (default: the model name, never an existing run)")
    a("--keep", type=int, default=KEEP)
    a("--seed", type=int, default=SEED)
    a("--resume", default=None, help="last.pth (or any checkpoint) of a run to continue exactly")
    a("--stop_after_epochs", type=int, default=None, help="stop cleanly after this epoch (continue with --resume)")
    a("--workers", type=int, default=0, help="DataLoader workers when the data is not cached")
    a("--cache", default="auto", choices=["auto", "on", "off"], help="decode every frame once into RAM")
    a("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    a("--channels_last", default="auto", choices=["auto", "on", "off"])
    a("--compile", action="store_true")
    a("--device", default=None)
    a("--recipe", default=None, choices=sorted(RECIPES))
    a("--folds", type=int, default=FOLDS, help="block cross-validation: train+val frames in order, cut into this many "
                                               "contiguous blocks; runs every fold and writes cv.csv / cv.md (0: off)")
    a("--fold", type=int, default=None, help="with --folds: run only this fold (1..folds), holding out block FOLD")
    a("--guard", type=int, default=GUARD, help="with --folds: frames dropped from training on each side of the held-out block")
    a("--list-models", "--list_models", dest="list_models", action="store_true")
    a("--export", nargs=2, metavar=("CKPT", "OUT"), default=None,
      help="write a shippable copy of a checkpoint (evaluated weights and the run's record, no optimizer state) and exit")
    a("--export_tta", default="none", choices=["none", "flip"], help="with --export: evaluate.py's default --tta for it")
    a("--export_fp16", action="store_true", help="with --export: weights in fp16 (half the size; check the metrics)")
    return p


def parse_args(argv):
    parser = get_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.list_models or pre.export:
        return pre
    if pre.resume:  # a resumed run continues with the arguments it was started with
        ckpt = load_checkpoint(pre.resume)
        saved, missing = ckpt.get("args"), [k for k in RESUME_KEYS if k not in ckpt]
        if not isinstance(saved, dict) or missing:
            raise UserError(f"{pre.resume}: not a main.py training checkpoint (no {', '.join(missing) or 'args'} recorded); "
                            f"it cannot be resumed")
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "stop_after_epochs", "list_models")})
    elif pre.recipe:
        parser.set_defaults(**RECIPES[pre.recipe])
    args = parser.parse_args(argv)
    if pre.recipe and not pre.resume:
        explicit = {k for k in RECIPES[pre.recipe] if getattr(args, k) != RECIPES[pre.recipe][k]}
        print(f"recipe {pre.recipe}: " + ", ".join(f"{k}={v}" for k, v in RECIPES[pre.recipe].items() if k not in explicit)
              + (f" (overridden by flags: {', '.join(sorted(explicit))})" if explicit else ""))
    return args


# ------------------------------------------------------------------------------------------------
# data

def resolve_data_dir(args, rank):
    """The dataset folder; the synthetic scenes (made once) when none is given and ./DepthEstimationUnreal is absent."""
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise UserError(f"--data_dir {args.data_dir}: folder not found")
        return args.data_dir, False
    if os.path.isdir(DATA_DIR):
        return DATA_DIR, False
    import synthetic
    folder = os.path.join("synthetic_cache", f"scenes-{SYNTHETIC['n_train']}-{SYNTHETIC['n_val']}-seed0")
    if rank == 0:
        print("=" * 88 + f"\nNo dataset: --data_dir not given and {DATA_DIR} does not exist.\n"
              f"Training on built-in synthetic scenes ({SYNTHETIC['n_train']} train / {SYNTHETIC['n_val']} val frames, "
              f"cached in {folder}).\nPass --data_dir PATH to train on DepthEstimationUnreal.\n" + "=" * 88)
        if not os.path.exists(os.path.join(folder, "COMPLETE")):
            synthetic.make_dataset(folder, n_train=SYNTHETIC["n_train"], n_val=SYNTHETIC["n_val"], seed=0)
            atomic_write(os.path.join(folder, "COMPLETE"), lambda f: f.write(b"ok\n"))
    if dist.is_initialized():
        dist.barrier()
    return folder, True


def load_splits(args, data_dir, main_proc):
    """(train set, val set, cached?): the train and val splits, or with --folds the fold's part of train+val."""
    splits = ["train", "val"] if args.folds else ["train"]
    n_frames = sum(len(ds_lib.find_pairs(data_dir, s)[0]) for s in splits)
    cache = args.cache == "on" or (args.cache == "auto" and fits_in_ram(n_frames))
    if not args.folds:
        train_set = ds_lib.DepthDataset(data_dir, split="train", cache=cache, progress=main_proc)
        return train_set, ds_lib.DepthDataset(data_dir, split="val", cache=cache, progress=main_proc), cache
    frames = ds_lib.DepthDataset(data_dir, split=splits, cache=cache, progress=main_proc)
    train_idx, held_idx = ds_lib.block_folds(len(frames), args.folds, args.guard)[args.fold - 1]
    return frames.subset(train_idx), frames.subset(held_idx), cache


def fits_in_ram(n_frames, hw=(144, 256)):
    need = n_frames * hw[0] * hw[1] * 7  # uint8 RGB + float32 depth (float16 where lossless)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return need < 0.4 * total


def epoch_order(n, seed, epoch, rank, world):
    """This rank's sample indices for an epoch: a permutation fixed by (seed, epoch), sharded like DistributedSampler."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / world)
    order = torch.cat([order, order[: per_rank * world - n]])
    return order[rank::world].tolist()


def batches_of(train_set, stacked, indices, batch_size, device, workers):
    """(rgb float [0,1], depth metres) batches on device, in the order of indices (last short batch dropped)."""
    steps = len(indices) // batch_size
    if stacked is not None:  # cached tensors: index them directly, no per-item work, no decoding
        rgb_all, depth_all = stacked
        for s in range(steps):
            idx = torch.tensor(indices[s * batch_size:(s + 1) * batch_size])
            rgb = rgb_all[idx].to(device, non_blocking=True).float().div_(255.0)
            yield rgb, depth_all[idx].to(device, non_blocking=True).float()
        return
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=indices, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda", persistent_workers=False)
    try:
        for rgb, depth in loader:
            yield rgb.to(device, non_blocking=True), depth.to(device, non_blocking=True)
    except UserError as e:  # from a worker process it comes wrapped in that worker's traceback: keep its last line
        raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


def eval_batches(split_set, indices, batch_size):
    for s in range(0, len(indices), batch_size):
        items = [split_set[i] for i in indices[s:s + batch_size]]
        yield torch.stack([r for r, _ in items]), torch.stack([d for _, d in items])


# ------------------------------------------------------------------------------------------------
# optimisation

def make_optimizer(args, model):
    enc, dec = model_lib.param_groups(model)
    enc_lr = args.lr if args.encoder_lr is None else args.encoder_lr
    groups = [g for g in ({"params": enc, "lr": enc_lr, "name": "encoder"}, {"params": dec, "lr": args.lr, "name": "decoder"}) if g["params"]]
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(groups, lr=args.lr, weight_decay=args.weight_decay)


def one_cycle_factor(progress, pct_start=0.3, div=25.0, final_div=1e4):
    """OneCycleLR's shape (cosine up from lr/div for pct_start, cosine down to lr/(div*final_div)) at progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    cos = lambda a, b, t: b + (a - b) * (1 + math.cos(math.pi * t)) / 2
    if progress < pct_start:
        return cos(1 / div, 1.0, progress / pct_start)
    return cos(1.0, 1 / (div * final_div), (progress - pct_start) / (1 - pct_start))


def budget_used(clock, budget_min):
    """Fraction of the time budget used: the seconds trained so far plus the step under way (clock['since'] onwards).
    Under torchrun every process must agree, so there it counts finished steps only (clock['live'] False)."""
    return (clock["seconds"] + (time.time() - clock["since"] if clock["live"] else 0.0)) / (60 * budget_min)


def make_scheduler(args, optimizer, steps_per_epoch, clock=None):
    """Per-step LR schedule. With --time_budget, onecycle and cosine follow the clock (budget_used), not the step count."""
    total = max(1, steps_per_epoch * args.max_epochs)
    lrs = [g["lr"] for g in optimizer.param_groups]
    if args.time_budget and args.scheduler in ("onecycle", "cosine"):
        shape = one_cycle_factor if args.scheduler == "onecycle" else (lambda p: (1 + math.cos(math.pi * min(p, 1.0))) / 2)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: shape(budget_used(clock, args.time_budget)))
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=total)
    if args.scheduler == "cyclic":  # the ResNet-34 report: base 1e-3, max 5e-3, up 1000, down 2000 steps
        return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=lrs, max_lr=[5 * lr for lr in lrs], step_size_up=1000,
                                                 step_size_down=2000, mode="triangular2", cycle_momentum=False)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def apply_freeze(model, what):
    if what == "none":
        return
    stem = ("conv_stem", "bn1", "conv1", "stem", "stem_0", "stem_1")
    for name, p in model.encoder.named_parameters():
        if what == "encoder" or name.split(".")[0] in stem:
            p.requires_grad_(False)


def ema_update(ema_net, net, decay, step):
    """ema <- ema + (1 - d) * (weights - ema), d = min(decay, (1 + step) / (10 + step)) (a short warm-up); buffers too."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        ema_t, raw_t = [], []
        for e, r in zip(ema_net.state_dict().values(), net.state_dict().values()):
            if e.is_floating_point():
                ema_t.append(e); raw_t.append(r)
            else:
                e.copy_(r)
        torch._foreach_lerp_(ema_t, raw_t, 1.0 - d)


def train_step(model, input_size, rgb, depth_m, loss_fn, optimizer, scheduler, scaler, amp_dtype, channels_last, augment=None):
    """One optimisation step on a batch already on the device; returns the loss (a tensor, no host sync
    beyond the finiteness check). augment: keyword options of dataset.augment_batch (generator included) or None."""
    if augment is not None:
        rgb, depth_m = ds_lib.augment_batch(rgb, depth_m, **augment)
    if input_size:
        rgb = F.interpolate(rgb, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
    if channels_last:
        rgb = rgb.contiguous(memory_format=torch.channels_last)
    with autocast(rgb.device, amp_dtype):
        pred_m = model(rgb)
    if pred_m.shape[-2:] != depth_m.shape[-2:]:
        pred_m = F.interpolate(pred_m.float(), size=depth_m.shape[-2:], mode="bilinear", align_corners=False)
    loss, _ = loss_fn(pred_m.float(), depth_m)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


# ------------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_dict(args, net, optimizer, scheduler, scaler, epoch, step, best, history, epoch_done, ema_net=None):
    """state_dict: the weights evaluation uses (the average with --ema); train_state_dict: the raw weights (--ema only)."""
    import timm
    import torchvision
    weights = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}
    return {
        "model": dict(net.config), "input_size": list(net.input_size) if net.input_size else None,
        "state_dict": weights(ema_net if ema_net is not None else net),
        "train_state_dict": weights(net) if ema_net is not None else None,
        "epoch": epoch, "step": step, "epoch_done": epoch_done,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "best": best, "args": {k: v for k, v in vars(args).items()}, "history": history,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__), "torchvision": str(torchvision.__version__)},
    }


def holds_run(folder):
    """Whether a folder holds anything but what a run killed before its first checkpoint leaves behind
    (metrics, figures, temp files); the same command started again continues in such a folder."""
    return os.path.isdir(folder) and any(f not in ("metrics.csv", "curves.png", "figures") and not TEMP_NAME.match(f)
                                         for f in os.listdir(folder))


def new_run_dir(args):
    name = args.ckpt_name or args.model
    run_dir = os.path.join(args.ckpt_dir, name)
    if holds_run(run_dir):
        if args.ckpt_name:
            raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}/last.pth or choose another --ckpt_name")
        k = 2
        while holds_run(f"{run_dir}-{k}"):
            k += 1
        run_dir = f"{run_dir}-{k}"
    return run_dir


# ------------------------------------------------------------------------------------------------

def train(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    seed_everything(args.seed)
    amp_dtype, channels_last, why = fast_path(device, args.amp, args.channels_last)
    log(f"device {device} ({why}); autocast {amp_dtype or 'off'}, channels_last {channels_last}, {world} process(es)")

    # data
    data_dir, synthetic = resolve_data_dir(args, rank)
    if args.max_epochs is None:
        args.max_epochs = 10 ** 6 if args.time_budget else SYNTHETIC["max_epochs"] if synthetic else MAX_EPOCHS
    train_set, val_set, cache = load_splits(args, data_dir, main_proc)
    if not train_set.has_depth or not val_set.has_depth:
        raise UserError(f"{data_dir}: training needs depth maps for train and val (found images only)")
    stacked = train_set.stacked() if cache else None
    if stacked is not None and device.type == "cuda":
        stacked = tuple(t.to(device) for t in stacked)  # the whole uint8 split lives on the GPU
    steps_per_epoch = len(epoch_order(len(train_set), 0, 0, rank, world)) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{data_dir}: {len(train_set)} training frames are fewer than one batch per process ({args.batch_size})")
    log(f"data {data_dir}: {len(train_set)} train / {len(val_set)} val frames"
        + (f" (fold {args.fold}/{args.folds}: held-out frames {val_set.names[0]}..{val_set.names[-1]}, guard {args.guard})"
           if args.folds else "") + f", cache {'on' if cache else 'off'}, "
        f"{steps_per_epoch} steps/epoch of batch {args.batch_size}")

    # model, optimisation
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        net = model_from_checkpoint(ckpt["model"], ckpt.get("train_state_dict") or ckpt["state_dict"], args.resume)
    else:
        net = model_lib.build_model(args.model, pretrained=args.pretrained and not args.encoder_weights, encoder=args.encoder,
                                    encoder_weights=args.encoder_weights, head=args.head)
    apply_freeze(net, args.freeze)
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    ema_net = copy.deepcopy(net).eval().requires_grad_(False) if args.ema > 0 else None
    if ema_net is not None and ckpt is not None and ckpt.get("train_state_dict"):  # checked like the raw weights
        ema_net.load_state_dict(model_from_checkpoint(ckpt["model"], ckpt["state_dict"], args.resume).state_dict())
    eval_net = ema_net if ema_net is not None else net  # what evaluation, figures and best.pth use
    clock = {"seconds": float(ckpt.get("train_seconds", 0.0)) if ckpt is not None else 0.0, "since": time.time(), "live": world == 1}
    optimizer = make_optimizer(args, net)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch, clock)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = build_loss(args.loss)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    step_fn_model = torch.compile(model) if args.compile else model
    start_epoch, step, best, history = 0, 0, {"val_rmse": float("inf"), "epoch": None}, []
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None and ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, best, history = ckpt["epoch_done"], ckpt["step"], ckpt["best"], ckpt["history"]
            torch.set_rng_state(ckpt["rng"]["torch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a damaged or hand-made checkpoint
            detail = (str(e).strip().splitlines() or ["?"])[0]
            raise UserError(f"{args.resume}: cannot resume from it (damaged training state: {type(e).__name__}: {detail})") from None
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        log(f"resumed {args.resume}: {start_epoch} epoch(s) done, step {step}")
    else:
        run_dir = new_run_dir(args) if main_proc else None
    if world > 1:
        box = [run_dir]
        dist.broadcast_object_list(box)
        run_dir = box[0]
    n_params = sum(p.numel() for p in net.parameters())
    log(f"model {args.model} ({n_params / 1e6:.2f} M parameters, head {net.config.get('head')}), loss {loss_fn.spec}, "
        f"{args.optimizer} lr {args.lr:g} (encoder {args.encoder_lr if args.encoder_lr is not None else args.lr:g}), "
        f"scheduler {args.scheduler}" + ((f" over a {args.time_budget:g}-minute budget" if args.scheduler in ("onecycle", "cosine")
                                          else f", stopping after {args.time_budget:g} minutes") if args.time_budget else "")
        + (f", EMA {args.ema:g}" if ema_net is not None else "") + f", run folder {run_dir}")

    # fixed evaluation sets: all of val (sharded over processes), evenly spaced train frames, 3 figure frames
    val_idx = list(range(len(val_set)))[rank::world]
    n_te = len(train_set) if args.train_eval_frames <= 0 else min(args.train_eval_frames, len(train_set))
    train_eval_idx = sorted({round(i * (len(train_set) - 1) / max(1, n_te - 1)) for i in range(n_te)})[rank::world]
    fig_idx = sorted({0, len(val_set) // 2, len(val_set) - 1})
    eval_bs = max(args.batch_size, 16)

    def split_metrics(split_set, idx, which=None):
        total = evaluate_batches(which or eval_net, eval_batches(split_set, idx, eval_bs), device, amp_dtype, channels_last)
        if world > 1:
            keys = sorted(total)
            t = torch.tensor([total[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            total = dict(zip(keys, t.tolist()))
        return summarize(total)

    def figures(tag):
        if not main_proc:
            return
        was = eval_net.training
        eval_net.eval()
        with torch.inference_mode():
            for i in fig_idx:
                rgb, depth = val_set[i]
                pred = predict_depth(eval_net, rgb[None].to(device), depth.shape[-2:], amp_dtype=amp_dtype, channels_last=channels_last)
                visualize_img(rgb, depth, pred[0].cpu(), os.path.join(run_dir, "figures", f"{tag}_val{val_set.names[i]}.png"),
                              title=f"{args.model} {tag}, val frame {val_set.names[i]}")
        eval_net.train(was)

    def kept():
        last = os.path.join(run_dir, "last.pth")
        return f"The last good checkpoint is kept: {last}" if os.path.exists(last) else "No checkpoint had been written yet."

    def save(path_names, epoch_done, epoch, in_epoch=None):
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a step with a finite loss but NaN/inf gradients: never let it replace a good checkpoint
            raise FloatingPointError(f"weights hold NaN/inf (e.g. {bad[0]}) after step {step} (epoch {epoch}); stopping. {kept()}")
        if not main_proc:
            return
        state = checkpoint_dict(args, net, optimizer, scheduler, scaler, epoch, step, best, history, epoch_done, ema_net)
        state["in_epoch"], state["train_seconds"] = in_epoch, clock["seconds"]
        for name in path_names:
            try:
                save_checkpoint(os.path.join(run_dir, name), state)
            except OSError as e:
                raise UserError(f"{os.path.join(run_dir, name)}: could not write checkpoint ({e.strerror or e}); "
                                f"the previous file is intact") from None

    augment = ds_lib.parse_augment(args.augment)
    stop = {"signal": None}  # Ctrl-C / SIGTERM: finish the current step, save last.pth, exit cleanly

    def request_stop(signum, _frame):
        if stop["signal"] is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name

    from tqdm import tqdm
    resume_in_epoch = ckpt.get("in_epoch") if ckpt is not None else None
    if main_proc:  # a SIGKILL can leave temp files, and can fall between writing last.pth and best.pth
        remove_stale_temps(run_dir)
        if ckpt is not None and not resume_in_epoch and best["epoch"] == start_epoch:
            try:
                stale = load_checkpoint(os.path.join(run_dir, "best.pth")).get("epoch") != start_epoch
            except UserError:
                stale = True
            if stale:
                save(["best.pth"], start_epoch, start_epoch)
                log(f"rewrote best.pth (epoch {start_epoch}): a crash had cut its write short")
    previous_handlers = {}  # put back on the way out (main.main may run inside a longer-lived process)
    if main_proc or world == 1:
        previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    model.train()
    try:
        for epoch in range(start_epoch, args.max_epochs):
            torch.manual_seed(args.seed * 1000 + epoch)  # everything random in an epoch is fixed by (seed, epoch)
            aug_gen = torch.Generator().manual_seed(args.seed * 7919 + epoch * 101 + rank)
            indices = epoch_order(len(train_set), args.seed, epoch, rank, world)
            skip, loss_sum, n_seen = 0, 0.0, 0
            if resume_in_epoch:  # continue an epoch that a Ctrl-C cut short, exactly where it stopped
                skip, loss_sum, n_seen = resume_in_epoch["steps"], resume_in_epoch["loss_sum"], resume_in_epoch["n_seen"]
                aug_gen.set_state(resume_in_epoch["aug_rng"])
                torch.set_rng_state(resume_in_epoch["torch_rng"])
                resume_in_epoch = None
            bar = tqdm(batches_of(train_set, stacked, indices[skip * args.batch_size:], args.batch_size, device, args.workers),
                       total=steps_per_epoch, initial=skip, disable=not main_proc, dynamic_ncols=True,
                       desc=f"epoch {epoch + 1}" + ("" if args.time_budget else f"/{args.max_epochs}"))
            t0, n_timed, steps_done, out_of_time = time.time(), 0, skip, False
            clock["since"] = t0
            for rgb, depth_m in bar:
                try:
                    loss = train_step(step_fn_model, net.input_size, rgb, depth_m, loss_fn, optimizer, scheduler, scaler,
                                      amp_dtype, channels_last, augment=augment and dict(augment, generator=aug_gen))
                except FloatingPointError as e:
                    raise FloatingPointError(f"{e} at step {step + 1} (epoch {epoch + 1}); stopping. {kept()}") from None
                if ema_net is not None:
                    ema_update(ema_net, net, args.ema, step)
                step, steps_done = step + 1, steps_done + 1
                now = time.time()
                clock["seconds"], clock["since"] = clock["seconds"] + now - clock["since"], now
                if world > 1 and args.time_budget:  # one clock for all processes: the slowest one's
                    t = torch.tensor([clock["seconds"]], dtype=torch.float64, device=device)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    clock["seconds"] = t.item()
                out_of_time = bool(args.time_budget) and clock["seconds"] >= 60 * args.time_budget
                loss_sum, n_seen, n_timed = loss_sum + loss.item() * rgb.shape[0], n_seen + rgb.shape[0], n_timed + rgb.shape[0]
                if main_proc and step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", img_s=f"{n_timed * world / (time.time() - t0):.1f}",
                                    lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
                if args.visualize_every and step % args.visualize_every == 0:
                    figures(f"step{step:06d}")
                if out_of_time:
                    break
                if stop["signal"] is not None and steps_done < steps_per_epoch:
                    bar.close()
                    in_epoch = {"steps": steps_done, "loss_sum": loss_sum, "n_seen": n_seen,
                                "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state()}
                    save(["last.pth"], epoch, epoch + 1, in_epoch)
                    log(f"\n{stop['signal']}: saved last.pth at step {step} (epoch {epoch + 1}, {steps_done}/{steps_per_epoch} steps); "
                        f"continue with: python main.py --resume {os.path.join(run_dir, 'last.pth')}")
                    return 130
                clock["since"] = time.time()  # figures and the stop check are not training time
            bar.close()
            train_loss = loss_sum / max(1, n_seen)
            row = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "lr": optimizer.param_groups[-1]["lr"],
                   "images_per_s": n_timed * world / max(1e-9, time.time() - t0), "train_minutes": clock["seconds"] / 60}
            history.append(row)
            if (epoch + 1) % args.evaluate_every == 0 or epoch + 1 == args.max_epochs or out_of_time:
                te = split_metrics(train_set, train_eval_idx)
                va = split_metrics(val_set, val_idx)
                row.update({"train_rmse": te["rmse"], "train_ssim": te["ssim"]}, **{f"val_{k}": v for k, v in va.items()})
                if ema_net is not None:  # the raw weights too, to show what the average adds
                    raw = split_metrics(val_set, val_idx, net)
                    row.update(val_raw_rmse=raw["rmse"], val_raw_ssim=raw["ssim"])
                is_best = va["rmse"] < best["val_rmse"]
                if is_best:
                    best = {"val_rmse": va["rmse"], "val_ssim": va["ssim"], "epoch": epoch + 1}
                log(f"epoch {epoch + 1}: train loss {train_loss:.4f} | train RMSE {te['rmse']:.3f} SSIM {te['ssim']:.3f} "
                    f"({n_te} frames) | val RMSE {va['rmse']:.3f} SSIM {va['ssim']:.3f}"
                    + (f" (raw weights {row['val_raw_rmse']:.3f} / {row['val_raw_ssim']:.3f})" if ema_net is not None else "")
                    + f" | {row['images_per_s']:.1f} img/s"
                    + (" | new best val RMSE: best.pth" if is_best else f" | best val RMSE {best['val_rmse']:.3f} (epoch {best['epoch']})"))
                if main_proc:
                    write_metrics(run_dir, history)
                    plot_curves([h for h in history if "val_rmse" in h], os.path.join(run_dir, "curves.png"))
                    figures(f"epoch{epoch + 1:03d}")
                save(["last.pth", f"epoch{epoch + 1:03d}.pth"] + (["best.pth"] if is_best else []), epoch + 1, epoch + 1)
                if main_proc:
                    prune_epoch_files(run_dir, args.keep)
            else:
                save(["last.pth"], epoch + 1, epoch + 1)
            if out_of_time:
                log(f"time budget of {args.time_budget:g} minutes used up in epoch {epoch + 1} (step {step})")
                break
            if stop["signal"] is not None or (args.stop_after_epochs is not None and args.stop_after_epochs <= epoch + 1 < args.max_epochs):
                log(f"stopped after epoch {epoch + 1}; continue with: python main.py --resume {os.path.join(run_dir, 'last.pth')}")
                return 130 if stop["signal"] else 0
    except KeyboardInterrupt:
        log("\ninterrupted twice: stopped at once; last.pth holds the last finished epoch")
        return 130
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if main_proc and args.folds:  # the fold's result is its last evaluation: nothing is selected on the held-out block
        last = history[-1]
        result = {"fold": args.fold, "folds": args.folds, "guard": args.guard, "held_out": [val_set.names[0], val_set.names[-1]],
                  "n_train": len(train_set), "n_held_out": len(val_set), "epochs": last["epoch"],
                  "train_minutes": last["train_minutes"], "rmse": last["val_rmse"], "ssim": last["val_ssim"],
                  **{k: v for k, v in last.items() if k.startswith("val_")}}
        atomic_write(os.path.join(run_dir, "result.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
        log(f"fold {args.fold}/{args.folds} done: held-out RMSE {last['val_rmse']:.4f} SSIM {last['val_ssim']:.4f} "
            f"(last evaluation) -> {run_dir}/result.json")
    if main_proc and best["epoch"] is not None:
        log(f"done: best val RMSE {best['val_rmse']:.4f} SSIM {best['val_ssim']:.4f} at epoch {best['epoch']} -> {run_dir}/best.pth")
    return 0


def write_metrics(run_dir, history, name="metrics.csv"):
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]

    def write(f):
        import io
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
        f.write(text.getvalue().encode())
    atomic_write(os.path.join(run_dir, name), write)


def prune_epoch_files(run_dir, keep):
    files = sorted(f for f in os.listdir(run_dir) if f.startswith("epoch") and f.endswith(".pth"))
    for f in files[: max(0, len(files) - keep)]:
        os.remove(os.path.join(run_dir, f))


def cross_validate(args, argv):
    """Every fold of --folds in turn (a fold with a result.json is done; one with a last.pth is resumed), then the
    table: per-fold held-out RMSE/SSIM of each fold's last evaluation, their mean and standard deviation."""
    if args.resume:
        raise UserError("--resume continues one fold (--resume RUN/foldK/last.pth); to continue a whole "
                        "cross-validation, run the same command again: finished folds are kept, a cut one resumes")
    cv_dir = os.path.join(args.ckpt_dir, args.ckpt_name or f"{args.model}_cv{args.folds}")
    results = []
    for k in range(1, args.folds + 1):
        fold_dir = os.path.join(cv_dir, f"fold{k}")
        if not os.path.exists(os.path.join(fold_dir, "result.json")):
            if os.path.exists(os.path.join(fold_dir, "last.pth")):
                print(f"fold {k}/{args.folds}: continuing {fold_dir}/last.pth")
                code = train(parse_args(["--resume", os.path.join(fold_dir, "last.pth")]))
            else:
                print(f"fold {k}/{args.folds}: training in {fold_dir}")
                code = train(parse_args(argv + ["--fold", str(k), "--ckpt_dir", cv_dir, "--ckpt_name", f"fold{k}"]))
            if code != 0 or not os.path.exists(os.path.join(fold_dir, "result.json")):
                print(f"cross-validation paused at fold {k}; run the same command again to continue")
                return code or 130
        with open(os.path.join(fold_dir, "result.json")) as f:
            results.append(json.load(f))
    table = cv_table(results)
    atomic_write(os.path.join(cv_dir, "cv.md"), lambda f: f.write(table.encode()))
    write_metrics(cv_dir, results, "cv.csv")
    print(table + f"\nwrote {cv_dir}/cv.md and cv.csv")
    return 0


def cv_table(results):
    """Markdown: one row per fold, then mean and sample standard deviation over folds."""
    mean = lambda xs: sum(xs) / len(xs)
    std = lambda xs: math.sqrt(sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    lines = ["| fold | held-out frames | train frames | epochs | train min | RMSE | SSIM |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['fold']} | {r['held_out'][0]}..{r['held_out'][1]} ({r['n_held_out']}) | {r['n_train']} | "
                     f"{r['epochs']} | {r['train_minutes']:.1f} | {r['rmse']:.3f} | {r['ssim']:.3f} |")
    rmse, ssim_ = [r["rmse"] for r in results], [r["ssim"] for r in results]
    lines.append(f"| mean ± std | | | | | {mean(rmse):.3f} ± {std(rmse):.3f} | {mean(ssim_):.3f} ± {std(ssim_):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.list_models:
            print("\n".join(model_lib.list_models()))
            return 0
        if args.export:
            out = export_checkpoint(*args.export, half=args.export_fp16, tta=None if args.export_tta == "none" else args.export_tta)
            print(f"wrote {out} ({os.path.getsize(out) / 2 ** 20:.1f} MiB, {'fp16' if args.export_fp16 else 'fp32'} weights)")
            return 0
        for flag, check in (("--loss", build_loss), ("--augment", ds_lib.parse_augment)):
            try:
                check(getattr(args, flag[2:]))  # a malformed spec fails before any data is read
            except ValueError as e:
                raise UserError(f"{flag}: {e}") from None
        if args.folds and (args.folds < 2 or args.fold is not None and not 1 <= args.fold <= args.folds):
            raise UserError(f"--folds must be 2 or more and --fold between 1 and --folds, got {args.folds} and {args.fold}")
        if args.fold is not None and not args.folds:
            raise UserError("--fold needs --folds N")
        if args.folds and args.fold is None:
            return cross_validate(args, list(sys.argv[1:] if argv is None else argv))
        return train(args)
    except (UserError, FloatingPointError, OSError) as e:  # OSError: a full disk or a folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2


if __name__ == "__main__":
    sys.exit(main())
