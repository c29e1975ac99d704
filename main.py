"""Train a monocular depth model. Hyperparameters are right below; every one is also a flag.

    python main.py                                   # effnet_unet, pretrained; synthetic scenes if no dataset
    python main.py --data_dir DepthEstimationUnreal  # the real data
    python main.py --data_dir DepthEstimationUnreal --folds 3      # block cross-validation: one table
    python main.py --recipe convnext_report          # a report's whole configuration (flags override it)
    python main.py --resume runs/effnet_unet/last.pth
    torchrun --nproc_per_node 2 main.py ...          # several GPUs (or CPU processes on gloo)

Every --evaluate_every epochs: RMSE/SSIM on train and val, a row in metrics.csv, curves.png (with the loss per
step of loss_steps.csv), figures of fixed val frames and a train frame, last.pth and (on a new best val RMSE) best.pth
in the run folder.

The run, top to bottom: `train` sets up the process (`setup`), reads the data (`load_data`), builds the run
from the arguments or a checkpoint (`build_run`), then loops over epochs: `train_one_epoch`, `evaluate_and_save`.
Beside this script: recipes.py (--recipe), schedules.py (the LR schedules), crossval.py (--folds), resume_checks.py
(what --resume, --branch and --init may change), runstate.py (the training state a checkpoint holds, written and
restored side by side), rundir.py (the run folder), dataset.py (frames and batches).
"""
import argparse
import copy
import functools
import os
import re
import shlex
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import crossval
import dataset as ds_lib
import synthetic
from checkpoint import checkpoint_train_hw, model_from_checkpoint, read_checkpoint
from dataset import batches_of, epoch_order, fits_in_ram, seed_epoch
from evaluate import evaluate_batches, frame_batches
from export import export_model
from losses import build_loss
from model import (ENSEMBLE, HEADS, INPUT_SCALES, build_model, compile_or_eager, depthwise_fp32_in_training, fit_input,
                   freeze_encoder, list_models, param_groups, predict_depth, summary_text)
from recipes import RECIPES, recipe_note, set_recipe_defaults
from resume_checks import (NOT_KEPT, check_branch, check_init_flags, check_resume_flags, check_resumed_data,
                           frame_record, init_model_flags)
from rundir import claim_run_dir, kept_checkpoint_note, prune_epoch_files, write_csv
from runstate import epochs_done, repair_run_dir, restore_training_state, save_checkpoints
from schedules import WSD, decay_from, follow_clock, make_scheduler, on_clock
from utils import (UserError, atomic_write, autocast, flag_range, non_negative_float, non_negative_int, pick_device,
                   plot_curves, positive_float, positive_int, positive_ints, precision_and_layout, seed_everything,
                   summarize, unlock, visualize_img, with_cli_conventions)

# ------------------------------------------------------------------------------------------------
# hyperparameters (defaults of the flags below)
DATA_DIR = "./DepthEstimationUnreal"
MODEL = "effnet_unet"          # python main.py --list-models
ENCODER = None                 # timm encoder name; None: the model's own default
PRETRAINED = True              # ImageNet encoder weights (effnet_unet's ship offline in a pip package)
DROP_PATH = 0.0                # stochastic depth rate of the encoder's residual blocks (U-Net models; 0: off)
DECODER_CHANNELS = None        # U-Net decoder widths, deep to shallow (None: the model's; effnet_unet 96,64,32,24,16)
INPUT_SCALE = 1.0              # U-Net models work on the frame resized by this (1.5: 216x384); depth back at 144x256
HEAD = "clip"                  # unbounded output, clamped to [0, 20] at inference; or sigmoid, linear
LOSS = "mse+0.15*ssim+0.05*edge"
OPTIMIZER = "adamw"
LR = 1e-3                      # decoder (and every parameter when --encoder_lr is not set)
ENCODER_LR = 1e-4              # pretrained encoder (3e-4 drifted further from ImageNet and did worse on val)
WEIGHT_DECAY = 1e-4
SCHEDULER = "onecycle"         # per step; or wsd (warm-up, stable, decay), cyclic (triangular2), cosine, none
DECAY_EPOCHS = None            # wsd: epochs of the final decay (default 20% of the run; 0: constant, to --branch from)
EMA = 0.998                    # weight averaging per step (0: off); evaluation, figures and best.pth use the average
BATCH_SIZE = 16
MAX_EPOCHS = 6                 # (4 on the synthetic quick start); val RMSE rose after ~4 epochs on the real data
TIME_BUDGET = None             # minutes of training (evaluation excluded); the LR schedule then follows the clock
EVALUATE_EVERY = 2             # epochs
VISUALIZE_EVERY = 500          # steps
AUGMENT = "flip+jitter"        # 'none' or any of dataset.AUGMENTS joined by '+' (flip, jitter, geo, photo, cutout)
FREEZE = "none"                # none, stem, stageK (up to encoder stage K: --summary), encoder: no gradient, BN in eval
TRAIN_EVAL_FRAMES = 500        # train-split metrics on this many evenly spaced frames (0 = all)
KEEP = 2                       # epoch checkpoints kept besides best.pth and last.pth
SEED = 0
FOLDS = 0                      # block cross-validation over train+val in frame order (0: train on train, score on val)
GUARD = 50                     # frames dropped from training on each side of a held-out block (near duplicates)
TRAIN_SPLITS = "train"         # splits trained on, joined by '+', in frame order (train+val: ship a --folds recipe)

# run and machine settings
CKPT_DIR = "runs"
WORKERS = 0                    # DataLoader workers when the data is not cached
CACHE = "auto"                 # auto: decode a split into RAM once when it needs < CACHE_RAM_FRACTION of the memory
CACHE_RAM_FRACTION = 0.4
AMP = "auto"                   # auto: bf16 on GPUs and on CPUs with bf16 instructions (utils.precision_and_layout)
CHANNELS_LAST = "auto"
EVAL_BATCH_SIZE = 16           # evaluation batches hold at least this many frames (metrics do not depend on it)
SYNTHETIC = dict(n_train=192, n_val=48, max_epochs=4)  # the no-dataset quick start


def get_parser():
    """The flags, in the groups --help shows them: data, model, training, run folder, machine, other commands."""
    p = with_cli_conventions(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    for add_flags in (data_flags, model_flags, training_flags, run_flags, machine_flags, command_flags):
        add_flags(p.add_argument_group(add_flags.__doc__).add_argument)
    return p


def data_flags(a):
    """data"""
    a("--data_dir", default=None, help=f"dataset root (default {DATA_DIR}; synthetic scenes when that is missing)")
    a("--train_splits", default=TRAIN_SPLITS, help="splits to train on, joined by '+' (e.g. train+val to ship a "
                                                   "recipe chosen by --folds; val metrics then score training frames)")
    a("--folds", type=non_negative_int, default=FOLDS,
      help="block cross-validation: train+val frames in order, cut into this many contiguous blocks; runs every "
           "fold and writes cv.csv / cv.md (0: off)")
    a("--fold", type=positive_int, default=None,
      help="with --folds: run only this fold (1..folds), holding out block FOLD")
    a("--guard", type=non_negative_int, default=GUARD,
      help="with --folds: frames dropped from training on each side of the held-out block")
    a("--augment", default=AUGMENT, help=f"'none' or '+'-joined: {', '.join(ds_lib.AUGMENTS)} (dataset.py)")
    a("--allow_unusual_depth", action="store_true",
      help="train on depth maps whose median is beyond 100 (not metres: millimetres?), clipped to [0, 20] anyway")
    a("--cache", default=CACHE, choices=["auto", "on", "off"], help="decode every frame once into RAM")
    a("--workers", type=non_negative_int, default=WORKERS, help="DataLoader workers when the data is not cached")


def model_flags(a):
    """model"""
    a("--model", default=MODEL, help="model variant (--list-models)")
    a("--encoder", default=ENCODER, help="timm encoder name for the U-Net models (default: the model's own)")
    a("--pretrained", action=argparse.BooleanOptionalAction, default=PRETRAINED,
      help="ImageNet encoder weights (--no-pretrained: from scratch)")
    a("--encoder-weights", "--encoder_weights", dest="encoder_weights", default=None, help="local encoder state dict")
    a("--drop_path", type=flag_range(float, 0, 1, below=True), default=DROP_PATH,
      help="stochastic depth rate in the encoder (U-Net models; a regulariser)")
    a("--decoder_channels", type=positive_ints, default=DECODER_CHANNELS, metavar="C1,C2,...",
      help="U-Net models: decoder widths, deep to shallow, one per stage (default: the model's; --summary shows them)")
    a("--input_scale", type=flag_range(float, *INPUT_SCALES), default=INPUT_SCALE,
      help="U-Net models: encoder and decoder work on the input resized by this factor (1.5: 216x384 for 144x256 "
           "frames); the depth is resized back to the input's size (about the factor squared in FLOPs)")
    a("--head", default=HEAD, choices=HEADS, help="output layer (model.py); the loss is clip-aware with clip only")
    a("--freeze", default=FREEZE, type=freeze_choice,
      help="encoder parts kept frozen: none, stem, stageK (the encoder up to and including stage K, as --summary "
           "lists them) or encoder")
    a("--init", default=None, metavar="CKPT",
      help="start a new run from a checkpoint's weights (fine-tuning): fresh optimizer, schedule and run folder; "
           "the model flags default to the checkpoint's")


def training_flags(a):
    """training"""
    a("--recipe", default=None, choices=sorted(RECIPES), help="a report's configuration")
    a("--loss", default=LOSS, help="loss spec: WEIGHT*TERM joined by '+' (losses.py)")
    a("--optimizer", default=OPTIMIZER, choices=["adam", "adamw"], help="optimizer")
    a("--lr", type=positive_float, default=LR, help="decoder learning rate (peak, for onecycle)")
    a("--encoder_lr", type=non_negative_float, default=ENCODER_LR,
      help="encoder learning rate (resnet34_report trains the whole model at --lr)")
    a("--weight_decay", type=non_negative_float, default=WEIGHT_DECAY, help="weight decay")
    a("--scheduler", default=SCHEDULER, choices=["onecycle", "wsd", "cyclic", "cosine", "none"],
      help="per-step LR schedule")
    a("--decay_epochs", type=non_negative_float, default=DECAY_EPOCHS,
      help=f"wsd: epochs of the final 1-sqrt decay to 0 (default {100 * WSD['decay_fraction']:g}%% of --max_epochs; "
           f"0: no decay, a constant run whose epoch checkpoints --branch continues)")
    a("--batch_size", type=positive_int, default=BATCH_SIZE, help="training batch (per process)")
    a("--max_epochs", type=positive_int, default=None,
      help=f"default {MAX_EPOCHS} ({SYNTHETIC['max_epochs']} on synthetic scenes; no limit with --time_budget)")
    a("--time_budget", type=positive_float, default=TIME_BUDGET,
      help="stop after this many minutes of training (for equal-time comparisons); onecycle/cosine then run on "
           "the clock")
    a("--ema", type=flag_range(float, 0, 1, below=True), default=EMA,
      help="decay of the per-step weight average (0: off)")
    a("--seed", type=non_negative_int, default=SEED, help="seed of everything random")


def run_flags(a):
    """run folder"""
    a("--ckpt_dir", default=CKPT_DIR, help="folder of run folders")
    a("--ckpt_name", default=None, help="run folder name (default: the model name, never an existing run)")
    a("--keep", type=non_negative_int, default=KEEP, help="epoch checkpoints kept besides best.pth and last.pth")
    a("--evaluate_every", type=positive_int, default=EVALUATE_EVERY, help="epochs between evaluations")
    a("--visualize_every", type=non_negative_int, default=VISUALIZE_EVERY,
      help="steps between val figures (0: at evaluations only)")
    a("--train_eval_frames", type=non_negative_int, default=TRAIN_EVAL_FRAMES,
      help="train metrics on this many frames (0: all)")
    a("--resume", default=None, help="last.pth (or any checkpoint) of a run to continue exactly")
    a("--branch", default=None,
      help="a training checkpoint to continue in a NEW run folder with changed flags, e.g. a wsd decay from a constant "
           "run's epoch checkpoint: --branch RUN/epoch016.pth --max_epochs 20 --decay_epochs 4 (exactly the run "
           "that --max_epochs 20 --decay_epochs 4 trains from scratch); training flags such as --augment, --loss, "
           "--lr, --weight_decay may change from there on, the model, data and batches may not")
    a("--stop_after_epochs", type=positive_int, default=None,
      help="stop cleanly after this epoch (continue with --resume)")


def machine_flags(a):
    """machine"""
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is a GPU)")
    a("--amp", default=AMP, choices=["auto", "none", "bf16", "fp16"], help="autocast dtype")
    a("--channels_last", default=CHANNELS_LAST, choices=["auto", "on", "off"], help="memory format")
    a("--compile", action="store_true", help="torch.compile the training model (falls back to eager if it "
                                             "cannot; on the CPUs measured it made training slower: docs/speed.md)")


def command_flags(a):
    """other commands (each exits when done)"""
    a("--list-models", "--list_models", dest="list_models", action="store_true", help="list the models and exit")
    a("--summary", nargs="?", const="", default=None, metavar="HxW",
      help="print the model's encoder stages and decoder layers (output shape, parameters) and its FLOPs per image "
           "at HxW (default: its fixed input size, else 144x256), and exit")
    a("--export", nargs=2, metavar=("CKPT", "OUT"), default=None,
      help="write a shippable copy of a checkpoint and exit; OUT's suffix picks the format: .pth a slim checkpoint "
      "(evaluated weights and the run's record, no optimizer state), .pt TorchScript, .onnx ONNX (graphs of "
      "RGB [B,3,H,W] in [0,1] -> metres [B,1,H,W]; ONNX needs pip install onnx onnxruntime)")
    a("--export_tta", default=None, choices=["none", "flip"],
      help="with --export: .pth: evaluate.py's default --tta for it (default none); .pt/.onnx: baked into the graph "
      "(default: the checkpoint's own)")
    a("--export_fp16", action="store_true",
      help="with --export to .pth: weights in fp16 (half the size; check the metrics)")
    a("--ensemble", nargs="+", metavar="CKPT", default=None,
      help="with --export to .pth: the file holds one model that averages the predictions of --export's CKPT and "
           "these checkpoints' (each a main.py checkpoint of the same frame size; with --export_fp16, 2 Lite2 models "
           "fit in 20 MB)")
    a("--member", type=positive_int, default=None, metavar="K",
      help="with --export ENSEMBLE.pth OUT.pth: OUT is the ensemble's K-th member alone (1 = --export's CKPT when "
           "it was made), a one-model checkpoint for --init or for one forward pass instead of N")


def freeze_choice(text):
    if text not in ("none", "stem", "encoder") and not re.fullmatch(r"stage\d+", text):
        raise argparse.ArgumentTypeError(f"must be none, stem, stageK (K a number: --summary lists the stages) or "
                                         f"encoder, got {text!r}")
    return text


def parse_args(argv):
    """(args, the checkpoint a run continues (--resume, --branch) or starts from (--init), or None). A resumed run
    continues with the arguments it was started with."""
    parser = get_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.list_models or pre.export or pre.summary is not None:
        return pre, None
    ckpt = None
    if pre.resume and pre.branch:
        raise UserError("--resume continues a run in its folder, --branch continues one in a new folder: pick one")
    source = pre.resume or pre.branch
    if source:
        ckpt = read_checkpoint(source, "--resume" if pre.resume else "--branch")
        not_kept = NOT_KEPT + (("ckpt_name",) if pre.branch else ())
        parser.set_defaults(**{k: v for k, v in ckpt["args"].items() if k not in not_kept})
    elif pre.recipe:
        set_recipe_defaults(parser, pre.recipe)
    if pre.init and source:
        raise UserError("--init starts a new run from a checkpoint's weights; --resume and --branch continue a run "
                        "with its optimizer and schedule: pick one")
    init = read_checkpoint(pre.init, "--init") if pre.init else None
    if init is not None and init["model"].get("name") == ENSEMBLE:
        raise UserError(f"--init {pre.init}: an ensemble of {len(init['model'].get('members') or [])} models; a run "
                        f"starts from one: take it out with main.py --export {pre.init} MEMBER.pth --member K")
    if init is not None:  # the model it holds, unless a flag asks for another (one line naming what differs)
        parser.set_defaults(**init_model_flags(init))
    args = parser.parse_args(argv)
    if init is not None:
        check_init_flags(args, init)
    if pre.branch:
        check_branch(args, ckpt, epochs_done(ckpt), pre.branch)
    if pre.resume:
        check_resume_flags(args, ckpt["args"], pre.resume)
    if pre.recipe and not pre.resume:
        print(recipe_note(pre.recipe, args))
    return args, init if init is not None else ckpt


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
    n_train, n_val = SYNTHETIC["n_train"], SYNTHETIC["n_val"]
    folder = os.path.join("synthetic_cache", f"scenes-{n_train}-{n_val}-seed0")
    if rank == 0:
        print("=" * 88 + f"\nNo dataset: --data_dir not given and {DATA_DIR} does not exist.\n"
              f"Training on built-in synthetic scenes ({n_train} train / {n_val} val frames, cached in {folder}).\n"
              f"Pass --data_dir PATH to train on DepthEstimationUnreal.\n" + "=" * 88)
        if not os.path.exists(os.path.join(folder, "COMPLETE")):
            synthetic.make_dataset(folder, n_train=n_train, n_val=n_val, seed=0)
            atomic_write(os.path.join(folder, "COMPLETE"), lambda f: f.write(b"ok\n"))
    if dist.is_initialized():
        dist.barrier()
    return folder, True


def load_splits(args, data_dir, main_proc):
    """(train set, val set, cached?): --train_splits and val, or with --folds the fold's part of train+val."""
    splits = list(crossval.FOLD_SPLITS) if args.folds else args.train_splits.split("+")
    n_frames = sum(len(ds_lib.find_pairs(data_dir, s)[0]) for s in set(splits + ["val"]))
    cache = args.cache == "on" or (args.cache == "auto" and fits_in_ram(n_frames, CACHE_RAM_FRACTION))
    read = functools.partial(ds_lib.DepthDataset, data_dir, cache=cache, progress=main_proc,
                             allow_unusual_depth=args.allow_unusual_depth)
    if not args.folds:
        return read(split=splits if len(splits) > 1 else splits[0]), read(split="val"), cache
    return *crossval.fold_sets(read(split=splits), args), cache


def load_data(args, env):
    """The train and val sets (cached, and stacked for direct indexing where they fit), steps per epoch and the
    fixed evaluation sets: all of val (sharded over processes), evenly spaced train frames, 3 figure frames."""
    data_dir, is_synthetic = resolve_data_dir(args, env.rank)
    train_set, val_set, cache = load_splits(args, data_dir, env.main)
    if not train_set.has_depth or not val_set.has_depth:
        raise UserError(f"{data_dir}: training needs depth maps for train and val (found images only)")
    train_hw, _ = train_set.frame_hw(), val_set.frame_hw()  # frames of one size in each, or one line naming two
    stacked = train_set.stacked() if cache else None
    if stacked is not None and env.device.type == "cuda":
        stacked = tuple(t.to(env.device) for t in stacked)  # the whole uint8 split lives on the GPU
    steps_per_epoch = len(epoch_order(len(train_set), 0, 0, env.rank, env.world)) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{data_dir}: {len(train_set)} training frames are fewer than one batch per process "
                        f"({args.batch_size})")
    fold = " (val is trained on: its metrics are not a held-out score)" if "val" in args.train_splits.split("+") else ""
    if args.folds:
        fold = crossval.held_out_note(args, val_set)
    env.log(f"data {data_dir}: {len(train_set)} train / {len(val_set)} val frames{fold}, "
            f"cache {'on' if cache else 'off'}, "
            f"{steps_per_epoch} steps/epoch of batch {args.batch_size}")
    n_train_eval = len(train_set) if args.train_eval_frames <= 0 else min(args.train_eval_frames, len(train_set))
    train_eval_idx = sorted({round(i * (len(train_set) - 1) / max(1, n_train_eval - 1)) for i in range(n_train_eval)})
    return SimpleNamespace(
        dir=data_dir, synthetic=is_synthetic, train=train_set, val=val_set, stacked=stacked, train_hw=train_hw,
        steps_per_epoch=steps_per_epoch, val_idx=list(range(len(val_set)))[env.rank::env.world],
        train_eval_idx=train_eval_idx[env.rank::env.world], n_train_eval=n_train_eval,
        fig_idx=sorted({0, len(val_set) // 2, len(val_set) - 1}), fig_train_idx=[len(train_set) // 2],
        eval_batch_size=max(args.batch_size, EVAL_BATCH_SIZE))


# ------------------------------------------------------------------------------------------------
# optimisation (the LR schedules: schedules.py)

def encoder_lr(args):
    return args.lr if args.encoder_lr is None else args.encoder_lr


def make_optimizer(args, model):
    enc, dec = param_groups(model)
    groups = [{"params": enc, "lr": encoder_lr(args), "name": "encoder"},
              {"params": dec, "lr": args.lr, "name": "decoder"}]
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return opt_cls([g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay)


def ema_update(ema_net, net, decay, step):
    """ema <- ema + (1 - d) * (weights - ema), d = min(decay, (1 + step) / (10 + step)) (a short warm-up);
    buffers too."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        ema_t, raw_t = [], []
        for e, r in zip(ema_net.state_dict().values(), net.state_dict().values()):
            if e.is_floating_point():
                ema_t.append(e)
                raw_t.append(r)
            else:
                e.copy_(r)
        torch._foreach_lerp_(ema_t, raw_t, 1.0 - d)


def train_step(model, input_size, rgb, depth_m, loss_fn, optimizer, scheduler, scaler, amp_dtype, channels_last,
               augment=None):
    """One optimisation step on a batch already on the device; returns the loss (a tensor, no host sync
    beyond the finiteness check). augment: keyword options of dataset.augment_batch (generator included) or None."""
    if augment is not None:
        rgb, depth_m = ds_lib.augment_batch(rgb, depth_m, **augment)
    rgb = fit_input(rgb, input_size)
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
# the run: process setup, building (or restoring) it (its checkpoints: runstate.py)

def setup(args):
    """The process: rank and world size (torchrun), device, process group, seeds, autocast and memory format."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(args.seed)
    amp_dtype, channels_last, why = precision_and_layout(device, args.amp, args.channels_last)
    env = SimpleNamespace(world=world, rank=rank, main=rank == 0, device=device, amp_dtype=amp_dtype,
                          channels_last=channels_last, log=print if rank == 0 else (lambda *a, **k: None))
    env.log(f"device {device} ({why}); autocast {amp_dtype or 'off'}, channels_last {channels_last}, "
            f"{world} process(es)")
    return env


def ready_to_train(net, args, env):
    """The model frozen as --freeze says, on the device, in the memory format of the run."""
    freeze_encoder(net, args.freeze)
    depthwise_fp32_in_training(net)  # CPU bf16 only: faster backward
    net.to(env.device)
    if env.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def epochs_to_run(args, is_synthetic):
    if args.max_epochs is not None:
        return args.max_epochs
    if args.time_budget:
        return 10 ** 6
    return SYNTHETIC["max_epochs"] if is_synthetic else MAX_EPOCHS


def build_run(args, env, data, ckpt):
    """Everything that changes while training (model, its average, optimizer, schedule, counters, history), made from
    the arguments, or from a checkpoint to continue it exactly."""
    source = args.resume or args.branch  # the checkpoint a run continues (ckpt), if any
    if args.init:  # a new run from the weights of ckpt: nothing else of it is taken
        net, ckpt = model_from_init(args, env, data, ckpt), None
    elif ckpt is not None:
        net = model_from_checkpoint(ckpt["model"], ckpt.get("train_state_dict") or ckpt["state_dict"], source)
    else:
        net = build_model(args.model, pretrained=args.pretrained and not args.encoder_weights, encoder=args.encoder,
                          encoder_weights=args.encoder_weights, head=args.head, **model_options(args))
    net = ready_to_train(net, args, env)
    ema_net = None
    if args.ema > 0 and ckpt is not None and ckpt.get("train_state_dict"):  # the average: checked like the raw weights
        ema_net = ready_to_train(model_from_checkpoint(ckpt["model"], ckpt["state_dict"], source), args, env)
    elif args.ema > 0:
        ema_net = copy.deepcopy(net)
    if ema_net is not None:
        ema_net.eval().requires_grad_(False)
    max_epochs = epochs_to_run(args, data.synthetic)
    optimizer = make_optimizer(args, net)
    model = torch.nn.parallel.DistributedDataParallel(net) if env.world > 1 else net
    run = SimpleNamespace(
        args=args, net=net, ema_net=ema_net, eval_net=ema_net if ema_net is not None else net,
        model=compile_or_eager(model) if args.compile else model, optimizer=optimizer,
        base_lrs=[g["lr"] for g in optimizer.param_groups],
        scheduler=make_scheduler(args, optimizer, data.steps_per_epoch * max_epochs, data.steps_per_epoch),
        scaler=torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16),
        loss_fn=build_loss(args.loss, args.head == "clip"), max_epochs=max_epochs, epoch=0, step=0, in_epoch=None,
        train_seconds=0.0, best={"val_rmse": float("inf"), "epoch": None}, history=[], stop_signal=None, dir=None,
        train_hw=list(data.train_hw), step_log=[], lock=None, frames=frame_record(data))
    if ckpt is not None:
        check_resumed_data(ckpt, data, source, env.log)
        restore_training_state(run, ckpt, source)
        if args.branch:  # a branch's best.pth is the best of its own evaluations
            run.best = {"val_rmse": float("inf"), "epoch": None}
        env.log(f"{'resumed' if args.resume else 'branched from'} {source}: {run.epoch} epoch(s) done, step {run.step}")
    if env.main:
        run.dir, run.lock = claim_run_dir(args)
    if env.world > 1:
        box = [run.dir]
        dist.broadcast_object_list(box)
        run.dir = box[0]
    follow_clock(run)
    schedule = f"scheduler {args.scheduler}"
    if args.time_budget:
        schedule += (f" over a {args.time_budget:g}-minute budget" if on_clock(args)
                     else f", stopping after {args.time_budget:g} minutes")
    parts = [f"model {args.model} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
             f"head {net.config.get('head')})", f"loss {run.loss_fn.spec}",
             f"{args.optimizer} lr {args.lr:g} (encoder {encoder_lr(args):g})", schedule]
    if ema_net is not None:
        parts.append(f"EMA {args.ema:g}")
    env.log(", ".join(parts) + f", run folder {run.dir}")
    return run


def model_options(args):
    """The U-Net models' options the flags set away from their defaults (other models take none of them)."""
    options = {"drop_path": args.drop_path, "input_scale": args.input_scale, "decoder_channels": args.decoder_channels}
    defaults = {"drop_path": 0.0, "input_scale": 1.0, "decoder_channels": None}
    return {k: v for k, v in options.items() if v != defaults[k]}


def model_from_init(args, env, data, ckpt):
    """--init: the model of its checkpoint (ckpt, read by parse_args) with its evaluated weights (state_dict: the
    average with --ema), for a new run (parse_args has checked that the model flags ask for this model)."""
    net = model_from_checkpoint(ckpt["model"], ckpt["state_dict"], args.init)
    hw = checkpoint_train_hw(ckpt)
    done = epochs_done(ckpt)  # None for a file without its run's record (an ensemble's member 2, ...)
    env.log(f"initialised from {args.init} (its evaluated weights"
            f"{'' if done is None else f', after {done} epoch(s) of its run'}); "
            f"fresh optimizer and schedule" + (f"; it was trained on {hw[0]}x{hw[1]} frames, these are "
                                               f"{data.train_hw[0]}x{data.train_hw[1]}" if
                                               tuple(hw) != tuple(data.train_hw) else ""))
    return net


def all_reduce_floats(values, env, op="sum"):
    """values (floats) reduced over all processes in float64: summed, or op ("max" ...: a torch ReduceOp's name)."""
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
    return t.tolist()


def request_stop(run, signum, _frame):
    """Ctrl-C / SIGTERM: finish the current step, save last.pth, exit cleanly; a second one stops at once."""
    if run.stop_signal is not None:
        raise KeyboardInterrupt
    run.stop_signal = signal.Signals(signum).name


# ------------------------------------------------------------------------------------------------
# one epoch, one evaluation

def train_one_epoch(run, data, env, epoch):
    """Train epoch `epoch` (0-based) from where the run stands. Returns "done", "out_of_time" (--time_budget used up)
    or "stopped" (a signal: last.pth then holds the exact place within the epoch)."""
    args = run.args
    aug_gen = seed_epoch(args.seed, epoch, env.rank)  # everything random in an epoch is fixed by (seed, epoch)
    augment = ds_lib.parse_augment(args.augment)
    indices = epoch_order(len(data.train), args.seed, epoch, env.rank, env.world)
    skip, loss_sum, n_seen = 0, 0.0, 0
    if run.in_epoch:  # continue an epoch that a Ctrl-C cut short, exactly where it stopped
        skip, loss_sum, n_seen = run.in_epoch["steps"], run.in_epoch["loss_sum"], run.in_epoch["n_seen"]
        aug_gen.set_state(run.in_epoch["aug_rng"])
        torch.set_rng_state(run.in_epoch["torch_rng"])
        run.in_epoch = None
    batches = batches_of(data.train, data.stacked, indices[skip * args.batch_size:], args.batch_size, env.device,
                         args.workers)
    bar = tqdm(batches, total=data.steps_per_epoch, initial=skip, disable=not env.main, dynamic_ncols=True,
               desc=f"epoch {epoch + 1}" + ("" if args.time_budget else f"/{run.max_epochs}"))
    t0, n_timed, steps_done, out_of_time = time.time(), 0, skip, False
    since = t0
    for rgb, depth_m in bar:
        try:
            loss = train_step(run.model, run.net.input_size, rgb, depth_m, run.loss_fn, run.optimizer, run.scheduler,
                              run.scaler, env.amp_dtype, env.channels_last,
                              augment=augment and dict(augment, generator=aug_gen))
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {run.step + 1} (epoch {epoch + 1}); stopping. "
                                     f"{kept_checkpoint_note(run.dir)}") from None
        if run.ema_net is not None:
            ema_update(run.ema_net, run.net, args.ema, run.step)
        run.step += 1
        steps_done += 1
        run.train_seconds += time.time() - since
        if env.world > 1 and args.time_budget:  # one clock for all processes: the slowest one's
            run.train_seconds, = all_reduce_floats([run.train_seconds], env, "max")
        follow_clock(run)
        out_of_time = bool(args.time_budget) and run.train_seconds >= 60 * args.time_budget
        run.step_log.append([run.step, epoch + 1, loss.item(), run.optimizer.param_groups[-1]["lr"]])
        loss_sum += run.step_log[-1][2] * rgb.shape[0]
        n_seen += rgb.shape[0]
        n_timed += rgb.shape[0]
        if env.main and run.step % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", img_s=f"{n_timed * env.world / (time.time() - t0):.1f}",
                            lr=f"{run.optimizer.param_groups[-1]['lr']:.2e}")
        if args.visualize_every and run.step % args.visualize_every == 0:
            save_figures(run, data, env, f"step{run.step:06d}")
        if out_of_time:
            break
        if run.stop_signal is not None and steps_done < data.steps_per_epoch:
            bar.close()
            run.in_epoch = {"steps": steps_done, "loss_sum": loss_sum, "n_seen": n_seen,
                            "aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state()}
            save_checkpoints(run, env, ["last.pth"])
            env.log(f"\n{run.stop_signal}: saved last.pth at step {run.step} (epoch {epoch + 1}, "
                    f"{steps_done}/{data.steps_per_epoch} steps); continue with: "
                    f"python main.py --resume {os.path.join(run.dir, 'last.pth')}")
            return "stopped"
        since = time.time()  # figures and the stop check are not training time
    bar.close()
    run.epoch = epoch + 1
    run.history.append({"epoch": epoch + 1, "step": run.step, "train_loss": loss_sum / max(1, n_seen),
                        "lr": run.optimizer.param_groups[-1]["lr"],
                        "images_per_s": n_timed * env.world / max(1e-9, time.time() - t0),
                        "train_minutes": run.train_seconds / 60})
    return "out_of_time" if out_of_time else "done"


def split_metrics(model, split_set, indices, env, batch_size):
    """RMSE, SSIM, ... of a model on frames of a split, summed over all processes."""
    batches = frame_batches(split_set, batch_size, indices)
    total = evaluate_batches(model, batches, env.device, env.amp_dtype, env.channels_last)
    if env.world > 1:
        keys = sorted(total)
        total = dict(zip(keys, all_reduce_floats([total[k] for k in keys], env)))
    return summarize(total)


def save_figures(run, data, env, tag):
    """input | ground truth | prediction | error of the fixed val frames and a fixed train frame (unaugmented), by the
    weights evaluation uses (rank 0): figures/TAG_valNAME.png, figures/TAG_trainNAME.png."""
    if not env.main:
        return
    net = run.eval_net
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        for split, frames, i in [("val", data.val, i) for i in data.fig_idx] + [("train", data.train, i)
                                                                              for i in data.fig_train_idx]:
            rgb, depth = frames[i]
            pred = predict_depth(net, rgb[None].to(env.device), depth.shape[-2:], amp_dtype=env.amp_dtype,
                                 channels_last=env.channels_last)
            name = frames.names[i]
            visualize_img(rgb, depth, pred[0].cpu(), os.path.join(run.dir, "figures", f"{tag}_{split}{name}.png"),
                          title=f"{run.args.model} {tag}, {split} frame {name}")
    net.train(was_training)


def evaluate_and_save(run, data, env, out_of_time):
    """After an epoch: every --evaluate_every epochs (and at the end) metrics, metrics.csv, curves, figures, last.pth,
    epochNNN.pth and best.pth on a new best val RMSE; otherwise last.pth only."""
    args, epoch, row = run.args, run.epoch, run.history[-1]
    if not (epoch % args.evaluate_every == 0 or epoch == run.max_epochs or out_of_time):
        save_checkpoints(run, env, ["last.pth"])
        return
    train_m = split_metrics(run.eval_net, data.train, data.train_eval_idx, env, data.eval_batch_size)
    val_m = split_metrics(run.eval_net, data.val, data.val_idx, env, data.eval_batch_size)
    row.update({"train_rmse": train_m["rmse"], "train_ssim": train_m["ssim"]},
               **{f"val_{k}": v for k, v in val_m.items()})
    text = [f"epoch {epoch}: train loss {row['train_loss']:.4f}",
            f"train RMSE {train_m['rmse']:.3f} SSIM {train_m['ssim']:.3f} ({data.n_train_eval} frames)",
            f"val RMSE {val_m['rmse']:.3f} SSIM {val_m['ssim']:.3f}"]
    if run.ema_net is not None:  # the raw weights too, to show what the average adds
        raw = split_metrics(run.net, data.val, data.val_idx, env, data.eval_batch_size)
        row.update(val_raw_rmse=raw["rmse"], val_raw_ssim=raw["ssim"])
        text[-1] += f" (raw weights {raw['rmse']:.3f} / {raw['ssim']:.3f})"
    text.append(f"{row['images_per_s']:.1f} img/s")
    is_best = val_m["rmse"] < run.best["val_rmse"]
    if is_best:
        run.best = {"val_rmse": val_m["rmse"], "val_ssim": val_m["ssim"], "epoch": epoch}
        text.append("new best val RMSE: best.pth")
    else:
        text.append(f"best val RMSE {run.best['val_rmse']:.3f} (epoch {run.best['epoch']})")
    env.log(" | ".join(text))
    if env.main:
        write_csv(os.path.join(run.dir, "metrics.csv"), run.history)
        plot_curves([h for h in run.history if "val_rmse" in h], os.path.join(run.dir, "curves.png"), run.step_log)
        save_figures(run, data, env, f"epoch{epoch:03d}")
    save_checkpoints(run, env, ["last.pth", f"epoch{epoch:03d}.pth"] + (["best.pth"] if is_best else []))
    if env.main:
        prune_epoch_files(run.dir, args.keep)


# ------------------------------------------------------------------------------------------------

def train(args, ckpt=None):
    """A whole training run (or the rest of one, from `ckpt`; with --init, ckpt holds the weights it starts from).
    0 when done, 130 when stopped by a signal."""
    env = setup(args)
    data = load_data(args, env)
    run = build_run(args, env, data, ckpt)
    previous_handlers = {}  # put back on the way out (main.main may run inside a longer-lived process)
    last_pth = os.path.join(run.dir or "", "last.pth")
    try:
        repair_run_dir(run, env)
        if env.main or env.world == 1:
            handler = functools.partial(request_stop, run)
            previous_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        run.model.train()
        for epoch in range(run.epoch, run.max_epochs):
            status = train_one_epoch(run, data, env, epoch)
            if status == "stopped":
                return 130
            evaluate_and_save(run, data, env, out_of_time=status == "out_of_time")
            if status == "out_of_time":
                env.log(f"time budget of {args.time_budget:g} minutes used up in epoch {run.epoch} (step {run.step})")
                break
            asked = args.stop_after_epochs is not None and args.stop_after_epochs <= run.epoch < run.max_epochs
            if run.stop_signal is not None or asked:
                env.log(f"stopped after epoch {run.epoch}; continue with: python main.py --resume {last_pth}")
                return 130 if run.stop_signal else 0
    except KeyboardInterrupt:
        env.log("\ninterrupted twice: stopped at once; last.pth holds the last finished epoch")
        return 130
    finally:
        unlock(run.lock)  # after the last write (a kill lets go of it too)
        for s, previous in previous_handlers.items():
            signal.signal(s, previous)
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if env.main and args.folds:
        crossval.write_fold_result(run, data, decay_from(args, run.max_epochs) if args.scheduler == "wsd" else None,
                                   env.log)
    if env.main and run.best["epoch"] is not None:
        best_pth = os.path.join(run.dir, "best.pth")
        if not os.path.relpath(best_pth).startswith(".."):  # a resumed run's folder is absolute: show it as typed
            best_pth = os.path.relpath(best_pth)
        env.log(f"done: best val RMSE {run.best['val_rmse']:.4f} SSIM {run.best['val_ssim']:.4f} at epoch "
                f"{run.best['epoch']}\nbest checkpoint: {best_pth}")
        if not args.folds:
            env.log(f"evaluate it: python evaluate.py --data {shlex.quote(data.dir)} --split val "
                    f"--ckpt {shlex.quote(best_pth)}")
    return 0


def model_summary(args):
    """--summary [HxW]: the model the flags describe (no pretrained weights needed), stage by stage, layer by layer."""
    hw = None
    if args.summary:
        m = re.fullmatch(r"(\d+)x(\d+)", args.summary)
        if not m or min(int(m[1]), int(m[2])) < 32:
            raise UserError(f"--summary {args.summary}: give the input size as HxW, both at least 32 (e.g. 144x256)")
        hw = int(m[1]), int(m[2])
    net = build_model(args.model, encoder=args.encoder, head=args.head, **model_options(args))
    freeze_encoder(net, args.freeze)
    return summary_text(net, hw)


def check_args(args):
    """Checks that need no data: a malformed spec or fold setting fails before anything is read."""
    for flag, check in (("--loss", build_loss), ("--augment", ds_lib.parse_augment)):
        try:
            check(getattr(args, flag[2:]))
        except ValueError as e:
            raise UserError(f"{flag}: {e}") from None
    crossval.check_fold_flags(args)
    if args.scheduler == "wsd" and args.time_budget:
        raise UserError("--scheduler wsd runs over --max_epochs; it does not follow --time_budget's clock")
    if args.model == ENSEMBLE:
        build_model(ENSEMBLE)  # UserError: an ensemble is made from trained checkpoints, not trained


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, ckpt = parse_args(argv)
        if args.list_models:
            print("\n".join(list_models()))
            return 0
        if args.summary is not None:
            print(model_summary(args))
            return 0
        if args.export:
            out, weights = export_model(*args.export, half=args.export_fp16, tta=args.export_tta,
                                        ensemble=args.ensemble or (), member=args.member)
            print(f"wrote {out} ({os.path.getsize(out) / 2 ** 20:.1f} MiB, {weights} weights)")
            return 0
        if args.ensemble:
            raise UserError("--ensemble goes with --export CKPT OUT.pth: it writes one checkpoint that averages "
                            "the models")
        if args.member:
            raise UserError("--member goes with --export ENSEMBLE.pth OUT.pth: it writes one member as a checkpoint")
        check_args(args)
        if args.folds and args.fold is None:
            return crossval.cross_validate(args, argv, lambda fold_argv: train(*parse_args(fold_argv)))
        return train(args, ckpt)
    except (UserError, FloatingPointError, OSError) as e:  # OSError: a full disk or a folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2


if __name__ == "__main__":
    sys.exit(main())
