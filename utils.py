"""The bottom layer, shared by every other file and importing none of them.

The user-facing error, the one SSIM (the course definition), the one metrics function (accumulated
over a whole split), the figures (`visualize_img`, `plot_curves`), seeding, device and speed choices
(`precision_and_layout`), and atomic file writes.
"""
import argparse
import contextlib
import fcntl
import math
import os
import platform
import random
import re
import stat
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F

MAX_DEPTH = 20.0  # metres; every depth map is clipped to [0, MAX_DEPTH]
EPS_DEPTH = 1e-3  # metres; floor for the log and relative metrics
DEPTH_CMAP = "magma"  # depth colours as in the reports: near dark (black, purple), far light (orange, yellow)
ERROR_CMAP = "viridis"  # the |error| panel, unlike any depth colour
BAND_MAX_SIDE = 512  # SSIM blurs images up to this many pixels a side by banded matmuls, larger ones by convolutions


class UserError(Exception):
    """A problem the user can act on. Command-line tools print it as one line and exit with 2."""


def first_line(e):
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# SSIM: the course definition, exactly (11x11 Gaussian, sigma 1.5, zero padding, C1/C2 in metres)

def gaussian_1d(size=11, sigma=1.5):
    """The normalised 1-D Gaussian (float64); the SSIM window is its outer product with itself."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_band(n, g, device):
    """[n, n] matrix that blurs a length-n signal with the 1-D window g, zero padding included: M[r, c] = g[c - r + k]
    for |c - r| <= k (the window is symmetric, so M blurs rows as x @ M and columns as M @ x)."""
    k = len(g) // 2
    offset = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None]
    near = offset.abs() <= k
    return torch.where(near, g[(offset + k).clamp(0, len(g) - 1)], torch.zeros((), dtype=g.dtype, device=device))


def ssim_map(pred, gt, size=11, sigma=1.5, c1=0.01 ** 2, c2=0.03 ** 2):
    """Per-pixel SSIM of two [B, C, H, W] maps (metres), same shape as the inputs.

    The 11x11 Gaussian is separable, so the five local means are a blur along H then along W of the stacked maps
    (exactly the 2-D window with zero padding). Up to BAND_MAX_SIDE pixels a side each blur is one matmul with a
    banded matrix (4x faster forward+backward than grouped 11x1 / 1x11 convolutions on the CPUs measured); larger
    images use those convolutions (the band's cost grows with the side)."""
    if pred.shape != gt.shape or pred.dim() != 4:
        raise ValueError(f"ssim needs two [B,C,H,W] tensors of one shape, "
                         f"got {tuple(pred.shape)} and {tuple(gt.shape)}")
    n_maps, (h, w) = 5 * pred.shape[1], pred.shape[-2:]
    g = gaussian_1d(size, sigma).to(device=pred.device, dtype=pred.dtype)
    maps = torch.cat([pred, gt, pred * pred, gt * gt, pred * gt], dim=1)
    if max(h, w) <= BAND_MAX_SIDE:
        maps = gaussian_band(h, g, pred.device) @ maps @ gaussian_band(w, g, pred.device)
    else:
        maps = F.conv2d(maps, g.view(1, 1, size, 1).expand(n_maps, 1, size, 1), padding=(size // 2, 0), groups=n_maps)
        maps = F.conv2d(maps, g.view(1, 1, 1, size).expand(n_maps, 1, 1, size), padding=(0, size // 2), groups=n_maps)
    mu_p, mu_g, e_pp, e_gg, e_pg = maps.chunk(5, dim=1)
    var_p = e_pp - mu_p ** 2
    var_g = e_gg - mu_g ** 2
    cov = e_pg - mu_p * mu_g
    num = (2 * mu_p * mu_g + c1) * (2 * cov + c2)
    den = (mu_p ** 2 + mu_g ** 2 + c1) * (var_p + var_g + c2)
    return num / den


def ssim(pred, gt):
    """Mean SSIM over all pixels of all images (the course definition)."""
    return ssim_map(pred, gt).mean()


def silog(pred_m, depth_m, lam=1.0, per_image=False, eps=0.0):
    """Scale-invariant log error sqrt(mean(d^2) - lam * mean(d)^2), d = ln p - ln g, both floored at EPS_DEPTH.
    lam=1: the log error's standard deviation (the metric, per image); the loss uses lam=0.85 over the batch.
    per_image: one value per image, shape [B]; eps keeps the gradient finite where the variance is 0."""
    d = torch.log(pred_m.clamp_min(EPS_DEPTH)) - torch.log(depth_m.clamp_min(EPS_DEPTH))
    d = d.flatten(1) if per_image else d.flatten()
    variance = (d ** 2).mean(-1) - lam * d.mean(-1) ** 2
    return torch.sqrt(variance.clamp_min(0.0) + eps)


# ----------------------------------------------------------------------------------------------
# Metrics: per-image sums that add up over a split, so nothing depends on the batch size

METRIC_NAMES = ["rmse", "ssim", "mae", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "delta1", "delta2",
                "delta3"]


def metric_sums(pred_m, depth_m, valid=None):
    """Per-image sums for every metric, as float64 tensors of shape [B] (plus 'pixels').

    pred_m, depth_m: [B, 1, H, W] metres, same size (resize predictions to the ground truth first).
    valid: optional bool mask of that shape (`depth_range_mask`): only its pixels are scored (SSIM is still
    computed on the whole map, then averaged over them; SILog is per image over them).
    Add the sums of any set of images and pass them to `summarize` to get that set's metrics.
    """
    if pred_m.shape != depth_m.shape:
        raise ValueError(f"prediction {tuple(pred_m.shape)} and ground truth {tuple(depth_m.shape)} differ in shape")
    p = pred_m.detach().double()
    g = depth_m.detach().double()
    err = p - g
    pf, gf = p.clamp_min(EPS_DEPTH), g.clamp_min(EPS_DEPTH)
    ratio = torch.maximum(pf / gf, gf / pf)
    if valid is not None:
        return masked_metric_sums(p, g, err, pf, gf, ratio, valid.to(p.device).double())
    per_image = lambda x: x.flatten(1).sum(1)
    return {
        "pixels": torch.full((p.shape[0],), float(p[0].numel()), dtype=torch.float64, device=p.device),
        "sq_err": per_image(err ** 2),
        "abs_err": per_image(err.abs()),
        "abs_rel": per_image(err.abs() / gf),
        "sq_rel": per_image(err ** 2 / gf),
        "sq_log": per_image((pf.log() - gf.log()) ** 2),
        "log10": per_image((pf.log10() - gf.log10()).abs()),
        "silog": 100.0 * silog(p, g, per_image=True) * p[0].numel(),  # a per-image value, weighted by its pixels
        "delta1": per_image((ratio < 1.25).double()),
        "delta2": per_image((ratio < 1.25 ** 2).double()),
        "delta3": per_image((ratio < 1.25 ** 3).double()),
        "ssim": per_image(ssim_map(p, g)),
    }


def masked_metric_sums(p, g, err, pf, gf, ratio, w):
    """`metric_sums` over the pixels where w (float 0/1, [B,1,H,W]) is 1: every sum weighted by w."""
    per_image = lambda x: (x * w).flatten(1).sum(1)
    n = per_image(torch.ones_like(p))
    d = pf.log() - gf.log()
    mean_d = per_image(d) / n.clamp_min(1)
    silog_image = 100.0 * torch.sqrt((per_image(d ** 2) / n.clamp_min(1) - mean_d ** 2).clamp_min(0.0))
    return {
        "pixels": n,
        "sq_err": per_image(err ** 2),
        "abs_err": per_image(err.abs()),
        "abs_rel": per_image(err.abs() / gf),
        "sq_rel": per_image(err ** 2 / gf),
        "sq_log": per_image(d ** 2),
        "log10": per_image((pf.log10() - gf.log10()).abs()),
        "silog": silog_image * n,
        "delta1": per_image((ratio < 1.25).double()),
        "delta2": per_image((ratio < 1.25 ** 2).double()),
        "delta3": per_image((ratio < 1.25 ** 3).double()),
        "ssim": per_image(ssim_map(p, g)),
    }


def depth_range_mask(depth_m, min_depth=0.0, max_depth=MAX_DEPTH, exclude_clip=False):
    """The pixels scored: true depth in [min_depth, max_depth], and below the 20 m clip with exclude_clip
    (the clip holds the sky and everything beyond the range). None when that is every pixel."""
    if min_depth <= 0 and max_depth >= MAX_DEPTH and not exclude_clip:
        return None
    valid = (depth_m >= min_depth) & (depth_m <= max_depth)
    return valid & (depth_m < MAX_DEPTH) if exclude_clip else valid


def add_sums(total, sums):
    """Add per-image sums (from `metric_sums`) into a running dict of float totals."""
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + float(v.sum()) if torch.is_tensor(v) else total.get(k, 0.0) + float(v)
    return total


def summarize(total):
    """Metrics of the pixels summed into `total` (a dict from `add_sums`, or one image's sums)."""
    n = float(total["pixels"])
    if n == 0:
        raise ValueError("no pixels to summarize")
    return {
        "rmse": math.sqrt(total["sq_err"] / n),
        "ssim": total["ssim"] / n,
        "mae": total["abs_err"] / n,
        "abs_rel": total["abs_rel"] / n,
        "sq_rel": total["sq_rel"] / n,
        "rmse_log": math.sqrt(total["sq_log"] / n),
        "log10": total["log10"] / n,
        "silog": total["silog"] / n,
        "delta1": total["delta1"] / n,
        "delta2": total["delta2"] / n,
        "delta3": total["delta3"] / n,
    }


# ----------------------------------------------------------------------------------------------
# Errors by depth range: per-bin sums that add up over a split like `metric_sums`

DEPTH_BIN_EDGES = (0.0, 2.0, 5.0, 10.0, 15.0, MAX_DEPTH)  # metres; bins [lo, hi), then the pixels at the clip


def depth_bin_names(edges=DEPTH_BIN_EDGES):
    return [f"{lo:g}-{hi:g} m" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{MAX_DEPTH:g} m (clip)"]


def depth_bin_sums(pred_m, depth_m, valid=None, edges=DEPTH_BIN_EDGES):
    """Per-image sums [B] by true-depth bin k (`depth_bin_names`: [lo, hi) for each pair of edges, then the pixels
    at the clip, depth >= 20 m): bin{k}_pixels, bin{k}_err (sum of pred - gt), bin{k}_sq_err. valid: as metric_sums.
    Add them with `add_sums`, read them with `summarize_bins`."""
    p, g = pred_m.detach().double(), depth_m.detach().double()
    w = torch.ones_like(g) if valid is None else valid.to(g.device).double()
    bounds = list(zip(edges[:-1], edges[1:])) + [(MAX_DEPTH, math.inf)]
    sums = {}
    for k, (lo, hi) in enumerate(bounds):
        in_bin = w * ((g >= lo) & (g < hi)).double()
        err = (p - g) * in_bin
        sums[f"bin{k}_pixels"] = in_bin.flatten(1).sum(1)
        sums[f"bin{k}_err"] = err.flatten(1).sum(1)
        sums[f"bin{k}_sq_err"] = (err * (p - g)).flatten(1).sum(1)
    return sums


def summarize_bins(total, edges=DEPTH_BIN_EDGES):
    """Rows {bin, share (of the scored pixels), rmse, bias (mean pred - gt), sq_err_share (of the total squared
    error)} from added `depth_bin_sums`; rmse and bias are None for an empty bin."""
    names = depth_bin_names(edges)
    pixels = sum(total[f"bin{k}_pixels"] for k in range(len(names)))
    sq_err = sum(total[f"bin{k}_sq_err"] for k in range(len(names)))
    rows = []
    for k, name in enumerate(names):
        n = total[f"bin{k}_pixels"]
        rows.append({"bin": name, "pixels": int(n), "share": n / pixels if pixels else None,
                     "rmse": math.sqrt(total[f"bin{k}_sq_err"] / n) if n else None,
                     "bias": total[f"bin{k}_err"] / n if n else None,
                     "sq_err_share": total[f"bin{k}_sq_err"] / sq_err if sq_err else None})
    return rows


# ----------------------------------------------------------------------------------------------
# Aligned metrics: for models that only get relative depth right (reported beside the metric ones)

ALIGNMENTS = ("median", "lstsq")


def middle(x):
    """The median of a 1-D tensor, the mean of the two middle values for an even count (torch.median takes the
    lower one)."""
    v = x.sort().values
    return 0.5 * (v[(len(v) - 1) // 2] + v[len(v) // 2])


def align_depth(pred_m, depth_m, how, valid=None):
    """The prediction [B,1,H,W] aligned to the truth per image over the scored pixels: 'median' scales it by
    median(gt) / median(pred); 'lstsq' fits scale s and shift t minimising sum (s pred + t - gt)^2 (closed form).
    Clamped to [0, MAX_DEPTH] like every prediction."""
    p, g = pred_m.detach().double(), depth_m.detach().double()
    w = torch.ones_like(g, dtype=torch.bool) if valid is None else valid.to(g.device)
    out = []
    for pi, gi, wi in zip(p, g, w):
        x, y = pi[wi], gi[wi]
        if x.numel() == 0:
            out.append(pi)
        elif how == "median":
            out.append(pi * (middle(y) / middle(x).clamp_min(EPS_DEPTH)))
        elif how == "lstsq":
            var = ((x - x.mean()) ** 2).mean()
            s = ((x - x.mean()) * (y - y.mean())).mean() / var if var > 0 else torch.zeros_like(var)
            out.append(s * pi + (y.mean() - s * x.mean()))
        else:
            raise ValueError(f"unknown alignment {how!r}; one of {', '.join(ALIGNMENTS)}")
    return torch.stack(out).clamp(0.0, MAX_DEPTH).to(pred_m.dtype)


# ----------------------------------------------------------------------------------------------
# Depth-boundary F1: Depth Pro's scale-invariant boundary F1 (Bochkovskii et al. 2024, arXiv:2410.02073,
# ml-depth-pro eval/boundary_metrics.py SI_boundary_F1): a neighbour pair is an occluding contour at threshold t
# when one depth is more than t times the other; F1 of predicted against true contours, per direction, weighted
# over thresholds 1.05..1.25

BOUNDARY_THRESHOLDS = tuple(1.05 + 0.2 * k / 9 for k in range(10))  # np.linspace(1.05, 1.25, 10)


def contour_masks(depth, t, valid=None):
    """[left, top, right, bottom] bool maps of neighbour pairs where one side's depth is more than t times the
    other's (Depth Pro's fgbg_depth; on depth, equal to theirs on inverse depth with directions swapped)."""
    d = depth.clamp_min(EPS_DEPTH)
    pairs = [(d[..., :, :-1], d[..., :, 1:]), (d[..., :-1, :], d[..., 1:, :])]
    masks = [a / b > t for a, b in pairs] + [b / a > t for a, b in pairs]
    if valid is not None:
        both = [valid[..., :, :-1] & valid[..., :, 1:], valid[..., :-1, :] & valid[..., 1:, :]]
        masks = [m & both[k % 2] for k, m in enumerate(masks)]
    return masks


def boundary_f1(pred_m, depth_m, valid=None, thresholds=BOUNDARY_THRESHOLDS):
    """Per-image boundary F1 [B] (float64, in [0, 1]): at each threshold t, recall and precision are the means
    over the 4 directions of |pred & true| / |true| and / |pred| (a direction with none counts 0, as in Depth
    Pro), F1 = 2PR / (P + R) (0 when both are 0); the thresholds are weighted by t / sum(t)."""
    p, g = pred_m.detach().double(), depth_m.detach().double()
    weights = torch.tensor(thresholds, dtype=torch.float64, device=p.device)
    weights = weights / weights.sum()
    count = lambda m: m.flatten(1).sum(1).double()
    total = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
    for t, weight in zip(thresholds, weights):
        recall = precision = 0.0
        for mp, mg in zip(contour_masks(p, t, valid), contour_masks(g, t, valid)):
            hits = count(mp & mg)
            recall = recall + 0.25 * hits / count(mg).clamp_min(1)
            precision = precision + 0.25 * hits / count(mp).clamp_min(1)
        f1 = torch.where(recall + precision > 0, 2 * recall * precision / (recall + precision).clamp_min(1e-300), 0.0)
        total = total + weight * f1
    return total


# ----------------------------------------------------------------------------------------------
# Uncertainty: how well a per-pixel uncertainty ranks the real error (sparsification, as in Ilg et al. 2018 and
# Poggi et al. 2020 "On the uncertainty of self-supervised monocular depth estimation")

SPARSIFICATION_STEPS = 20  # remove 0%, 5%, ..., 95% of the pixels


def sparsification(abs_err, uncertainty, steps=SPARSIFICATION_STEPS):
    """{ause, aurg, curve, oracle} of one image (1-D or any shape, same for both): the RMSE of the pixels left after
    removing the share k/steps (k = 0..steps-1) of them with the highest uncertainty (curve) and with the highest
    true error (oracle, the best any uncertainty can do). AUSE = mean(curve - oracle), 0 for a perfect ranking;
    AURG = mean(RMSE of all pixels - curve), > 0 when the ranking beats removing pixels at random, <= 0 when not."""
    err = torch.as_tensor(abs_err).detach().double().flatten()
    unc = torch.as_tensor(uncertainty).detach().double().flatten()
    n = err.numel()

    def curve(order):
        sq = err[order] ** 2  # most uncertain (or most wrong) first
        tail = sq.flip(0).cumsum(0).flip(0)  # tail[i]: sum over the pixels left after removing the first i
        left = [n - int(k * n / steps) for k in range(steps)]
        return torch.stack([torch.sqrt(tail[n - m] / m) for m in left])

    sparse = curve(torch.argsort(unc, descending=True, stable=True))
    oracle = curve(torch.argsort(err, descending=True, stable=True))
    full = torch.sqrt((err ** 2).mean())
    return {"ause": float((sparse - oracle).mean()), "aurg": float((full - sparse).mean()),
            "curve": sparse.tolist(), "oracle": oracle.tolist()}


# ----------------------------------------------------------------------------------------------
# Figures

def _to_numpy_image(x):
    x = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = np.moveaxis(x, 0, -1)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    return x


def depth_colors(depth_m):
    """HxW metres -> HxWx3 uint8 in DEPTH_CMAP on the 0-20 m scale (near dark, far light); NaN is black."""
    from matplotlib import colormaps
    scaled = np.nan_to_num(np.asarray(depth_m, dtype=np.float64) / MAX_DEPTH, nan=0.0)
    return (colormaps[DEPTH_CMAP](scaled)[..., :3] * 255).round().astype(np.uint8)


SIGNED_ERROR_CMAP = "RdBu_r"  # pred - gt: blue predicted too near, red too far, white right
SIGNED_ERROR_M = 5.0  # metres at the ends of the signed-error colour scale


def error_colors(signed_err_m):
    """HxW pred - gt (metres) -> HxWx3 uint8 in SIGNED_ERROR_CMAP on [-SIGNED_ERROR_M, +SIGNED_ERROR_M]; NaN white."""
    from matplotlib import colormaps
    scaled = np.nan_to_num(np.asarray(signed_err_m, dtype=np.float64) / (2 * SIGNED_ERROR_M) + 0.5, nan=0.5)
    return (colormaps[SIGNED_ERROR_CMAP](np.clip(scaled, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def visualize_img(rgb, depth, pred, path, title=None):
    """Save a PNG: input | ground truth | prediction | absolute error (depth on one 0-20 m scale, DEPTH_CMAP).

    rgb: [3,H,W] in [0,1] (or HxWx3); depth, pred: [1,H,W] or HxW metres (pred may be None).
    Never opens a window or blocks: the figure is drawn with the Agg canvas and written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rgb_np = np.clip(_to_numpy_image(rgb), 0, 1)
    panels = [("input", rgb_np, None)]
    if depth is not None:
        panels.append(("ground truth (m)", _to_numpy_image(depth), "depth"))
    if pred is not None:
        panels.append(("prediction (m)", _to_numpy_image(pred), "depth"))
    if depth is not None and pred is not None:
        err = np.abs(_to_numpy_image(pred) - _to_numpy_image(depth))
        panels.append((f"|error| (m), RMSE {np.sqrt(np.mean(err ** 2)):.2f}", err, "error"))
    fig = Figure(figsize=(4.2 * len(panels), 3.0), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, img, kind) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if kind is None:
            ax.imshow(img)
        else:
            cmap, vmax = (DEPTH_CMAP, MAX_DEPTH) if kind == "depth" else (ERROR_CMAP, 10.0)
            im = ax.imshow(img, cmap=cmap, vmin=0.0, vmax=vmax)
            fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    with warnings.catch_warnings():  # a frame name in a script the font lacks (CJK, ...) is drawn as boxes, silently
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))


def smoothed(values, weight=0.95):
    """Debiased exponential moving average (TensorBoard's smoothing): y_t = sum_k w^(t-k) x_k (1-w) / (1 - w^(t+1))."""
    out, avg = [], 0.0
    for t, x in enumerate(values):
        avg = weight * avg + (1 - weight) * x
        out.append(avg / (1 - weight ** (t + 1)))
    return out


def plot_curves(history, path, step_log=None):
    """RMSE and SSIM (train and val) against epoch, and with step_log ([step, epoch, loss, lr] rows) the training
    loss per step, raw and smoothed (`smoothed`), saved as a PNG (never blocks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    n_panels = 3 if step_log else 2
    fig = Figure(figsize=(5 * n_panels, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    epochs = [h["epoch"] for h in history]
    for i, metric in enumerate(["rmse", "ssim"]):
        ax = fig.add_subplot(1, n_panels, i + 1)
        for split, style in [("train", "o--"), ("val", "o-")]:
            ys = [h.get(f"{split}_{metric}") for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, ys, style, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(metric.upper() + (" (m, lower is better)" if metric == "rmse" else " (higher is better)"))
        ax.grid(alpha=0.3)
        ax.legend()
    if step_log:
        ax = fig.add_subplot(1, n_panels, 3)
        steps, losses = [r[0] for r in step_log], [r[2] for r in step_log]
        ax.plot(steps, losses, lw=0.6, alpha=0.35, color="C0", label="per step")
        ax.plot(steps, smoothed(losses), lw=1.5, color="C0", label="smoothed (EMA 0.95)")
        ax.set_xlabel("step")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------------------------
# Seeding, device, atomic writes

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def pick_device(name=None):
    """'cuda' when a GPU is there, else 'cpu' (or the device named: UserError when it is not one this machine has)."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    available = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if device.type not in available:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)")
    if (device.index or 0) >= available[device.type]:
        raise UserError(f"--device {name}: this machine has {available[device.type] or 'no'} {device.type} "
                        f"device(s){'; use --device cpu' if device.type != 'cpu' else ''}")
    return device


# ----------------------------------------------------------------------------------------------
# command lines: flags range-checked as they are parsed, every error in one line

def flag_range(kind, low, high=None, above=False, below=False):
    """An argparse `type=` that parses an int or float and checks it lies in [low, high] (open ends: above/below);
    argparse then stops with one line naming the flag and the accepted range."""
    what = "an integer" if kind is int else "a number"
    accepted = (f"{'>' if above else '>='} {low:g}" if high is None else
                f"in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {accepted}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if above else value >= low)
                and (high is None or (value < high if below else value <= high))):
            raise argparse.ArgumentTypeError(f"must be {what} {accepted}, got {text}")
        return value
    parse.__name__ = f"{kind.__name__} {accepted}"
    return parse


def positive_ints(text):
    """An argparse `type=`: positive integers joined by commas ("96,64,32") -> [96, 64, 32]."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers joined by commas, got {text!r}")
    return values


positive_int = flag_range(int, 1)
non_negative_int = flag_range(int, 0)
positive_float = flag_range(float, 0, above=True)
non_negative_float = flag_range(float, 0)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default, except None (its help says what unset means) and a default already
    written into the help."""
    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "") or action.help == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def with_cli_conventions(parser):
    """The parser, set to report a bad command line as one line, `error: ...` (no usage block), exit status 2,
    and to show each flag's default in --help."""
    parser.error = lambda message: parser.exit(2, f"error: {message} (--help lists the flags)\n")
    parser.formatter_class = DefaultsHelp
    return parser


def refuse_special_file(path):
    """UserError for a path that names a named pipe, device or socket: opening one can block forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a missing or unreadable file: the caller's own open says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{path}: not a regular file (a named pipe, device or socket); refused")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone makes 0600 files others cannot read
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_write's temp files: .NAME.XXXXXXXX.tmp


def atomic_write(path, write_fn):
    """Write a file through `write_fn(fileobj)` into a temp file beside it, fsync, then rename.

    A crash at any moment leaves either the old file or the new one, never a half-written one (a kill can
    leave the temp file `.NAME.XXXXXXXX.tmp`; `remove_stale_temps` clears those). A failed write removes the
    temp file and raises OSError naming `path` (a write error alone does not say which file it was). A symbolic
    link at `path` is refused (UserError): nothing is written through it, and the link itself is not replaced.
    """
    path = os.fspath(path)
    refuse_link(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from None
        raise


def refuse_link(path, what=None):
    """UserError when `path` is a symbolic link (dangling or not): outputs are never written through a link, nor is a
    link replaced (it was not ours to replace). A link to a folder higher up the path is followed: it was chosen."""
    if os.path.islink(path):
        raise UserError(f"{what + ' ' if what else ''}{path}: is a symbolic link (to {os.readlink(path)}); refused: "
                        "nothing is written through a link or over it (remove the link, or choose another path)")


def lock_folder(folder):
    """An exclusive lock (flock) on a folder, so two processes never write one folder at once: the open descriptor
    that holds it, or None when another process holds it. The lock goes with the process (a killed one lets go);
    `unlock` it when done. Where the file system has no locks (some network ones), the descriptor, unlocked."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass
    return fd


def unlock(fd):
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its lock


def remove_stale_temps(folder):
    """Delete the temp files that killed atomic_write calls left in a folder (and its subfolders)."""
    for parent, _, files in os.walk(folder):
        for name in files:
            if TEMP_NAME.match(name):
                os.remove(os.path.join(parent, name))


# ----------------------------------------------------------------------------------------------
# Speed choices: by what the device can do, never by assumption

def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def precision_and_layout(device, amp="auto", channels_last="auto"):
    """(autocast dtype or None, channels_last bool, reason) for this device, chosen by capability.

    CUDA: bf16 where the GPU supports it, else fp16; channels_last on.
    CPU: bf16 autocast only where the CPU has bf16 instructions (AMX or AVX512-BF16): measured 2x on a
    Xeon with AMX and 1.6x train / 1.8x inference on an AMD EPYC with AVX512-BF16, while on an
    AVX2-only EPYC it made training 7x slower. channels_last on (1.4x in fp32 on the AVX2 EPYC).
    """
    device = torch.device(device)
    if device.type == "cuda":
        auto_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        why = f"CUDA {torch.cuda.get_device_name(device)}"
    else:
        flags = cpu_flags()
        bf16_isa = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
        auto_dtype = torch.bfloat16 if bf16_isa else None
        why = f"{cpu_model_name()}, {torch.backends.cpu.get_cpu_capability()}, " + \
            (f"{bf16_isa[0]}: bf16 autocast" if bf16_isa else "no bf16 instructions: fp32")
    dtype = {"auto": auto_dtype, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--amp fp16 is for CUDA; on a CPU use --amp bf16 or none")
    if isinstance(channels_last, str):
        cl = {"auto": True, "on": True, "off": False}[channels_last]
    else:
        cl = bool(channels_last)
    return dtype, cl, why


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
