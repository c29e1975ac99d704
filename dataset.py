"""DepthEstimationUnreal reading: pairing by frame name, loading, caching, paired augmentation, and the training
batches (each epoch's sample order, batches on the device).

Layouts accepted for `DepthDataset(data_dir, split)` / `find_pairs(data_dir, split)`:
  DATA/rgb/<split>/<frame>.jpeg + DATA/depth/<split>/<frame>.npy   (the dataset root)
  SPLIT/rgb/<frame>.jpeg + SPLIT/depth/<frame>.npy                 (a split folder given directly)
  DATA/<split> (no such folder) or DATA/rgb/<split>                 (read as DATA with that split)
  FOLDER/<frame>.jpeg or FOLDER/rgb/<frame>.jpeg, no depth          (images only, for prediction)
  PHOTO.jpg                                                        (one image file, for prediction)
Images may be .jpeg/.jpg, .png, .bmp, .tif/.tiff or .webp (any case), read as displayed: EXIF orientation applied,
transparency over white. Frames are paired by name and sorted numerically (9 before 10); two names of one number
in a folder ('0001' and '1') are refused.
Items are (rgb, depth): rgb float32 [3,H,W] in [0,1]; depth float32 [1,H,W] metres clipped to
[0, 20] (an empty tensor for image-only folders).
"""
import copy
import math
import os
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from utils import MAX_DEPTH, UserError, first_line, refuse_special_file

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEPTH_EXT = ".npy"
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused from their header, before decoding (a 12 MP photo is fine)
MIN_IMAGE_SIDE = 8  # pixels; a smaller image (an icon, a 1x1 tracking pixel) is refused: nothing to predict on
EXIF_ORIENTATION = 0x0112
TURN = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90}  # EXIF orientation -> what turns the stored pixels as viewers show them
UNUSUAL_DEPTH = 100.0  # metres; a depth map whose median valid (> 0) value is beyond it is not in metres


def frame_sort_key(name):
    """Natural order: '9' < '10' < '10a' < 'b2'; numbers compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t != ""]


def _files(folder, exts):
    if not os.path.isdir(folder):
        return {}
    out, by_key = {}, {}
    for fname in os.listdir(folder):
        stem, ext = os.path.splitext(fname)
        if ext.lower() in exts and not fname.startswith("."):
            if stem in out:
                raise UserError(f"{folder}: two files for frame '{stem}' ({os.path.basename(out[stem])}, {fname})")
            out[stem] = os.path.join(folder, fname)
            other = by_key.setdefault(tuple(frame_sort_key(stem)), stem)
            if other != stem:  # '0001' and '1': their order (and pairing by name) would be a coin toss
                raise UserError(f"{folder}: frames '{other}' and '{stem}' are one number written two ways "
                                f"({os.path.basename(out[other])}, {fname}); rename one")
    return out


def _layout(data_dir, split):
    """(rgb folder, depth folder or None) for the layouts in the module docstring, plus two spellings of a split
    of a dataset root: ROOT/test (not a folder) for ROOT/rgb/test + ROOT/depth/test, and ROOT/rgb/test itself."""
    path = os.path.normpath(data_dir)
    parent, name = os.path.split(path)
    if not os.path.isdir(path):
        if _files(os.path.join(parent, "rgb", name), IMAGE_EXTS):  # ROOT/test: the split of ROOT
            return _layout(parent or ".", name)
        raise UserError(f"{data_dir}: data folder not found (nor {os.path.join(parent, 'rgb', name)}/)")
    if os.path.basename(parent) == "rgb" and os.path.isdir(os.path.join(os.path.dirname(parent), "depth", name)):
        return path, os.path.join(os.path.dirname(parent), "depth", name)  # ROOT/rgb/test: pair with ROOT/depth/test
    candidates = [(os.path.join(path, "rgb", split), os.path.join(path, "depth", split))] if split else []
    candidates.append((os.path.join(path, "rgb"), os.path.join(path, "depth")))
    for rgb_dir, depth_dir in candidates:
        if _files(rgb_dir, IMAGE_EXTS):
            return rgb_dir, (depth_dir if os.path.isdir(depth_dir) else None)
    if _files(path, IMAGE_EXTS):
        return path, None
    where = f"rgb/{split}/, " if split else ""
    rgb_root = os.path.join(path, "rgb")
    splits = sorted(d for d in os.listdir(rgb_root) if os.path.isdir(os.path.join(rgb_root, d))) \
        if os.path.isdir(rgb_root) else []
    hint = f"; splits here: {', '.join(splits)} (pick one with --split)" if splits else ""
    raise UserError(f"{data_dir}: no images found (looked for .jpeg/.jpg/.png in {where}rgb/ and the folder "
                    f"itself; also .bmp/.tif/.tiff/.webp){hint}")


def find_pairs(data_dir, split=None):
    """Sorted frame names, image paths and depth paths (None for an image-only folder or one image file)."""
    if os.path.isfile(data_dir):  # one image (evaluate.py --data photo.jpg): named by its file name
        stem, ext = os.path.splitext(os.path.basename(data_dir))
        if ext.lower() not in IMAGE_EXTS:
            raise UserError(f"{data_dir}: not an image file (expected {', '.join(IMAGE_EXTS)}) nor a data folder")
        return [stem], [os.fspath(data_dir)], None
    rgb_dir, depth_dir = _layout(os.fspath(data_dir), split)
    images = _files(rgb_dir, IMAGE_EXTS)
    if depth_dir is None:
        names = sorted(images, key=frame_sort_key)
        return names, [images[n] for n in names], None
    depths = _files(depth_dir, (DEPTH_EXT,))
    no_depth = sorted(set(images) - set(depths), key=frame_sort_key)
    no_image = sorted(set(depths) - set(images), key=frame_sort_key)
    if no_depth or no_image:
        parts = []
        if no_depth:
            parts.append(f"{len(no_depth)} image(s) without depth in {depth_dir} (e.g. {', '.join(no_depth[:3])})")
        if no_image:
            parts.append(f"{len(no_image)} depth map(s) without image in {rgb_dir} (e.g. {', '.join(no_image[:3])})")
        raise UserError(f"{data_dir}: unpaired frames: " + "; ".join(parts))
    names = sorted(images, key=frame_sort_key)
    return names, [images[n] for n in names], [depths[n] for n in names]


def _check_file(path):
    """UserError for a named pipe, device or socket (opening one may block forever) and for a 0-byte file (an
    interrupted copy), which the decoders report obscurely."""
    refuse_special_file(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file (0 bytes)")


def _unreadable(path, what, e):
    if isinstance(e, PermissionError):
        return UserError(f"{path}: unreadable {what} (no permission to read it)")
    detail = first_line(e) if str(e).strip() else "corrupt"
    return UserError(f"{path}: unreadable {what} ({type(e).__name__}: {detail})")


def exif_orientation(img):
    """An open image's EXIF orientation (1-8; 1 for none, and for EXIF data too damaged to read)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels as stored
        return 1
    return value if value in TURN else 1


def image_hw(path):
    """(H, W) of an image from its header alone (nothing decoded); UserError naming the file when it is not a
    regular file, empty, unreadable or over MAX_IMAGE_PIXELS pixels."""
    _check_file(path)
    try:
        with warnings.catch_warnings():  # PIL's own bomb check warns (or refuses) at a higher limit than ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if exif_orientation(img) >= 5:  # turned by 90 degrees when displayed
                    w, h = h, w
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: image too large ({first_line(e)}); the limit is "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels") from None
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, "image", e) from None
    if h * w > MAX_IMAGE_PIXELS:
        raise UserError(f"{path}: image is {w}x{h} ({h * w / 1e6:.0f} megapixels), over the limit of "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f}; downscale it first")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise UserError(f"{path}: image is {w}x{h} pixels, too small to predict depth on (at least {MIN_IMAGE_SIDE} "
                        "a side)")
    return h, w


def load_rgb_uint8(path):
    """HxWx3 uint8 array of the image as viewers show it: turned by its EXIF orientation; grayscale, palette and CMYK
    converted to RGB; transparency composited over white. UserError naming the file if unreadable, or if it is a
    16/32-bit or float single-channel image (a depth PNG?), which would clip to white. The checks of `image_hw` come
    first, so nothing is decoded that they refuse."""
    image_hw(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode, turn = img.mode, TURN.get(exif_orientation(img))
            rgb = None
            if not mode.startswith(("I", "F")):
                if "A" in mode or "transparency" in img.info:
                    img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
                img = img.convert("RGB")
                rgb = np.array(img.transpose(turn) if turn is not None else img, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, "image", e) from None
    if rgb is None:
        raise UserError(f"{path}: a {mode} image (16/32-bit or float, single channel; a depth map?), "
                        "not an 8-bit RGB image")
    return rgb


def load_depth_m(path, hw=None, allow_unusual=False):
    """HxW float32 metres clipped to [0, 20]. UserError naming the file on a bad file, shape or value: NaN/inf,
    negative depth, or (unless allow_unusual) a median valid depth beyond UNUSUAL_DEPTH (millimetres?). The
    dataset's own conventions (sky up to 100 m, clipped to 20) pass."""
    _check_file(path)
    try:
        depth = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, "depth file", e) from None
    if not isinstance(depth, np.ndarray) or depth.dtype.kind != "f":
        integer = isinstance(depth, np.ndarray) and depth.dtype.kind in "ui"
        raise UserError(f"{path}: depth must be a float array of metres, got dtype "
                        f"{getattr(depth, 'dtype', type(depth).__name__)}"
                        + ("; integer depth is usually millimetres from a depth sensor: save it as float32 depth / "
                           "1000" if integer else ""))
    if depth.ndim == 3 and 1 in (depth.shape[0], depth.shape[-1]):
        depth = depth.reshape(depth.shape[1:] if depth.shape[0] == 1 else depth.shape[:-1])
    if depth.ndim != 2:
        raise UserError(f"{path}: depth must be a 2-D HxW map, got shape {depth.shape}")
    if hw is not None and tuple(depth.shape) != tuple(hw):
        turned = " (turned by 90 degrees: images are read as displayed, EXIF orientation applied; save the depth " \
            "map that way too)" if tuple(depth.shape) == tuple(hw)[::-1] else ""
        raise UserError(f"{path}: depth map is {depth.shape[0]}x{depth.shape[1]} "
                        f"but its image is {hw[0]}x{hw[1]} (HxW){turned}")
    bad = ~np.isfinite(depth)
    if bad.any():
        sky = " (+inf for sky? store a finite depth beyond the range, as the dataset's 100 m)" \
            if np.isposinf(depth).any() else ""
        raise UserError(f"{path}: depth has {int(bad.sum())} NaN/inf value(s){sky}")
    negative = depth < 0
    if negative.any():
        raise UserError(f"{path}: depth has {int(negative.sum())} negative value(s) (min {depth.min():g}); "
                        f"depth must be metres >= 0")
    valid = depth[depth > 0]
    median = float(np.median(valid)) if valid.size else 0.0
    if median > UNUSUAL_DEPTH and not allow_unusual:
        raise UserError(f"{path}: median depth {median:g} is far beyond {UNUSUAL_DEPTH:g} m, so not metres "
                        f"(millimetres?); convert it, or pass --allow_unusual_depth to use it clipped to "
                        f"[0, {MAX_DEPTH:g}]")
    return np.clip(depth.astype(np.float32), 0.0, MAX_DEPTH)


AUGMENTS = ("flip", "jitter", "geo", "photo", "cutout")
JITTER = 0.2           # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]
GEO_ZOOM = 1.25        # geo: zoom drawn from [1, GEO_ZOOM] (at least what a roll needs to keep the frame filled)
GEO_ROLL_DEG = 5.0     # geo: camera roll drawn from [-GEO_ROLL_DEG, GEO_ROLL_DEG] degrees
PHOTO_GAMMA = 1.5      # photo: gamma drawn log-uniformly from [1 / PHOTO_GAMMA, PHOTO_GAMMA]
PHOTO_HUE = 0.05       # photo: hue rotation drawn from [-PHOTO_HUE, PHOTO_HUE] turns
PHOTO_BLUR = (0.5, 0.3, 1.2)   # photo: probability of a Gaussian blur, and its sigma range in pixels
PHOTO_NOISE = 0.03     # photo: Gaussian noise sigma drawn from [0, PHOTO_NOISE]
CUTOUT = (0.5, 0.1, 0.35)      # cutout: probability, and the side range of the grey box as a fraction of H and W


def parse_augment(spec):
    """'flip+jitter' -> the keyword options of `augment_batch` (no generator); 'none' -> None. ValueError if unknown."""
    names = [] if spec == "none" else spec.split("+")
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown or not names and spec != "none":
        raise ValueError(f"unknown augmentation {'+'.join(unknown) or spec!r}; join any of {', '.join(AUGMENTS)} "
                         f"with '+' (e.g. flip+jitter), or 'none'")
    if not names:
        return None
    return {"flip": "flip" in names, "jitter": JITTER if "jitter" in names else 0.0, "geo": "geo" in names,
            "photo": "photo" in names, "cutout": "cutout" in names}


def zoom_roll(rgb, depth, rand):
    """geo: a random zoom and camera roll, the same for RGB and depth, that keeps depth correct. A roll about the
    optical axis leaves planar z-depth unchanged; a zoom by s shows what the same camera would see of the scene
    with every depth divided by s (x = f X / Z), so depth is divided by s (pixels at the clip stay at the clip)."""
    b, (h, w) = rgb.shape[0], rgb.shape[-2:]
    roll = (rand(b) * 2 - 1) * math.radians(GEO_ROLL_DEG)
    cos, sin = roll.cos(), roll.sin()
    zoom = torch.maximum(1 + rand(b) * (GEO_ZOOM - 1), cos + (w / h) * sin.abs())  # no border may show
    free_x = 1 - (cos + (h / w) * sin.abs()) / zoom  # how far the window's centre may move, in [-1, 1] units
    free_y = 1 - (cos + (w / h) * sin.abs()) / zoom
    shift = (rand(b, 2) * 2 - 1) * torch.stack([free_x, free_y], 1).clamp_min(0)
    theta = torch.stack([torch.stack([cos / zoom, -sin / zoom * h / w, shift[:, 0]], 1),
                         torch.stack([sin / zoom * w / h, cos / zoom, shift[:, 1]], 1)], 1).to(rgb.device)
    grid = F.affine_grid(theta, list(rgb.shape), align_corners=False)
    rgb = F.grid_sample(rgb, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if depth is not None and depth.numel():
        depth = F.grid_sample(depth, grid.to(depth.dtype), mode="nearest", padding_mode="border", align_corners=False)
        depth = torch.where(depth >= MAX_DEPTH, depth, depth / zoom.to(depth.device).view(b, 1, 1, 1))
    return rgb, depth


def gray_of(rgb):
    return 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]


def photometric(rgb, rand, generator):
    """photo: gamma, hue rotation, Gaussian blur (some images), Gaussian noise; per image, RGB only."""
    b, dev = rgb.shape[0], rgb.device
    gamma = PHOTO_GAMMA ** (rand(b) * 2 - 1)
    rgb = rgb.clamp_min(1e-6) ** gamma.view(b, 1, 1, 1)
    angle = (rand(b) * 2 - 1) * PHOTO_HUE * 2 * math.pi  # rotate the chroma plane of YIQ
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    c, s = angle.cos(), angle.sin()
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, c, -s], 1),
                       torch.stack([zero, s, c], 1)], 1)
    mix = torch.linalg.inv(yiq) @ rot @ yiq  # [B, 3, 3]
    rgb = torch.einsum("bij,bjhw->bihw", mix, rgb)
    p_blur, s_lo, s_hi = PHOTO_BLUR
    sigma = torch.where(rand(b) < p_blur, s_lo + rand(b) * (s_hi - s_lo), torch.zeros(b, device=dev))
    if (sigma > 0).any():
        x = torch.arange(-3, 4, dtype=rgb.dtype, device=dev)
        k = torch.exp(-x ** 2 / (2 * sigma.clamp_min(1e-3).view(b, 1) ** 2))
        k = torch.where((sigma > 0).view(b, 1), k, (x == 0).to(rgb.dtype).expand(b, 7))  # sigma 0: identity
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # one kernel per image and channel
        y = F.conv2d(rgb.reshape(1, b * 3, *rgb.shape[-2:]), k.view(b * 3, 1, 7, 1), padding=(3, 0), groups=b * 3)
        y = F.conv2d(y, k.view(b * 3, 1, 1, 7), padding=(0, 3), groups=b * 3)
        rgb = y.view_as(rgb)
    noise = torch.randn(rgb.shape, generator=generator).to(dev) * (rand(b) * PHOTO_NOISE).view(b, 1, 1, 1)
    return (rgb + noise).clamp(0, 1)


def cut_out(rgb, rand):
    """cutout: with probability CUTOUT[0], one box of each image (sides a random fraction of H and W) set to the
    image's mean colour; depth is kept, so the model has to infer the hidden part from its surroundings."""
    b, (h, w) = rgb.shape[0], rgb.shape[-2:]
    p, lo, hi = CUTOUT
    keep, size, corner = rand(b) >= p, lo + rand(b, 2) * (hi - lo), rand(b, 2)
    bh, bw = (size[:, 0] * h).round(), (size[:, 1] * w).round()
    y0, x0 = (corner[:, 0] * (h - bh)).round(), (corner[:, 1] * (w - bw)).round()
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    box = ((ys >= y0.view(b, 1, 1)) & (ys < (y0 + bh).view(b, 1, 1)) & (xs >= x0.view(b, 1, 1))
           & (xs < (x0 + bw).view(b, 1, 1)) & ~keep.view(b, 1, 1))
    return torch.where(box[:, None].to(rgb.device), rgb.mean((2, 3), keepdim=True), rgb)


def augment_batch(rgb, depth, flip=True, jitter=JITTER, geo=False, photo=False, cutout=False, generator=None):
    """Paired augmentation of a batch (see `parse_augment` for the names): geo (zoom + roll of both, depth kept
    correct), horizontal flip of RGB and depth together, colour jitter, photometric and cutout on RGB only.

    rgb [B,3,H,W] float in [0,1], depth [B,1,H,W]; runs on whatever device the tensors are on.
    jitter: brightness, contrast and saturation factors drawn from [1-j, 1+j] per image.
    """
    b, dev = rgb.shape[0], rgb.device
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(dev)
    if geo:
        rgb, depth = zoom_roll(rgb, depth, rand)
    if flip:
        flip_mask = (rand(b) < 0.5).view(b, 1, 1, 1)
        rgb = torch.where(flip_mask, rgb.flip(-1), rgb)
        if depth is not None and depth.numel():
            depth = torch.where(flip_mask, depth.flip(-1), depth)
    if jitter > 0:
        factors = 1.0 + (rand(b, 3) * 2 - 1) * jitter  # brightness, contrast, saturation
        brightness, contrast, saturation = (factors[:, i].view(b, 1, 1, 1) for i in range(3))
        rgb = rgb * brightness
        gray = gray_of(rgb)
        rgb = (rgb - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
        gray = gray_of(rgb)
        rgb = ((rgb - gray) * saturation + gray).clamp(0, 1)
    if photo:
        rgb = photometric(rgb, rand, generator)
    if cutout:
        rgb = cut_out(rgb, rand)
    return rgb, depth


def block_folds(n_frames, n_folds, guard):
    """Block cross-validation over frames 0..n_frames-1 in sequence order: a list of n_folds pairs
    (train indices, held-out indices). Fold k holds out the k-th of n_folds contiguous blocks (sizes differ by at
    most one frame) and trains on every other frame except `guard` frames on each side of the held-out block
    (neighbouring frames are near duplicates, so they would leak the held-out block into training)."""
    if n_folds < 2 or guard < 0:
        raise UserError(f"block cross-validation needs at least 2 folds and a guard of 0 or more frames, "
                        f"got {n_folds} folds, guard {guard}")
    edges = [round(k * n_frames / n_folds) for k in range(n_folds + 1)]
    folds = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        train = [i for i in range(n_frames) if i < lo - guard or i >= hi + guard]
        if hi == lo or not train:
            raise UserError(f"{n_frames} frames are too few for {n_folds} folds with a guard of {guard} frames")
        folds.append((train, list(range(lo, hi))))
    return folds


class DepthDataset(Dataset):
    """(rgb, depth) items of one split; see the module docstring for layouts and conventions.

    split may be a list of splits: their frames one after another, in the order given (block cross-validation
    joins train and val this way). cache=True decodes every frame once (uint8 RGB; float16 depth where lossless,
    else float32) so later epochs cost no decoding;
    it also checks every file up front. skip_bad=True checks every file up front and drops the bad
    ones, listing them in `.skipped` as (file, reason), instead of stopping at the first.
    """
    TRAIN, VAL, TEST = "train", "val", "test"

    def __init__(self, data_dir, train=None, split=None, cache=False, skip_bad=False, progress=False,
                 allow_unusual_depth=False):
        self.allow_unusual_depth = allow_unusual_depth
        if split is None:
            split = {True: self.TRAIN, False: self.VAL, None: None}.get(train, train)
        self.data_dir, self.split = os.fspath(data_dir), split
        parts = [find_pairs(self.data_dir, s) for s in (split if isinstance(split, (list, tuple)) else [split])]
        self.names = [n for names, _, _ in parts for n in names]
        self.rgb_paths = [p for _, paths, _ in parts for p in paths]
        self.has_depth = all(depths is not None for _, _, depths in parts)
        self.depth_paths = [p for _, _, depths in parts for p in depths] if self.has_depth else None
        self.skipped, self.cache = [], None
        if cache or skip_bad:
            self._check_all(keep=cache, skip_bad=skip_bad, progress=progress)
        if not self.names:
            raise UserError(f"{self.data_dir}: no usable frames"
                            + (f" ({len(self.skipped)} skipped as bad)" if self.skipped else ""))

    def _check_all(self, keep, skip_bad, progress):
        from tqdm import tqdm
        names, rgb_paths, depth_paths, cache = [], [], [], []
        items = range(len(self.names))
        for i in tqdm(items, desc=f"reading {self.split_name()}", disable=not progress, leave=False):
            try:
                rgb_u8, depth_f = self._read(i)
            except UserError as e:
                if not skip_bad:
                    raise
                self.skipped.append((self.rgb_paths[i], str(e)))
                continue
            names.append(self.names[i])
            rgb_paths.append(self.rgb_paths[i])
            if self.has_depth:
                depth_paths.append(self.depth_paths[i])
            if keep:
                cache.append((torch.from_numpy(rgb_u8).permute(2, 0, 1).contiguous(),
                              torch.from_numpy(depth_f)[None] if depth_f is not None else None))
        # depth is cached as float16 when that is lossless (the real data's values are float16 numbers),
        # otherwise as float32, so cached and uncached reads always give the same metrics
        if keep and self.has_depth and all(torch.equal(d.half().float(), d) for _, d in cache):
            cache = [(r, d.half()) for r, d in cache]
        self.names, self.rgb_paths = names, rgb_paths
        self.depth_paths = depth_paths if self.has_depth else None
        self.cache = cache if keep else None

    def split_name(self):
        if isinstance(self.split, (list, tuple)):
            return "+".join(self.split)
        return self.split or os.path.basename(self.data_dir)

    def _read(self, i):
        rgb_u8 = load_rgb_uint8(self.rgb_paths[i])
        if not self.has_depth:
            return rgb_u8, None
        return rgb_u8, load_depth_m(self.depth_paths[i], rgb_u8.shape[:2], self.allow_unusual_depth)

    def __len__(self):
        return len(self.names)

    def load(self, i):
        """(rgb float [3,H,W] in [0,1], depth float [1,H,W] or empty) at the native size (augmentation is per batch:
        `augment_batch`)."""
        if self.cache is not None:
            rgb_u8, depth_h = self.cache[i]
            rgb = rgb_u8.float() / 255.0
            depth = depth_h.float() if depth_h is not None else torch.empty(0)
        else:
            rgb_u8, depth_f = self._read(i)
            rgb = torch.from_numpy(rgb_u8).permute(2, 0, 1).float() / 255.0
            depth = torch.from_numpy(depth_f)[None] if depth_f is not None else torch.empty(0)
        return rgb, depth

    def __getitem__(self, i):
        return self.load(i)

    def subset(self, indices):
        """A dataset of the frames at `indices` (in that order), sharing this one's cache."""
        sub = copy.copy(self)
        sub.names = [self.names[i] for i in indices]
        sub.rgb_paths = [self.rgb_paths[i] for i in indices]
        sub.depth_paths = [self.depth_paths[i] for i in indices] if self.has_depth else None
        sub.cache = [self.cache[i] for i in indices] if self.cache is not None else None
        return sub

    def frame_hw(self):
        """(H, W) of the frames (from the cache, else from image headers); UserError naming a frame of each size
        when they differ: training batches need frames of one size (evaluation takes any)."""
        sizes = {}
        for i, path in enumerate(self.rgb_paths):
            hw = tuple(self.cache[i][0].shape[-2:]) if self.cache is not None else image_hw(path)
            sizes.setdefault(hw, path)
            if len(sizes) > 1:
                (a, path_a), (b, path_b) = sizes.items()
                raise UserError(f"{self.data_dir}: frames of two sizes in {self.split_name()}: {path_a} is "
                                f"{a[0]}x{a[1]}, {path_b} is {b[0]}x{b[1]} (HxW); training needs one size "
                                f"(resize the frames first)")
        return next(iter(sizes))

    def stacked(self):
        """All cached frames as two tensors (uint8 [N,3,H,W], depth [N,1,H,W] or None); needs cache=True
        and frames of one size. Lets the training loop index batches directly, with no per-item work."""
        if self.cache is None:
            raise ValueError("stacked() needs DepthDataset(..., cache=True)")
        self.frame_hw()
        rgb = torch.stack([r for r, _ in self.cache])
        depth = torch.stack([d for _, d in self.cache]) if self.has_depth else None
        return rgb, depth


# ------------------------------------------------------------------------------------------------
# training batches: what fits in RAM, each epoch's sample order, batches on the device

# everything random in epoch e of a run with --seed s (a resumed epoch repeats it): the sample order is the
# permutation seeded by s * SEED_ORDER + e (epoch_order), torch's RNG (dropout, drop path) is seeded
# s * SEED_TORCH + e and each process's augmentation generator s * SEED_AUG_PER_SEED + e * SEED_AUG_PER_EPOCH + rank
# (prime strides: the epochs and processes of a run get seeds of their own) (seed_epoch)
SEED_ORDER, SEED_TORCH, SEED_AUG_PER_SEED, SEED_AUG_PER_EPOCH = 100003, 1000, 7919, 101


def fits_in_ram(n_frames, ram_fraction, hw=(144, 256)):
    """Whether n_frames decoded frames of size hw need less than ram_fraction of this machine's memory."""
    need = n_frames * hw[0] * hw[1] * 7  # uint8 RGB + float32 depth (float16 where lossless)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return need < ram_fraction * total


def epoch_order(n, seed, epoch, rank, world):
    """This rank's sample indices for an epoch: a permutation fixed by (seed, epoch), sharded like
    DistributedSampler."""
    g = torch.Generator().manual_seed(seed * SEED_ORDER + epoch)
    order = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / world)
    order = torch.cat([order, order[: per_rank * world - n]])
    return order[rank::world].tolist()


def seed_epoch(seed, epoch, rank):
    """Seeds torch's RNG for epoch `epoch` of a run with --seed `seed`; returns this process's augmentation
    generator for that epoch."""
    torch.manual_seed(seed * SEED_TORCH + epoch)
    return torch.Generator().manual_seed(seed * SEED_AUG_PER_SEED + epoch * SEED_AUG_PER_EPOCH + rank)


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
