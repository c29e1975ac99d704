"""Is checkpoint B really better than A? Both on the same frames, per frame, with a block bootstrap.

    python compare.py --data DepthEstimationUnreal --split val --ckpt A.pth --compare B.pth
    python compare.py --data HELDOUT/ --ckpt base.pth --compare lite2.pth --out cmp.json --save_dir cmp/

Each checkpoint is scored by evaluate.py's own path (`evaluate.load_model`, `evaluate_batches`, the one metrics
function) on the same frames. Printed: each model's split RMSE/SSIM, the per-frame differences B - A (RMSE: negative
is B better; SSIM: positive is B better), B's win rate over frames, and 95% confidence intervals of the split
differences from a moving-block bootstrap: neighbouring frames are near duplicates, so frames are resampled in
contiguous blocks of `--block` frames (Kuensch 1989), not one by one. `--save_dir` gets figures of the frames where
the two differ most and per_frame.csv. Exit status: 0 done; 2 a problem with the command, a file or the data.
"""
import argparse
import csv
import io
import json
import math
import os
import sys

import numpy as np
import torch

import evaluate
from evaluate import (check_outputs, claim_save_dir, evaluate_batches, frame_batches, load_model, mark_complete,
                      open_data)
from model import predict_depth
from utils import (DEPTH_CMAP, MAX_DEPTH, SIGNED_ERROR_CMAP, SIGNED_ERROR_M, UserError, atomic_write, flag_range,
                   pick_device, positive_int, precision_and_layout, summarize, with_cli_conventions)

BLOCK = 50  # bootstrap block, frames: neighbours 50 frames apart are within 10% of independent (docs/generalisation.md)
SAMPLES = 2000  # bootstrap resamples
LEVEL = 0.95  # confidence level of the intervals
FIGURES = 3  # --save_dir: figures of the frames where B is most better and most worse than A


def get_parser():
    p = with_cli_conventions(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    a = p.add_argument
    a("--data", required=True, nargs="+", help="what evaluate.py --data takes, with depth maps")
    a("--ckpt", required=True, help="checkpoint A (the reference)")
    a("--compare", required=True, help="checkpoint B, scored against A")
    a("--split", default="test", help="split to use when --data is a dataset root")
    a("--tta", default=None, choices=["none", "flip"], help="for both (default: what each checkpoint names)")
    a("--block", type=positive_int, default=BLOCK, help="frames per bootstrap block (neighbouring frames are not "
      "independent; 1 resamples single frames)")
    a("--samples", type=positive_int, default=SAMPLES, help="bootstrap resamples")
    a("--seed", type=int, default=0, help="seed of the bootstrap")
    a("--batch_size", type=positive_int, default=16, help="frames per batch (results do not depend on it)")
    a("--out", default=None, help="write the comparison as JSON here")
    a("--save_dir", default=None, help="per_frame.csv and figures of the frames where A and B differ most")
    a("--skip_bad", action="store_true", help="skip unreadable or inconsistent files and list them")
    a("--allow_unusual_depth", action="store_true", help="as evaluate.py")
    a("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"], help="autocast dtype, as evaluate.py")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one)")
    a("--level", type=flag_range(float, 0, 1, above=True, below=True), default=LEVEL, help="confidence level")
    return p


def block_bootstrap(per_frame, statistic, block=BLOCK, samples=SAMPLES, level=LEVEL, seed=0):
    """(low, high) (arrays when statistic returns one): the central `level` percentile interval of
    statistic(resampled rows) over `samples` moving-block bootstrap resamples of per_frame ([N, ...] rows in
    sequence order). Each resample joins blocks of `block` consecutive rows starting at uniformly drawn frames
    (0..N-block) until it holds N rows (the last block cut short)."""
    per_frame = np.asarray(per_frame, dtype=np.float64)
    n = len(per_frame)
    block = max(1, min(block, n))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(samples, math.ceil(n / block)))
    rows = (starts[:, :, None] + np.arange(block)).reshape(samples, -1)[:, :n]
    values = np.array([statistic(per_frame[r]) for r in rows])
    tail = (1 - level) / 2 * 100
    return np.percentile(values, tail, axis=0), np.percentile(values, 100 - tail, axis=0)


def split_difference(rows):
    """[rmse_b - rmse_a, ssim_b - ssim_a] of a set of frames from their sums: rows of [pixels, sq_err_a, ssim_a,
    sq_err_b, ssim_b] (the split metrics, as `utils.summarize` takes them, of exactly these frames)."""
    n, sq_a, ssim_a, sq_b, ssim_b = rows.sum(0)
    return np.array([math.sqrt(sq_b / n) - math.sqrt(sq_a / n), (ssim_b - ssim_a) / n])


def per_frame_sums(net, ds, device, amp_dtype, channels_last, tta, batch_size):
    """[N, 3] float64 rows (pixels, sq_err, ssim sum) per frame, in frame order, and the split's metric totals."""
    rows = []

    def on_batch(pred_m, depth_m, sums, batch):
        rows.extend(zip(sums["pixels"].tolist(), sums["sq_err"].tolist(), sums["ssim"].tolist()))
    total = evaluate_batches(net, frame_batches(ds, batch_size, progress=sys.stderr.isatty()), device, amp_dtype,
                             channels_last, tta, on_batch=on_batch)
    return np.array(rows, dtype=np.float64), total


def compare_figure(path, rgb, depth, pred_a, pred_b, title):
    """input | truth | A | B | |err B| - |err A| (blue: B nearer the truth), depth on the 0-20 m scale; never blocks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4.2 * 5, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    gain = np.abs(pred_b - depth) - np.abs(pred_a - depth)
    panels = [("input", rgb, None), ("ground truth (m)", depth, DEPTH_CMAP), ("A (m)", pred_a, DEPTH_CMAP),
              ("B (m)", pred_b, DEPTH_CMAP), ("|err B| - |err A| (m)", gain, SIGNED_ERROR_CMAP)]
    for k, (name, img, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        if cmap is None:
            ax.imshow(img)
        else:
            low, high = (0.0, MAX_DEPTH) if cmap == DEPTH_CMAP else (-SIGNED_ERROR_M, SIGNED_ERROR_M)
            fig.colorbar(ax.imshow(img, cmap=cmap, vmin=low, vmax=high), ax=ax, fraction=0.03, pad=0.02)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def write_outputs(args, ds, rows_a, rows_b, nets, device, amp_dtype):
    """per_frame.csv, and figures b_better_<frame>.png / b_worse_<frame>.png of the (at most) FIGURES frames where B's
    RMSE is most below / above A's."""
    rmse_a, rmse_b = np.sqrt(rows_a[:, 1] / rows_a[:, 0]), np.sqrt(rows_b[:, 1] / rows_b[:, 0])
    ssim_a, ssim_b = rows_a[:, 2] / rows_a[:, 0], rows_b[:, 2] / rows_b[:, 0]
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["frame", "rmse_a", "rmse_b", "rmse_b_minus_a", "ssim_a", "ssim_b", "ssim_b_minus_a"])
    for i, name in enumerate(ds.names):
        w.writerow([name] + [f"{v:.6f}" for v in (rmse_a[i], rmse_b[i], rmse_b[i] - rmse_a[i], ssim_a[i], ssim_b[i],
                                                   ssim_b[i] - ssim_a[i])])
    atomic_write(os.path.join(args.save_dir, "per_frame.csv"), lambda f: f.write(text.getvalue().encode()))
    gain = rmse_b - rmse_a
    order = np.argsort(gain, kind="stable")
    picks = [("b_better", i) for i in order[:FIGURES] if gain[i] < 0] + \
        [("b_worse", i) for i in order[::-1][:FIGURES] if gain[i] > 0]
    with torch.inference_mode():
        for tag, i in picks:
            rgb, depth = ds.load(i)
            preds = [predict_depth(net, rgb[None].to(device), depth.shape[-2:], tta, amp_dtype)[0, 0].float().cpu()
                     .numpy() for net, tta in nets]
            compare_figure(os.path.join(args.save_dir, f"{tag}_{ds.names[i]}.png"), rgb.permute(1, 2, 0).numpy(),
                           depth[0].numpy(), *preds, f"{tag.replace('_', ' ')}: frame {ds.names[i]}, RMSE A "
                           f"{rmse_a[i]:.3f} m, B {rmse_b[i]:.3f} m")


def run(args):
    paths = args.data if isinstance(args.data, (list, tuple)) else [args.data]
    args.data = paths[0] if len(paths) == 1 else list(paths)
    args.ply, args.fov, args.intrinsics, args.min_depth, args.max_depth = False, None, None, 0.0, MAX_DEPTH
    check_outputs(args)  # evaluate.py's rules for --out and --save_dir
    device = pick_device(args.device)
    amp_dtype, channels_last, why = precision_and_layout(device, args.amp)
    models = []
    for path in (args.ckpt, args.compare):
        one = argparse.Namespace(ckpt=path, model=None, encoder=None, head="clip", tta=args.tta)
        net, config = load_model(one, device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        models.append((net, config, one.tta))
    ds = open_data(args)
    if not ds.has_depth:
        raise UserError(f"{ds.data_dir}: no depth maps; a comparison needs ground truth")
    print(f"A: {models[0][1]['name']} from {args.ckpt} (tta {models[0][2]}); B: {models[1][1]['name']} from "
          f"{args.compare} (tta {models[1][2]}); {len(ds)} frames from {args.data} on {device} ({why})")
    (rows_a, total_a), (rows_b, total_b) = [per_frame_sums(net, ds, device, amp_dtype, channels_last, tta == "flip",
                                                          args.batch_size) for net, _, tta in models]
    metrics_a, metrics_b = summarize(total_a), summarize(total_b)
    rows = np.column_stack([rows_a, rows_b[:, 1:]])
    low, high = block_bootstrap(rows, split_difference, args.block, args.samples, args.level, args.seed)
    d_rmse = np.sqrt(rows_b[:, 1] / rows_b[:, 0]) - np.sqrt(rows_a[:, 1] / rows_a[:, 0])
    d_ssim = rows_b[:, 2] / rows_b[:, 0] - rows_a[:, 2] / rows_a[:, 0]
    result = {"a": args.ckpt, "b": args.compare, "frames": len(ds), "data": args.data, "written_by": "evaluate.py",
              "block": min(args.block, len(ds)), "samples": args.samples, "level": args.level, "seed": args.seed,
              "rmse_a": metrics_a["rmse"], "rmse_b": metrics_b["rmse"], "ssim_a": metrics_a["ssim"],
              "ssim_b": metrics_b["ssim"], "rmse_b_minus_a": metrics_b["rmse"] - metrics_a["rmse"],
              "ssim_b_minus_a": metrics_b["ssim"] - metrics_a["ssim"], "rmse_b_minus_a_ci": [low[0], high[0]],
              "ssim_b_minus_a_ci": [low[1], high[1]], "mean_frame_rmse_b_minus_a": float(d_rmse.mean()),
              "mean_frame_ssim_b_minus_a": float(d_ssim.mean()),
              "b_wins_rmse": float(np.mean(d_rmse < 0) + 0.5 * np.mean(d_rmse == 0)),
              "b_wins_ssim": float(np.mean(d_ssim > 0) + 0.5 * np.mean(d_ssim == 0))}
    print_result(result)
    if args.out:
        atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=2).encode()))
        print(f"wrote {args.out}")
    if args.save_dir:
        claim_save_dir(args.save_dir)
        write_outputs(args, ds, rows_a, rows_b, [(m[0], m[2] == "flip") for m in models], device, amp_dtype)
        mark_complete(args.save_dir)
        print(f"wrote per_frame.csv and figures of the frames that differ most to {args.save_dir}")
    return 0


def print_result(r):
    pct = round(r["level"] * 100)
    print(f"{'':<6}{'A':>9}{'B':>9}{'B - A':>9}{f'{pct}% CI of B - A':>22}{'frame mean B - A':>18}{'B wins':>8}")
    for k, wins in (("rmse", "b_wins_rmse"), ("ssim", "b_wins_ssim")):
        low, high = r[f"{k}_b_minus_a_ci"]
        interval = f"[{low:+.4f}, {high:+.4f}]"
        print(f"{k:<6}{r[f'{k}_a']:>9.4f}{r[f'{k}_b']:>9.4f}{r[f'{k}_b_minus_a']:>+9.4f}{interval:>22}"
              f"{r[f'mean_frame_{k}_b_minus_a']:>+18.4f}{r[wins]:>8.1%}")
    print(f"(CI: moving-block bootstrap of the split's B - A over blocks of {r['block']} neighbouring frames, "
          f"{r['samples']} resamples; B wins: share of frames where B is better)")
    rmse_low, rmse_high = r["rmse_b_minus_a_ci"]
    verdict = ("B is better (its RMSE CI lies below 0)" if rmse_high < 0 else "B is worse (its RMSE CI lies above 0)"
               if rmse_low > 0 else "no clear difference in RMSE (its CI holds 0)")
    print(f"verdict: {verdict}")


def main(argv=None):
    return evaluate.main(argv, get_parser(), run)


if __name__ == "__main__":
    sys.exit(main())
