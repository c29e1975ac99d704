"""Speed of our training and evaluation paths against the course template's, on this machine.

    python benchmark.py                                               # effnet_unet on synthetic scenes
    python benchmark.py --model effnet_unet --data_dir DepthEstimationUnreal --steps 30
    python benchmark.py --data_dir DepthEstimationUnreal --profile    # + top ops of one training step
    python benchmark.py --data_dir DepthEstimationUnreal --json bench.json
    python benchmark.py --deploy checkpoints/best.pth --steps 5 --repeats 5    # eager vs TorchScript vs ONNX Runtime

train: images/s of main.py's step (cached uint8 tensors indexed per batch by dataset.batches_of, main.train_step,
       autocast and memory format from utils.precision_and_layout, main.py's default augmentation) and of the
       template-style step (a DataLoader with --template_workers workers over a Dataset that opens every JPEG with
       PIL and np.loads every depth map, torchvision ToTensor, fp32, default memory format), with the same model, batch,
       optimizer (main.make_optimizer: AdamW), scheduler and loss.
eval:  images/s of evaluate.py's prediction path (model.predict_depth under inference_mode, the choices of
       utils.precision_and_layout, cached batches) against the template-style loop (file-decoding DataLoader, fp32,
       no_grad).
Each path: --warmup untimed steps, then --repeats timed runs of --steps steps, the paths' runs taken in turn;
       median and min-max are printed.
utilisation: FLOPs per image (torch.utils.flop_counter on one step), achieved FLOP/s and MFU, i.e. that as a
       fraction of this machine's own matmul peak measured in the same run in the path's compute dtype.
memory: CUDA max_memory_allocated per path; on a CPU the process peak RSS (monotonic over the whole run).
"""
import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image

import dataset as ds_lib
import main as train_script
import model as model_lib
from export import export_graph, load_graph
from losses import build_loss
from model import predict_depth
from schedules import make_scheduler
from utils import (UserError, atomic_write, cpu_model_name, non_negative_int, pick_device, positive_int, positive_ints,
                   precision_and_layout, seed_everything, with_cli_conventions)


def get_parser():
    p = with_cli_conventions(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    a = p.add_argument
    a("--model", default=train_script.MODEL, help="model variant (main.py --list-models)")
    a("--encoder", default=None, help="timm encoder of the U-Net models (default: the model's own; the shipped "
                                      "recipe's is tf_efficientnet_lite2)")
    a("--data_dir", default=None, help="dataset root (default: synthetic scenes made in a temporary folder)")
    a("--n_train", type=positive_int, default=96, help="synthetic train frames (without --data_dir)")
    a("--n_val", type=positive_int, default=32, help="synthetic val frames (without --data_dir)")
    a("--batch_size", type=positive_int, default=train_script.BATCH_SIZE, help="training and inference batch")
    a("--steps", type=positive_int, default=30, help="steps per timed repeat")
    a("--repeats", type=positive_int, default=3, help="timed repeats per path (median reported)")
    a("--warmup", type=non_negative_int, default=3, help="untimed steps before the repeats")
    a("--template_workers", type=non_negative_int, default=4,
      help="DataLoader workers of the template-style loops (the template's 4)")
    a("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
      help="our path's autocast (auto: utils.precision_and_layout)")
    a("--channels_last", default="auto", choices=["auto", "on", "off"], help="our path's memory format")
    a("--compile", default="none", choices=["none", "train", "eval", "both"],
      help="torch.compile our path's model for training (main.py --compile), inference (evaluate.py --compile) or "
           "both; compiling happens in the warm-up steps, whose time is printed")
    a("--profile", action="store_true", help="print the top ops by self time of one training step of our path")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one)")
    a("--json", default=None, help="write every figure here")
    a("--deploy", default=None, metavar="CKPT",
      help="instead: per-frame CPU latency of CKPT as PyTorch eager, TorchScript and ONNX Runtime (graphs made by "
      "main.py --export into a temporary folder) on 144x256 frames, at each --deploy_batches")
    a("--deploy_batches", type=positive_ints, default="1,16", help="with --deploy: batch sizes, joined by ','")
    a("--deploy_tta", default=None, choices=["none", "flip"], help="with --deploy: default: the checkpoint's own")
    return p


# ------------------------------------------------------------------------------------------------
# the template's data path (the course template: PIL + np.load per item, ToTensor, DataLoader workers)

class TemplateDataset(torch.utils.data.Dataset):
    def __init__(self, data_dir, split):
        import torchvision.transforms as T
        _, self.rgb_paths, self.depth_paths = ds_lib.find_pairs(data_dir, split)
        self.to_tensor = T.ToTensor()

    def __len__(self):
        return len(self.rgb_paths)

    def __getitem__(self, i):
        rgb = self.to_tensor(Image.open(self.rgb_paths[i]).convert("RGB"))
        depth = self.to_tensor(np.clip(np.load(self.depth_paths[i]).astype(np.float32), 0.0, 20.0))
        return rgb, depth


# ------------------------------------------------------------------------------------------------
# timing, memory, FLOPs

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; the process peak so far


def time_paths(kind, fns, streams, args, device):
    """{path: images/s of args.repeats timed runs of args.steps calls of fn(rgb, depth)} for the paths in fns, after
    args.warmup untimed calls each. Repeats take turns (ours, template, ours, ...) so a drift in the shared machine's
    speed hits both paths alike. Batch loading is timed: it is part of each path. .item() only after the clock stops."""
    def settle(path):  # the template's workers finish prefetching before another path's clock starts
        if path == "template" and args.template_workers:
            time.sleep(1.0)

    warmup_s = {}
    for path, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn(*next(streams[path]))
        sync(device)
        warmup_s[path] = time.perf_counter() - t0
        print(f"  {kind} {path} warm-up: {args.warmup} steps in {warmup_s[path]:.1f} s (compiling happens here)")
        settle(path)
    rates, peaks = {path: [] for path in fns}, {path: 0.0 for path in fns}
    for r in range(args.repeats):
        for path, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = fn(*next(streams[path]))
            sync(device)
            rates[path].append(args.steps * args.batch_size / (time.perf_counter() - t0))
            peaks[path] = max(peaks[path], peak_memory_mb(device))
            print(f"  {kind} {path} repeat {r + 1}/{args.repeats}: {rates[path][-1]:.1f} images/s "
                  f"(last output {out.float().mean().item():.3f})")
            settle(path)
    return {path: {"images_per_s": statistics.median(v), "min": min(v), "max": max(v), "repeats": v,
                   "peak_memory_mb": peaks[path], "warmup_s": warmup_s[path]} for path, v in rates.items()}


def conv_flop_formulas(tally):
    """FlopCounterMode formulas for aten.convolution and its backward that also tally grouped (depthwise) convs.
    Backward: grad_input and grad_weight each cost the forward's multiply-adds; torch 2.14's own formula counts
    grad_weight as if groups were 1, C times too high for a depthwise conv (pytorch/pytorch#183405)."""
    from torch.utils.flop_counter import conv_flop_count

    def count(x, w, out, transposed, groups, times=1):
        flops = conv_flop_count(x, w, out, transposed) * times
        tally["depthwise_conv" if groups > 1 else "dense_conv"] += flops
        return flops

    def forward(x, w, _bias, _stride, _pad, _dil, transposed, _out_pad, groups, out_shape=None, **_):
        return count(x, w, out_shape, transposed, groups)

    def backward(grad_out, x, w, _bias, _stride, _pad, _dil, transposed, _out_pad, groups, mask, out_shape=None, **_):
        return count(x, w, grad_out, transposed, groups, int(mask[0]) + int(mask[1]))
    return {torch.ops.aten.convolution: forward, torch.ops.aten.convolution_backward: backward}


def flops_of(fn, *inputs):
    """(total FLOPs, {dense_conv, depthwise_conv: FLOPs}) of one call, by torch.utils.flop_counter."""
    from collections import Counter
    from torch.utils.flop_counter import FlopCounterMode
    tally = Counter()
    counter = FlopCounterMode(display=False, custom_mapping=conv_flop_formulas(tally))
    with counter:
        fn(*inputs)
    return counter.get_total_flops(), dict(tally)


def matmul_peak(device, dtype, n=None, reps=5):
    """FLOP/s of the best of `reps` n x n matmuls in dtype: this machine's own reference peak."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def op_kind(event):
    """The kind of a profiler event, from its name and input shapes: dense conv, depthwise conv (weight [C, 1, k, k]),
    1-channel conv (weight [1, 1, k, k]: the SSIM loss's 11x11 Gaussian window), batch norm or other."""
    if "conv" in event.key and len(event.input_shapes) > 2:
        w = event.input_shapes[2 if "backward" in event.key else 1]
        if len(w) == 4 and w[1] == 1:
            return "depthwise conv" if w[0] > 1 else "1-channel conv (SSIM window)"
        return "dense conv"
    return "batch norm" if "batch_norm" in event.key else "other"


def profile_step(run_one, batch, device, rows=12):
    """(top-ops table, {top ops, time share per op kind}) of one call under torch.profiler."""
    acts = ([torch.profiler.ProfilerActivity.CPU]
            + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        run_one(*batch)
        sync(device)
    by_op = sorted(prof.key_averages(), key=lambda e: getattr(e, sort), reverse=True)
    total = sum(getattr(e, sort) for e in by_op) or 1.0
    shares = {}
    for e in prof.key_averages(group_by_input_shape=True):
        shares[op_kind(e)] = shares.get(op_kind(e), 0.0) + getattr(e, sort) / total
    top = [{"op": e.key, "self_us": getattr(e, sort), "share": getattr(e, sort) / total, "calls": e.count}
           for e in by_op[:rows]]
    table = prof.key_averages().table(sort_by=sort, row_limit=rows) + "\nthe same by input shapes:\n" + \
        prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows // 2, max_name_column_width=30)
    return table, {"sort_by": sort, "total_us": total, "top_ops": top, "time_share_by_kind": shares}


# ------------------------------------------------------------------------------------------------
# the two paths

def make_path(margs, loss_fn, device, total_steps, amp_dtype=None, channels_last=False, compile="none", augment=None):
    """(model, train_one(rgb, depth), predict_one(rgb, depth)) of one path, made as main.py makes them; the defaults
    are the template's: fp32, default memory format, no augmentation. Same seed, so the same initial weights."""
    seed_everything(0)
    net = model_lib.build_model(margs.model, pretrained=False, encoder=margs.encoder, head=margs.head)
    net = net.to(device).train()
    model_lib.depthwise_fp32_in_training(net)  # as main.py builds it (acts only under CPU bf16 autocast)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = train_script.make_optimizer(margs, net)
    scheduler = make_scheduler(margs, optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_model = model_lib.compile_or_eager(net) if compile in ("train", "both") else net
    eval_model = model_lib.compile_or_eager(net) if compile in ("eval", "both") else net

    def train_one(rgb, depth_m):
        return train_script.train_step(step_model, net.input_size, rgb, depth_m, loss_fn, optimizer, scheduler,
                                       scaler, amp_dtype, channels_last, augment=augment)

    def predict_one(rgb, depth_m):
        return predict_depth(eval_model, rgb, depth_m.shape[-2:], amp_dtype=amp_dtype, channels_last=channels_last)
    return net, train_one, predict_one


def index_stream(n_frames, n_batches, batch_size):
    """main.py's epoch orders, one after another, until n_batches full batches are covered."""
    indices, epoch = [], 0
    while len(indices) < n_batches * batch_size:
        indices += ds_lib.epoch_order(n_frames, 0, epoch, 0, 1)[: n_frames // batch_size * batch_size]
        epoch += 1
    return indices[: n_batches * batch_size]


def under(mode, fn):
    """fn called under a grad mode (torch.inference_mode or torch.no_grad)."""
    def call(*inputs):
        with mode():
            return fn(*inputs)
    return call


def dtype_name(dtype):
    return str(dtype or torch.float32).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# --deploy: latency of a checkpoint as eager PyTorch and as its exported graphs

def deploy_latency(args):
    """{batch: {path: per-frame ms (median of --repeats runs of --steps calls, min-max)}} of one checkpoint on the
    CPU: eager predict_depth in fp32 (the graphs' numerics), eager with evaluate.py's fast path (autocast and
    channels_last of utils.precision_and_layout), the TorchScript and the ONNX graph; paths timed in turn
    (time_paths)."""
    import copy
    import types
    import evaluate
    device = torch.device("cpu")
    batches = args.deploy_batches
    load_args = types.SimpleNamespace(ckpt=args.deploy, model=None, encoder=None, head="clip", tta=args.deploy_tta)
    net, config = evaluate.load_model(load_args, device)
    tta, hw = load_args.tta == "flip", model_lib.TRAIN_HW
    amp_dtype, _, why = precision_and_layout(device)
    fast_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    paths = {"eager": lambda rgb, _: predict_depth(net, rgb, tta=tta),
             "eager_fast": lambda rgb, _: predict_depth(fast_net, rgb, tta=tta, amp_dtype=amp_dtype,
                                                         channels_last=True)}
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        for name, suffix in (("torchscript", ".pt"), ("onnxruntime", ".onnx")):
            graph_path = export_graph(args.deploy, os.path.join(tmp, "model" + suffix), load_args.tta)
            predict = load_graph(graph_path)[0]
            paths[name] = lambda rgb, _, predict=predict: predict(rgb)
    print(f"--deploy {args.deploy}: {config['name']} {config.get('encoder')}, tta {load_args.tta}, {hw[1]}x{hw[0]} "
          f"random frames; {cpu_model_name()}, {torch.get_num_threads()} threads (ONNX Runtime too); eager_fast: "
          f"{why}, channels_last; load average {os.getloadavg()[0]:.2f} (other work on the machine skews it)")
    warmup = max(args.warmup, 3)  # TorchScript's profiling executor optimises over its first calls
    results = {}
    for b in batches:
        rgb = torch.rand(b, 3, *hw, generator=torch.Generator().manual_seed(0))
        timing = types.SimpleNamespace(warmup=warmup, repeats=args.repeats, steps=args.steps, batch_size=b,
                                       template_workers=0)
        fns = {path: under(torch.inference_mode, fn) for path, fn in paths.items()}
        rates = time_paths(f"batch {b}", fns, {path: itertools.repeat((rgb, None)) for path in paths}, timing,
                           device)
        results[b] = {path: {"ms_per_frame": 1000 / r["images_per_s"], "min": 1000 / r["max"],
                             "max": 1000 / r["min"]} for path, r in rates.items()}
    print(f"\nper-frame latency, ms (median of {args.repeats} x {args.steps} calls, min-max)")
    print(f"{'batch':>5}  " + "".join(f"{path:<24}" for path in paths).rstrip())
    for b, row in results.items():
        print(f"{b:>5}  " + "".join(f"{r['ms_per_frame']:.1f} ({r['min']:.1f}-{r['max']:.1f})".ljust(24)
                                    for r in row.values()).rstrip())
    result = {"machine": {"cpu": cpu_model_name(), "torch_threads": torch.get_num_threads(),
                          "torch": str(torch.__version__), "eager_fast": why},
              "config": {"ckpt": args.deploy, "model": config, "tta": load_args.tta, "image_hw": list(hw),
                         "steps": args.steps, "repeats": args.repeats, "warmup": warmup},
              "latency": {str(b): row for b, row in results.items()}}
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
        print(f"wrote {args.json}")
    return result


# ------------------------------------------------------------------------------------------------

def run(args):
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the template's 4 workers on fewer cores
    device = pick_device(args.device)
    amp_dtype, channels_last, why = precision_and_layout(device, args.amp, args.channels_last)
    print(f"device {device} ({why}); torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} "
          f"CPU cores, load average {os.getloadavg()[0]:.2f} (other work on the machine skews every figure)")
    compiled = f", torch.compile for {args.compile}" if args.compile != "none" else ""
    print(f"ours: autocast {amp_dtype or 'off'}, channels_last {channels_last}{compiled}; "
          f"template: fp32, default memory format, {args.template_workers} DataLoader workers")

    # data: main.py's cache (uint8, on the GPU under CUDA) for our path, the files themselves for the template's
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        import synthetic
        tmp = tempfile.TemporaryDirectory(prefix="bench_synthetic_")
        data_dir = tmp.name
        print(f"no --data_dir: {args.n_train} train / {args.n_val} val synthetic scenes in {data_dir}")
        synthetic.make_dataset(data_dir, n_train=args.n_train, n_val=args.n_val, progress=True)
    print(f"caching {data_dir} train and val as main.py does")
    sets = {split: ds_lib.DepthDataset(data_dir, split=split, cache=True, progress=True) for split in ("train", "val")}
    stacked = {split: ds.stacked() for split, ds in sets.items()}
    if device.type == "cuda":  # as main.py: the whole uint8 split lives on the GPU
        stacked = {split: tuple(t.to(device) for t in s) for split, s in stacked.items()}
    hw = tuple(stacked["train"][0].shape[-2:])
    n_batches = args.warmup + args.repeats * args.steps + (2 if args.profile else 0)

    def batch_streams(split):
        """(our batches, the template's batches): the same frames in the same order, each path's own way."""
        idx = index_stream(len(sets[split]), n_batches, args.batch_size)
        return (ds_lib.batches_of(sets[split], stacked[split], idx, args.batch_size, device, 0),
                ds_lib.batches_of(TemplateDataset(data_dir, split), None, idx, args.batch_size, device,
                                  args.template_workers))

    # the same model (same initial weights), optimizer, scheduler and loss for both paths, made by main.py's functions
    margs = train_script.get_parser().parse_args(["--model", args.model, "--batch_size", str(args.batch_size)]
                                                 + (["--encoder", args.encoder] if args.encoder else []))
    margs.max_epochs = 1
    loss_fn = build_loss(margs.loss, margs.head == "clip")
    augment = ds_lib.parse_augment(margs.augment)
    augment = augment and dict(augment, generator=torch.Generator().manual_seed(0))
    total_steps = n_batches + 1  # + the step the FLOPs are counted on
    nets, train_fns, predict_fns = zip(make_path(margs, loss_fn, device, total_steps, amp_dtype, channels_last,
                                                 args.compile, augment),
                                       make_path(margs, loss_fn, device, total_steps))
    paths = ("ours", "template")
    n_params = sum(p.numel() for p in nets[0].parameters())
    model_name = f"{args.model} {nets[0].config['encoder']}"
    print(f"model {model_name} ({n_params / 1e6:.2f} M parameters), batch {args.batch_size} of {hw[1]}x{hw[0]}, loss "
          f"{loss_fn.spec}, {margs.optimizer}; ours augments ({margs.augment}) as main.py does, the template does not")

    print(f"train: {args.warmup} warm-up + {args.repeats} x {args.steps} steps per path, repeats in turn")
    results = {"train": time_paths("train", dict(zip(paths, train_fns)), dict(zip(paths, batch_streams("train"))),
                                   args, device)}
    print(f"eval: {args.warmup} warm-up + {args.repeats} x {args.steps} batches per path, repeats in turn")
    for net in nets:
        net.eval()
    eval_fns = {"ours": under(torch.inference_mode, predict_fns[0]), "template": under(torch.no_grad, predict_fns[1])}
    results["eval"] = time_paths("eval", eval_fns, dict(zip(paths, batch_streams("val"))), args, device)
    for net in nets:
        net.train()

    # utilisation: FLOPs per image (counts do not depend on the dtype) against this run's own matmul peak
    rgb, depth = next(ds_lib.batches_of(sets["train"], stacked["train"], list(range(args.batch_size)),
                                        args.batch_size, device, 0))
    flops = {"train": flops_of(train_fns[1], rgb, depth)}
    nets[1].eval()
    with torch.inference_mode():
        flops["eval"] = flops_of(predict_fns[1], rgb, depth)
    nets[1].train()
    print("measuring this machine's matmul peak")
    peaks = {dtype_name(dt): matmul_peak(device, dt)
             for dt in dict.fromkeys([torch.float32, amp_dtype or torch.float32])}
    for kind in ("train", "eval"):
        per_image = flops[kind][0] / args.batch_size
        for path, dt in zip(paths, (amp_dtype, None)):
            r = results[kind][path]
            r.update(flops_per_image=per_image, flops_per_s=per_image * r["images_per_s"], peak_dtype=dtype_name(dt))
            r["mfu"] = r["flops_per_s"] / peaks[r["peak_dtype"]]
        results[kind]["speedup"] = results[kind]["ours"]["images_per_s"] / results[kind]["template"]["images_per_s"]
        results[kind]["depthwise_conv_flop_share"] = flops[kind][1].get("depthwise_conv", 0) / flops[kind][0]
        results[kind]["dense_conv_flop_share"] = flops[kind][1].get("dense_conv", 0) / flops[kind][0]

    memory = "CUDA max_memory_allocated per path" if device.type == "cuda" else \
        "process peak RSS so far (ru_maxrss; the whole process, cached data included)"
    print(f"\n{model_name}, batch {args.batch_size}, {hw[1]}x{hw[0]}, {device} ({why}), torch {torch.__version__}")
    print(f"{'':16}{'images/s':>9} {'(min-max)':>13} {'ratio':>6} {'GFLOP/img':>9} {'GFLOP/s':>8} {'mfu':>7} "
          f"{'of peak':>9} "
          f"{'mem MB':>7}")
    for kind in ("train", "eval"):
        for path in paths:
            r = results[kind][path]
            ratio = f"{results[kind]['speedup']:.2f}x" if path == "ours" else ""
            print(f"{kind + ' ' + path:16}{r['images_per_s']:>9.1f} {r['min']:>6.1f}-{r['max']:<6.1f} {ratio:>6} "
                  f"{r['flops_per_image'] / 1e9:>9.2f} {r['flops_per_s'] / 1e9:>8.1f} {r['mfu'] * 100:>6.2f}% "
                  f"{r['peak_dtype']:>9} {r['peak_memory_mb']:>7.0f}")
    print("matmul peak (mfu's reference): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"GFLOP/img: forward+backward of a training step, forward for eval; depthwise convs do "
          f"{results['train']['depthwise_conv_flop_share']:.1%} of the training FLOPs (they, batch norm and the "
          f"elementwise layers are bandwidth-bound and cannot reach the matmul peak)\nmem MB: {memory}")

    profile = None
    if args.profile:
        batches = batch_streams("train")[0]
        train_fns[0](*next(batches))
        table, profile = profile_step(train_fns[0], next(batches), device)
        print(f"\none training step of our path, top ops by {profile['sort_by']}:\n{table}")
        shares = profile["time_share_by_kind"]
        print("time share by kind: " + ", ".join(f"{k} {v:.1%}"
                                                 for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
        bound = 1.0 - shares.get("dense conv", 0.0)
        print(f"what bounds the step: memory bandwidth. Dense convolutions, the only ops that can run near the matmul "
              f"peak, take {shares.get('dense conv', 0.0):.0%} of the time; the rest ({bound:.0%}: depthwise convs, "
              f"batch norm, casts, upsampling, elementwise) moves memory for "
              f"{1 - results['train']['dense_conv_flop_share']:.0%} of the FLOPs. The step runs at "
              f"{results['train']['ours']['mfu']:.1%} of this CPU's {results['train']['ours']['peak_dtype']} matmul "
              f"peak.")

    result = {
        "machine": {"cpu": cpu_model_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": str(torch.__version__),
                    "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "precision_and_layout": why, "load_average_1min_at_end": os.getloadavg()[0]},
        "config": {"model": args.model, "encoder": nets[0].config["encoder"], "batch_size": args.batch_size,
                   "image_hw": list(hw), "steps": args.steps,
                   "repeats": args.repeats, "warmup": args.warmup, "template_workers": args.template_workers,
                   "data_dir": args.data_dir, "train_frames": len(sets["train"]), "val_frames": len(sets["val"]),
                   "ours": {"autocast": amp_dtype and dtype_name(amp_dtype), "channels_last": channels_last,
                            "compile": args.compile, "augment": margs.augment},
                   "template": {"autocast": None, "channels_last": False, "compile": False, "augment": "none"},
                   "optimizer": margs.optimizer, "loss": loss_fn.spec, "memory": memory},
        "train": results["train"], "eval": results["eval"],
        "utilisation": {"train_flops_per_image": flops["train"][0] / args.batch_size,
                        "eval_flops_per_image": flops["eval"][0] / args.batch_size, "matmul_peak_flops_per_s": peaks},
        "profile": profile,
    }
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return result


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        if args.deploy:
            deploy_latency(args)
        else:
            run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
