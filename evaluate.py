"""Evaluate a checkpoint on a folder: the grader harness.

    python evaluate.py --data test/ --ckpt best.pth
    python evaluate.py --data DepthEstimationUnreal --split val --ckpt best.pth --out metrics.json --save_dir preds/
    python evaluate.py --data DepthEstimationUnreal --split val --ckpt best.pth --save_dir clouds/ --ply --fov 90

--data is a dataset root (uses rgb/<split> + depth/<split>, split 'test' by default), a split folder
(rgb/ + depth/), or a folder of images with no depth (then it only predicts, with --save_dir).
Predictions are made at the model's input size and resized back to the ground truth's size, so every
metric is at native resolution; images of much more than the training frame's pixels (phone photos)
are predicted at about the training frame's pixel count, aspect ratio kept (`model.working_size`).
Checkpoints are loaded with torch.load(weights_only=True): a file that would run code when unpickled is
refused.

Besides the per-pixel metrics it prints `flicker`, a sequence-level metric: over neighbouring frames (names
ending in consecutive numbers), the mean |change| of the prediction minus that of the truth, on pixels whose
true depth changes by less than 5 cm (docs/flicker.md). `--ply` (with --save_dir) writes each
prediction as a coloured point cloud through a pinhole camera (`--fov`, default 90 degrees, or `--intrinsics`).

Beside the metrics it prints errors by true-depth range (share, RMSE, bias, share of the squared error per bin) and
the boundary F1 of depth discontinuities; `--min_depth/--max_depth/--exclude_clip` choose the pixels scored,
`--align median|lstsq` adds metrics of per-image aligned predictions, `--uncertainty` a flip-disagreement uncertainty
and how well it ranks the error, `--gif` a sequence as an animated GIF; --data may be image files. With --save_dir
every frame also gets <frame>_error.png (signed error). All of it: docs/evaluation.md; A vs B: compare.py.

`evaluate_batches` and `frame_batches` are also training's evaluation path (main.py imports them), so
main.py's val figures and this harness's are the same computation.

Exit status: 0 done; 2 a problem with the command, a file or the data (one line on stderr naming it);
3 the metrics are not numbers (NaN/inf predictions, e.g. from NaN weights; a warning says why).
"""
import argparse
import copy
import csv
import io
import json
import math
import os
import re
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import checkpoint_train_hw, model_from_checkpoint, nonfinite_tensors, read_checkpoint
from dataset import DepthDataset, load_rgb_uint8
from model import HEADS, compile_or_eager, fit_input, predict_depth
from outputs import claim_folder, entries_in_the_way, folder_is_busy, refuse_unless_ours
from utils import (ALIGNMENTS, MAX_DEPTH, METRIC_NAMES, UserError, add_sums, align_depth, atomic_write, boundary_f1,
                   depth_bin_sums, depth_colors, depth_range_mask, error_colors, flag_range, metric_sums, pick_device,
                   positive_int, precision_and_layout, refuse_link, remove_stale_temps, sparsification, summarize,
                   summarize_bins, unlock, visualize_img, with_cli_conventions)

MARKER = ".written_by_evaluate_py"  # --save_dir's marker (outputs.py): 'in progress', then 'complete'
HELD_LOCKS = []  # --save_dir locks this process holds
BATCH_SIZE = 32
MAX_BATCH_PIXELS = 2 ** 24  # a batch of large images is cut short (about 200 MB of float RGB); one frame always fits
UNREAL_FOV_DEG = 90.0  # Unreal Engine's default camera: horizontal field of view, degrees (--ply's default camera)
STATIC_M = 0.05  # flicker: a pixel is static between two frames when its true depth changes by less than this
MIN_FOCAL_PX = 0.01  # --intrinsics: a smaller focal length sees almost 180 degrees and throws points to infinity
FRAME_NUMBER = re.compile(r"^(.*?)(\d+)$")  # a frame name ending in a number: (prefix, number)
UNCERTAINTY_PNG_M = 2.0  # <frame>_uncertainty.png: the depth colours stretched over 0-2 m of uncertainty
GIF_COMMENT = b"written by depthkit evaluate.py"  # --gif's marker (outputs.py): only such a file is ever replaced
GIF_FRAME_MS = 100  # --gif: 10 frames a second
GIF_PANEL_W = 512  # --gif: panels of larger images are shrunk to this width


def parse_intrinsics(text):
    """--intrinsics FX,FY,CX,CY: four finite numbers, FX and FY at least MIN_FOCAL_PX (argparse reports anything else
    in one line)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or min(values[:2]) < MIN_FOCAL_PX:
        raise argparse.ArgumentTypeError(f"must be FX,FY,CX,CY in pixels (four numbers, FX and FY at least "
                                         f"{MIN_FOCAL_PX:g}), got {text!r}")
    return tuple(values)


def get_parser():
    p = with_cli_conventions(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    a = p.add_argument
    a("--data", required=True, nargs="+", help="dataset root (with --split), ROOT/test or ROOT/rgb/test for that "
      "split, a split folder (rgb/ + depth/), a folder of images or image files (predictions only); several: joined")
    a("--ckpt", required=True, help="checkpoint from main.py (or a bare state dict with --model)")
    a("--split", default="test", help="split to use when --data is a dataset root")
    a("--model", default=None, help="model name for a bare state dict (python main.py --list-models)")
    a("--encoder", default=None, help="encoder name for a bare state dict")
    a("--head", default="clip", choices=HEADS, help="head for a bare state dict")
    a("--batch_size", type=positive_int, default=BATCH_SIZE, help="frames per batch (metrics do not depend on it "
                                                                 "except with --protocol course)")
    a("--protocol", default="split", choices=["split", "course", "resnet34_224"],
      help="split: over all pixels of the split (batch-size independent); "
      "course: mean over batches of per-batch RMSE/SSIM; resnet34_224: the ResNet-34 report's scoring, image and "
      "depth resized and centre-cropped to 224x224 first, then as split (not comparable with 144x256 scores)")
    a("--tta", default=None, choices=["none", "flip"],
      help="flip: average with the horizontally flipped prediction (default: what the checkpoint names, else none)")
    a("--out", default=None, help="write the metrics as JSON here")
    a("--save_dir", default=None, help="write per-image predictions, a per-image CSV and best/worst figures here")
    a("--ply", action="store_true", help="with --save_dir: also a coloured point cloud per frame, <frame>.ply "
      "(binary; camera coordinates x right, y down, z forward, metres; pixels at the 20 m clip left out)")
    a("--fov", type=flag_range(float, 0, 180, above=True, below=True), default=None,
      help=f"with --ply: the camera's horizontal field of view in degrees, square pixels, principal point at the "
      f"centre; unset: {UNREAL_FOV_DEG:g}, Unreal's default camera")
    a("--intrinsics", type=parse_intrinsics, default=None, metavar="FX,FY,CX,CY",
      help="with --ply: the pinhole camera in pixels of the depth map (pixel centres at integers), instead of --fov")
    a("--skip_bad", action="store_true",
      help="skip unreadable or inconsistent files and list them, instead of stopping")
    a("--allow_unusual_depth", action="store_true",
      help="score depth maps whose median is beyond 100 (not metres: millimetres?) clipped to [0, 20] anyway")
    a("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
      help="autocast dtype; auto: bf16 on GPUs and on CPUs with bf16 instructions")
    a("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when there is one)")
    a("--min_depth", type=flag_range(float, 0), default=0.0, help="score only pixels whose true depth is at least "
      "this many metres (metrics, depth bins, boundary F1, aligned metrics)")
    a("--max_depth", type=flag_range(float, 0, above=True), default=MAX_DEPTH,
      help="score only pixels whose true depth is at most this many metres")
    a("--exclude_clip", action="store_true", help="leave out the pixels at the 20 m clip (sky, beyond the range)")
    a("--align", default=None, choices=ALIGNMENTS, help="also report the metrics of each prediction aligned to its "
      "truth: median (one scale per image) or lstsq (scale and shift per image); beside the metric ones")
    a("--uncertainty", action="store_true", help="per-pixel uncertainty from the disagreement of the prediction and "
      "its flipped twin; prints how well it ranks the error (AUSE/AURG); with --save_dir <frame>_uncertainty.npy/.png")
    a("--gif", default=None, metavar="OUT.gif", help="numbered frames as an animated GIF: input | prediction "
      "(| signed error with ground truth) on one fixed 0-20 m scale, to see flicker")
    a("--compile", action="store_true",
      help="torch.compile the model (falls back to eager if it cannot): up to 1.9x faster CPU inference once "
           "compiled, but compiling takes 20-60 s (docs/speed.md): for many thousands of frames, not for one split")
    return p


def load_model(args, device):
    """The model a checkpoint describes (or --model for a bare state dict), weights loaded, in eval mode."""
    bare_model = {"name": args.model, "encoder": args.encoder, "head": args.head} if args.model else None
    ckpt = read_checkpoint(args.ckpt, bare_model=bare_model)
    config = dict(ckpt["model"])
    if args.tta is None:  # a shipped checkpoint names the test-time augmentation it was validated with
        args.tta = "flip" if ckpt.get("tta") == "flip" else "none"
    net = model_from_checkpoint(config, ckpt["state_dict"], args.ckpt)
    net.train_pixels = math.prod(checkpoint_train_hw(ckpt))  # much larger images (photos): about this many pixels
    return net.to(device).eval(), config


def evaluate_batches(model, batches, device, amp_dtype=None, channels_last=False, tta=False, on_batch=None,
                     valid_fn=None):
    """Metric totals (see `utils.add_sums`) of a model over (rgb, depth, ...) batches, under inference_mode.

    on_batch(pred_m, depth_m, sums, batch) is called for each batch (per-image outputs, per-batch protocols).
    valid_fn(depth_m): the bool mask of the pixels to score (`utils.depth_range_mask`); None: every pixel.
    """
    was_training = model.training
    model.eval()
    total = {}
    with torch.inference_mode():
        for batch in batches:
            rgb = batch[0].to(device, non_blocking=True)
            depth_m = batch[1].to(device, non_blocking=True)
            pred_m = predict_depth(model, rgb, depth_m.shape[-2:], tta, amp_dtype, channels_last)
            sums = metric_sums(pred_m, depth_m, valid_fn(depth_m) if valid_fn else None)
            add_sums(total, sums)
            if on_batch is not None:
                on_batch(pred_m, depth_m, sums, batch)
    model.train(was_training)
    return total


def resize_center_crop(x, resize_hw, crop_hw):
    """torchvision's Resize(resize_hw) then CenterCrop(crop_hw) on [B,C,H,W] (image or depth): the antialiased
    bilinear resize of `fit_input`, then the centred crop_hw window (torchvision's rounding)."""
    x = fit_input(x, resize_hw)
    top, left = int(round((x.shape[-2] - crop_hw[0]) / 2)), int(round((x.shape[-1] - crop_hw[1]) / 2))
    return x[..., top:top + crop_hw[0], left:left + crop_hw[1]]


def report_224_batches(batches):
    """--protocol resnet34_224: the ResNet-34 report's Resize((224, 224)) + CenterCrop((224, 224)) of image and depth
    (the crop keeps all of a 224x224 resize: the frame is squeezed, not cut); batches otherwise as they come."""
    for rgb, depth_m, *rest in batches:
        yield resize_center_crop(rgb, (224, 224), (224, 224)), resize_center_crop(depth_m, (224, 224), (224, 224)), \
            *rest


def frame_batches(ds, batch_size, indices=None, progress=False):
    """(rgb, depth, indices) batches of a dataset's frames (all, or `indices`) in order; a batch is also cut where
    the image size changes or it would hold more than MAX_BATCH_PIXELS pixels. Frames with no depth map get a
    zero map, so predictions come at the image's size."""
    rgbs, depths, idx = [], [], []
    for i in tqdm(range(len(ds)) if indices is None else indices, desc="evaluating", disable=not progress,
                  dynamic_ncols=True):
        rgb, depth = ds.load(i)
        if not depth.numel():
            depth = torch.zeros(1, *rgb.shape[-2:])
        if rgbs and (rgb.shape != rgbs[0].shape or len(rgbs) == batch_size
                     or (len(rgbs) + 1) * rgb[0].numel() > MAX_BATCH_PIXELS):
            yield torch.stack(rgbs), torch.stack(depths), idx
            rgbs, depths, idx = [], [], []
        rgbs.append(rgb)
        depths.append(depth)
        idx.append(i)
    if rgbs:
        yield torch.stack(rgbs), torch.stack(depths), idx


def output_files(name):
    """The files --save_dir may get for a frame: its predictions, and its figure if it is among the best/worst."""
    return {"npy": f"{name}.npy", "png": f"{name}.png", "color": f"{name}_color.png", "ply": f"{name}.ply",
            "best": f"best_{name}.png", "worst": f"worst_{name}.png", "error": f"{name}_error.png",
            "uncertainty": f"{name}_uncertainty.npy", "uncertainty_png": f"{name}_uncertainty.png"}


def refuse_colliding_outputs(names):
    """UserError before anything is written when two frames' --save_dir files share a name (a frame '2_color'
    beside a frame '2'), or a frame's would be one of evaluate.py's own: a prediction would be lost."""
    owner = {"per_image.csv": None, MARKER: None}
    for name in names:
        for file in output_files(name).values():
            if file.casefold() in owner:
                other = owner[file.casefold()]
                raise UserError(f"--save_dir: frames '{other}' and '{name}' would both write {file}; rename one"
                                if other is not None else f"--save_dir: frame '{name}' would write {file}, "
                                f"which evaluate.py writes itself; rename it")
            owner[file.casefold()] = name


def save_prediction(save_dir, name, pred_m):
    """<name>.npy (float32 metres), <name>.png (16-bit millimetres), <name>_color.png (coloured)."""
    pred, files = pred_m.astype(np.float32), output_files(name)
    atomic_write(os.path.join(save_dir, files["npy"]), lambda f: np.save(f, pred))
    # NaN (NaN weights): 0, no data
    mm = Image.fromarray(np.round(np.nan_to_num(pred, nan=0.0) * 1000).astype(np.uint16))
    atomic_write(os.path.join(save_dir, files["png"]), lambda f: mm.save(f, format="PNG"))
    color = Image.fromarray(depth_colors(pred))
    atomic_write(os.path.join(save_dir, files["color"]), lambda f: color.save(f, format="PNG"))


# ------------------------------------------------------------------------------------------------
# --ply: the prediction back-projected through a pinhole camera

def camera_intrinsics(hw, fov_deg=None, intrinsics=None):
    """(fx, fy, cx, cy) in pixels of a depth map of size hw, pixel centres at integers: --intrinsics as given, else
    from the horizontal field of view (default Unreal's 90 degrees), square pixels, the principal point central."""
    if intrinsics is not None:
        return tuple(intrinsics)
    h, w = hw
    fx = (w / 2) / math.tan(math.radians(fov_deg or UNREAL_FOV_DEG) / 2)
    return fx, fx, (w - 1) / 2, (h - 1) / 2


def backproject(depth_m, camera):
    """Points [H*W, 3] (float64, metres, camera coordinates: x right, y down, z forward) of a planar z-depth map
    [H, W]: X = (u - cx) * Z / fx, Y = (v - cy) * Z / fy, Z = depth, row-major."""
    fx, fy, cx, cy = camera
    v, u = np.mgrid[0:depth_m.shape[0], 0:depth_m.shape[1]]
    z = depth_m.astype(np.float64)
    return np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1).reshape(-1, 3)


def ply_bytes(points, colors_u8):
    """A binary little-endian PLY of points [N, 3] (stored float32) with colours [N, 3] uint8."""
    vertex = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                          ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for k, name in enumerate("xyz"):
        vertex[name] = points[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        vertex[name] = colors_u8[:, k]
    header = ("ply\nformat binary_little_endian 1.0\ncomment depthkit evaluate.py: camera coordinates, metres, "
              f"x right, y down, z forward\nelement vertex {len(points)}\nproperty float x\nproperty float y\n"
              "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    return header.encode() + vertex.tobytes()


def save_point_cloud(save_dir, name, pred_m, rgb, camera_args):
    """<name>.ply: the prediction pred_m [H, W] back-projected, coloured by rgb [3, h, w] in [0, 1] resized to
    [H, W]; pixels at the clip (>= 20 m: sky, beyond the range) and non-finite or zero depths left out."""
    camera = camera_intrinsics(pred_m.shape, *camera_args)
    keep = (np.isfinite(pred_m) & (pred_m > 0) & (pred_m < MAX_DEPTH)).reshape(-1)
    rgb_u8 = (fit_input(rgb[None].float(), pred_m.shape)[0].clamp(0, 1) * 255).round().byte()
    colors = rgb_u8.permute(1, 2, 0).reshape(-1, 3).numpy()
    data = ply_bytes(backproject(pred_m, camera)[keep], colors[keep])
    atomic_write(os.path.join(save_dir, output_files(name)["ply"]), lambda f: f.write(data))


# ------------------------------------------------------------------------------------------------
# flicker: excess frame-to-frame change of the prediction where the truth is static (sequence-level)

def are_neighbours(name_a, name_b):
    """Whether frame b follows frame a in a sequence: both names end in a number, with the same prefix, b's number
    one more than a's ('41' -> '42', 'cam1_0009' -> 'cam1_0010'). A gap in the numbers is a cut."""
    a, b = FRAME_NUMBER.match(name_a), FRAME_NUMBER.match(name_b)
    return bool(a and b) and a[1] == b[1] and int(b[2]) == int(a[2]) + 1


def flicker_sums(pred_a, depth_a, pred_b, depth_b):
    """Sums of one neighbouring pair (metres, any same shape): pairs, static pixels (|depth_b - depth_a| < STATIC_M),
    and |pred_b - pred_a| and |depth_b - depth_a| summed over those pixels."""
    depth_change = (depth_b.double() - depth_a.double()).abs()
    static = depth_change < STATIC_M
    pred_change = (pred_b.double() - pred_a.double()).abs()
    return {"pairs": 1, "static_pixels": static.sum(), "pred_change": pred_change[static].sum(),
            "depth_change": depth_change[static].sum()}


def add_flicker(total, previous, name, pred_m, depth_m):
    """Add the pair (previous frame, this one) to the flicker totals when they are neighbours of one size; returns
    this frame, the next one's previous. Only the previous frame is kept, never the whole sequence."""
    if previous is not None and are_neighbours(previous[0], name) and previous[1].shape == pred_m.shape:
        add_sums(total, flicker_sums(previous[1], previous[2], pred_m, depth_m))
    return name, pred_m, depth_m


def summarize_flicker(total):
    """{flicker, flicker_pairs}: mean |pred change| minus mean |true change| over the static pixels of every
    neighbouring pair (metres; 0 for a prediction that changes only as the truth does); NaN with no static pixel."""
    n = total.get("static_pixels", 0.0)
    flicker = (total["pred_change"] - total["depth_change"]) / n if n else math.nan
    return {"flicker": flicker, "flicker_pairs": int(total.get("pairs", 0))}


# ------------------------------------------------------------------------------------------------
# beyond the split's metrics: errors by depth range, boundary F1, aligned metrics, uncertainty (docs/evaluation.md)

def flip_uncertainty(net, rgb, out_hw, amp_dtype=None, channels_last=False):
    """Per-pixel uncertainty [B,1,H,W] in metres: half the |difference| between the prediction and its flipped twin
    (the prediction of the mirrored image, mirrored back), i.e. the standard deviation of the two."""
    plain = predict_depth(net, rgb, out_hw, False, amp_dtype, channels_last)
    twin = predict_depth(net, rgb.flip(-1), out_hw, False, amp_dtype, channels_last).flip(-1)
    return 0.5 * (plain - twin).abs()


def add_extras(extras, pred_m, depth_m, valid, align=None, uncertainty_m=None):
    """Add one batch to the running totals of `summarize_extras`: depth-bin sums, boundary F1 (a mean over images),
    the metric sums of the aligned prediction, and each image's sparsification errors of the uncertainty."""
    add_sums(extras.setdefault("bins", {}), depth_bin_sums(pred_m, depth_m, valid))
    f1 = boundary_f1(pred_m, depth_m, valid)
    add_sums(extras.setdefault("boundary", {}), {"f1": f1, "images": torch.ones_like(f1)})
    if align:
        aligned = align_depth(pred_m, depth_m, align, valid)
        add_sums(extras.setdefault("aligned", {}), metric_sums(aligned, depth_m, valid))
    for j in range(len(pred_m) if uncertainty_m is not None else 0):
        keep = valid[j] if valid is not None else torch.ones_like(depth_m[j], dtype=torch.bool)
        if keep.any():
            s = sparsification((pred_m[j] - depth_m[j]).abs()[keep], uncertainty_m[j][keep])
            add_sums(extras.setdefault("sparsification", {}), {"ause": s["ause"], "aurg": s["aurg"], "images": 1})


def summarize_extras(extras, align=None):
    """{depth_bins, boundary_f1, aligned, uncertainty} for --out (aligned and uncertainty only when asked)."""
    out = {"depth_bins": summarize_bins(extras["bins"]),
           "boundary_f1": extras["boundary"]["f1"] / extras["boundary"]["images"]}
    if align:
        out["aligned"] = dict(summarize(extras["aligned"]), align=align)
    if "sparsification" in extras:
        s = extras["sparsification"]
        out["uncertainty"] = {"method": "flip disagreement", "ause_rmse": s["ause"] / s["images"],
                              "aurg_rmse": s["aurg"] / s["images"], "frames": int(s["images"])}
    return out


def print_extras(out):
    cell = lambda v, width, sign="": f"{v:{sign}{width}.3f}" if v is not None else "-".rjust(width)  # empty bin: -
    print(f"{'boundary_f1':<14}{out['boundary_f1']:>7.4f}  (F1 of depth edges, as Depth Pro's; docs/evaluation.md)")
    print(f"{'true depth':<14}{'share':>7}{'rmse':>8}{'bias':>8}{'sq err':>8}   (bias: mean pred - gt, m; sq err: "
          "share of the squared error)")
    for row in out["depth_bins"]:
        print(f"{row['bin']:<14}{cell(row['share'], 7)}{cell(row['rmse'], 8)}{cell(row['bias'], 8, '+')}"
              f"{cell(row['sq_err_share'], 8)}")
    if "aligned" in out:
        print(f"aligned per image by {out['aligned']['align']} (beside the metric values above, never instead):")
        for k in METRIC_NAMES:
            print(f"{k:<10}{out['aligned'][k]:>10.4f}")
    if "uncertainty" in out:
        u = out["uncertainty"]
        print(f"uncertainty (flip disagreement): AUSE {u['ause_rmse']:.4f} m, AURG {u['aurg_rmse']:+.4f} m (RMSE "
              f"sparsification, mean over {u['frames']} frames; AURG <= 0: it ranks the error no better than chance)")


def save_frame_extras(save_dir, name, pred, depth, uncertainty):
    """<name>_error.png (signed error pred - gt, coloured, with ground truth) and <name>_uncertainty.npy/.png."""
    files = output_files(name)
    if depth is not None:
        err = Image.fromarray(error_colors(pred - depth))
        atomic_write(os.path.join(save_dir, files["error"]), lambda f: err.save(f, format="PNG"))
    if uncertainty is not None:
        unc = uncertainty.astype(np.float32)
        atomic_write(os.path.join(save_dir, files["uncertainty"]), lambda f: np.save(f, unc))
        png = Image.fromarray(depth_colors(unc * (MAX_DEPTH / UNCERTAINTY_PNG_M)))
        atomic_write(os.path.join(save_dir, files["uncertainty_png"]), lambda f: png.save(f, format="PNG"))


# ------------------------------------------------------------------------------------------------
# --gif: a sequence as one animated picture

def check_gif(path, names):
    """UserError before anything is written: not a .gif name, a file there evaluate.py did not write, or frames
    that are not numbered (a GIF of a sequence needs its order)."""
    if not path.lower().endswith(".gif"):
        raise UserError(f"--gif {path}: the name must end in .gif")
    refuse_unless_ours(path, gif_is_ours, f"--gif {path}: file exists and was not written by evaluate.py; "
                       "choose another path")
    unnumbered = [n for n in names if not FRAME_NUMBER.match(n)]
    if unnumbered:
        raise UserError(f"--gif: {len(unnumbered)} frame(s) without a frame number (e.g. '{unnumbered[0]}'); a GIF "
                        "needs numbered frames (names ending in a number)")


def gif_is_ours(path):
    try:
        with Image.open(path) as img:
            return img.info.get("comment") == GIF_COMMENT
    except Exception:  # noqa: BLE001
        return False


def gif_frame(rgb, pred, depth, size=None):
    """One GIF frame (palette image): input | prediction (| signed error when depth is not None), each panel at
    `size` (W, H; default the prediction's, at most GIF_PANEL_W wide), depth on the fixed 0-20 m scale."""
    h, w = pred.shape
    size = size or (min(w, GIF_PANEL_W), max(1, round(h * min(w, GIF_PANEL_W) / w)))
    rgb_u8 = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    panels = [Image.fromarray(rgb_u8), Image.fromarray(depth_colors(pred))]
    if depth is not None:
        panels.append(Image.fromarray(error_colors(pred - depth)))
    strip = np.concatenate([np.asarray(p.resize(size, Image.BILINEAR)) for p in panels], axis=1)
    return Image.fromarray(strip).quantize(256)


def write_gif(path, frames):
    data = io.BytesIO()
    frames[0].save(data, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0,
                   comment=GIF_COMMENT)
    atomic_write(path, lambda f: f.write(data.getvalue()))


def open_data(args):
    """The frames --data names: one dataset/folder/image, or several joined in the order given. Image files given
    one by one are decoded up front, so a file that is not an image stops the run before anything is written."""
    paths = args.data if isinstance(args.data, list) else [args.data]
    parts = [DepthDataset(path, split=args.split, skip_bad=args.skip_bad, progress=sys.stderr.isatty(),
                          allow_unusual_depth=args.allow_unusual_depth) for path in paths]
    for path in paths:
        if os.path.isfile(path) and not args.skip_bad:  # --skip_bad: DepthDataset has decoded (and listed) them
            load_rgb_uint8(path)
    if len(parts) == 1:
        return parts[0]
    with_depth = [p.data_dir for p in parts if p.has_depth]
    if with_depth and len(with_depth) < len(parts):
        raise UserError(f"--data: {with_depth[0]} has depth maps but "
                        f"{next(p.data_dir for p in parts if not p.has_depth)} has none; score them separately")
    ds = copy.copy(parts[0])
    ds.names = [n for p in parts for n in p.names]
    ds.rgb_paths = [r for p in parts for r in p.rgb_paths]
    ds.depth_paths = [d for p in parts for d in p.depth_paths] if with_depth else None
    ds.skipped = [s for p in parts for s in p.skipped]
    return ds


def check_outputs(args):
    """Refuse to overwrite anything evaluate.py did not write itself, and flags that go nowhere."""
    if (args.fov is not None or args.intrinsics is not None) and not args.ply:
        raise UserError("--fov and --intrinsics set the camera of --ply; pass --ply too")
    if args.ply and not args.save_dir:
        raise UserError("--ply writes <frame>.ply into --save_dir; pass --save_dir DIR")
    if args.fov is not None and args.intrinsics is not None:
        raise UserError("--fov and --intrinsics both describe the camera; pass one")
    if args.min_depth >= args.max_depth:
        raise UserError(f"--min_depth {args.min_depth:g} must be below --max_depth {args.max_depth:g}")
    if args.save_dir and folder_is_busy(args.save_dir):  # another evaluate.py writing it now: say so, whatever it holds
        raise UserError(busy_save_dir(args.save_dir))
    if args.save_dir and entries_in_the_way(args.save_dir, MARKER, None):
        raise UserError(f"--save_dir {args.save_dir}: folder exists and holds files evaluate.py did not write; "
                        "choose another")
    if args.out:
        refuse_link(args.out, "--out")
        refuse_unless_ours(args.out, out_is_ours, f"--out {args.out}: file exists and was not written by evaluate.py; "
                           "choose another path")


def out_is_ours(path):
    try:
        with open(path) as f:
            return json.load(f).get("written_by") == "evaluate.py"
    except (OSError, ValueError, AttributeError):
        return False


def busy_save_dir(save_dir):
    return (f"--save_dir {save_dir}: another evaluate.py is writing this folder now; wait for it, or choose another "
            "folder")


def claim_save_dir(save_dir):
    """Claim --save_dir for this run by the overwrite policy (outputs.py; another evaluate.py writing it now:
    UserError), clear the temp files a killed run left, and mark the folder ours and in progress (MARKER reads
    'complete' once every file of a run is written)."""
    lock = claim_folder(save_dir, MARKER, b"evaluate.py output: in progress\n", None)
    if lock is None:
        raise UserError(busy_save_dir(save_dir))
    remove_stale_temps(save_dir)
    HELD_LOCKS.append(lock)  # let go in main() when the run ends (and by the kernel when the process dies)
    return lock


def mark_complete(save_dir):
    atomic_write(os.path.join(save_dir, MARKER), lambda f: f.write(b"evaluate.py output: complete\n"))


def run(args):
    paths = args.data if isinstance(args.data, (list, tuple)) else [args.data]
    args.data = paths[0] if len(paths) == 1 else list(paths)  # one path is printed and written as before
    check_outputs(args)
    device = pick_device(args.device)
    amp_dtype, channels_last, why = precision_and_layout(device, args.amp)
    net, config = load_model(args, device)
    nonfinite = nonfinite_tensors(net.state_dict())
    if nonfinite:
        print(f"warning: {args.ckpt}: {len(nonfinite)} tensor(s) hold NaN/inf (e.g. {nonfinite[0]}); "
              "predictions will be wrong",
              file=sys.stderr)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    ds = open_data(args)
    if args.align and not ds.has_depth:
        raise UserError(f"--align {args.align}: {ds.data_dir} has no depth maps to align to")
    if args.gif:
        check_gif(args.gif, ds.names)
    print(f"model {config['name']} from {args.ckpt} on {device} ({why}); {len(ds)} frames from {args.data}"
          + (f"; tta {args.tta}" if args.tta != "none" else ""))
    for path, reason in ds.skipped:
        print(f"skipped: {reason}")
    if args.save_dir:
        refuse_colliding_outputs(ds.names)
        claim_save_dir(args.save_dir)

    per_image, per_batch, flicker_total, previous, extras, gif = [], [], {}, None, {}, []
    valid_fn = lambda depth_m: depth_range_mask(depth_m, args.min_depth, args.max_depth, args.exclude_clip)
    no_pixels = dict.fromkeys(METRIC_NAMES, math.nan)  # a frame with no pixel in --min_depth/--max_depth

    def on_batch(pred_m, depth_m, sums, batch):
        nonlocal previous
        idx = batch[2]
        uncertainty = flip_uncertainty(net, batch[0].to(device), pred_m.shape[-2:], amp_dtype, channels_last) \
            if args.uncertainty else None
        if ds.has_depth:
            if sums["pixels"].sum():
                per_batch.append(summarize({k: float(v.sum()) for k, v in sums.items()}))
            for j, i in enumerate(idx):
                one = {k: float(v[j]) for k, v in sums.items()}
                per_image.append((i, summarize(one) if one["pixels"] else no_pixels))
                previous = add_flicker(flicker_total, previous, ds.names[i], pred_m[j], depth_m[j])
            add_extras(extras, pred_m, depth_m, valid_fn(depth_m), args.align, uncertainty)
        for j, i in enumerate(idx):
            pred = pred_m[j, 0].float().cpu().numpy()
            depth = depth_m[j, 0].float().cpu().numpy() if ds.has_depth else None
            if args.gif:
                gif.append(gif_frame(batch[0][j], pred, depth, (gif[0].width // (2 + ds.has_depth), gif[0].height)
                                     if gif else None))
            if args.save_dir:
                save_prediction(args.save_dir, ds.names[i], pred)
                save_frame_extras(args.save_dir, ds.names[i], pred, depth,
                                  uncertainty[j, 0].float().cpu().numpy() if uncertainty is not None else None)
                if args.ply:
                    save_point_cloud(args.save_dir, ds.names[i], pred, batch[0][j], (args.fov, args.intrinsics))

    batches = frame_batches(ds, args.batch_size, progress=sys.stderr.isatty())
    if args.protocol == "resnet34_224":
        batches = report_224_batches(batches)
    total = evaluate_batches(compile_or_eager(net) if args.compile else net, batches, device, amp_dtype, channels_last,
                             args.tta == "flip", on_batch=on_batch, valid_fn=valid_fn)
    if ds.has_depth and not total.get("pixels"):
        raise UserError(f"--min_depth {args.min_depth:g} --max_depth {args.max_depth:g}"
                        f"{' --exclude_clip' if args.exclude_clip else ''}: no pixel of {ds.data_dir} is in that range")
    if ds.has_depth:
        if args.protocol != "course":
            metrics = summarize(total)
            what = "split: over all pixels of all frames (batch-size independent)"
            if args.protocol == "resnet34_224":
                what = ("resnet34_224: image and depth resized to 224x224 (the report's Resize + CenterCrop), then "
                        "over all pixels (not comparable with scores at the frames' own size)")
        else:
            metrics = {k: float(np.mean([b[k] for b in per_batch])) for k in METRIC_NAMES}
            what = f"course: mean over {len(per_batch)} batches of {args.batch_size} of per-batch metrics"
        flicker = summarize_flicker(flicker_total)
        print(f"protocol {what}")
        print(f"{'metric':<10}{'value':>10}")
        for k in METRIC_NAMES:
            print(f"{k:<10}{metrics[k]:>10.4f}")
        value = f"{flicker['flicker']:>10.4f}" if math.isfinite(flicker["flicker"]) else f"{'n/a':>10}"
        print(f"{'flicker':<10}{value}  (m, over {flicker['flicker_pairs']} neighbouring frame pairs; docs/flicker.md)")
        extras = summarize_extras(extras, args.align)
        print_extras(extras)
    else:  # no depth maps: the metrics are null in --out, the predictions are counted
        metrics = {k: math.nan for k in METRIC_NAMES}
        flicker = {"flicker": math.nan, "flicker_pairs": 0}
        print(f"{args.data}: images only (no depth maps): {len(ds)} predictions made, no metrics"
              + (f"; written to {args.save_dir}" if args.save_dir else "; pass --save_dir to keep them"))
    finite = all(math.isfinite(metrics[k]) for k in METRIC_NAMES)
    result = dict({k: v if math.isfinite(v) else None for k, v in dict(metrics, **flicker).items()},  # NaN: null
                  protocol=args.protocol, frames=len(ds), predictions=len(ds), tta=args.tta, ckpt=args.ckpt,
                  data=args.data, skipped=[{"file": p, "reason": r} for p, r in ds.skipped], written_by="evaluate.py",
                  scored={"min_depth": args.min_depth, "max_depth": args.max_depth, "exclude_clip": args.exclude_clip},
                  **(extras if ds.has_depth else {}))
    if args.out:
        atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=2).encode()))
        print(f"wrote {args.out}")
    if args.gif:
        write_gif(args.gif, gif)
        print(f"wrote {args.gif} ({len(gif)} frames)")
    if args.save_dir and ds.has_depth:
        write_per_image(args.save_dir, ds, per_image, net, device, amp_dtype, args)
        print(f"wrote predictions, per_image.csv and best/worst figures to {args.save_dir}")
    if args.save_dir:  # the last file written: a folder reads 'complete' only once all of a run's files are there
        mark_complete(args.save_dir)
    if not ds.has_depth:
        return 0
    if not finite:  # never a NaN metric with exit status 0; the NaN-weights warning above already said why
        if not nonfinite:
            print(f"error: {args.ckpt}: the predictions hold NaN/inf, so the metrics are not numbers", file=sys.stderr)
        return 3
    return 0


def write_per_image(save_dir, ds, per_image, net, device, amp_dtype, args):
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["frame"] + METRIC_NAMES)
    for i, m in per_image:
        w.writerow([ds.names[i]] + [f"{m[k]:.6f}" for k in METRIC_NAMES])
    atomic_write(os.path.join(save_dir, "per_image.csv"), lambda f: f.write(text.getvalue().encode()))
    ranked = sorted(per_image, key=lambda t: t[1]["rmse"])
    picks = [("best", r) for r in ranked[:3]] + [("worst", r) for r in ranked[::-1][:3]]
    with torch.inference_mode():
        for tag, (i, m) in picks:
            rgb, depth = ds.load(i)
            pred = predict_depth(net, rgb[None].to(device), depth.shape[-2:], args.tta == "flip", amp_dtype)[0].cpu()
            visualize_img(rgb, depth, pred, os.path.join(save_dir, output_files(ds.names[i])[tag]),
                          title=f"{tag}: frame {ds.names[i]}, RMSE {m['rmse']:.3f} m, SSIM {m['ssim']:.3f}")


def main(argv=None, parser=None, command=None):
    """evaluate.py's command line (or another's parser and run function: compare.py): a UserError or OSError is one
    line on stderr and exit status 2."""
    args = (parser or get_parser()).parse_args(argv)
    try:
        return (command or run)(args)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        while HELD_LOCKS:
            unlock(HELD_LOCKS.pop())


if __name__ == "__main__":
    sys.exit(main())
