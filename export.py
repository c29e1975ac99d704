"""main.py --export CKPT OUT: a shippable copy of a checkpoint, by OUT's suffix (`export_model`).

    .pth   a slim checkpoint: the evaluated weights (fp16 with --export_fp16) and the run's record, no optimizer;
           with --ensemble CKPT2 ..., one model that averages the checkpoints' predictions (model.Ensemble);
           with --member K, an ensemble's K-th member alone
    .pt    a TorchScript graph of predict_depth
    .onnx  an ONNX graph of predict_depth (needs pip install onnx onnxruntime)

A graph takes RGB [B,3,H,W] in [0, 1] and gives metres [B,1,H,W]; its input/output contract is written into the
file (`graph_contract`), and an export is refused unless the graph reproduces predict_depth (`check_graph`).
`load_graph` runs an exported file (benchmark.py --deploy times it).
"""
import importlib
import io
import json
import math
import os
import warnings

import torch
import torch.nn as nn

from checkpoint import checkpoint_train_hw, model_from_checkpoint, read_checkpoint, save_checkpoint
from model import ENSEMBLE, LARGE_INPUT, predict_depth
from outputs import refuse_unless_ours
from utils import MAX_DEPTH, UserError, atomic_write, first_line

GRAPH_FORMATS = {".pt": "TorchScript", ".onnx": "ONNX"}
CONTRACT_KEY = "depthkit_contract"  # TorchScript: the _extra_files name; ONNX: the metadata_props key
ONNX_OPSET = 17
ONNX_HINT = "pip install onnx onnxruntime"
PARITY_TOL_M = 1e-3  # largest |graph - predict_depth| (metres) an export accepts: TorchScript measured bit-identical,
# ONNX Runtime up to 8.4e-5 m (mean 2.6e-6 m) on 32 val frames with the shipped checkpoint


def refuse_existing(dst):
    """Export marks no file as its own (outputs.py), so it replaces none: anything at dst, a dangling link too."""
    refuse_unless_ours(dst, None, f"{dst}: exists; export writes a new file only (move the old one away first)")


def export_checkpoint(src, dst, half=False, tta=None, ensemble=(), member=None):
    """A shippable copy of a training checkpoint: the evaluated weights (fp16 with half=True) and the run's record
    (args, history, best), without optimizer or resume state. Never overwrites dst. tta: the test-time augmentation
    evaluate.py applies by default to this checkpoint ("flip" or None). ensemble: more checkpoints whose models are
    averaged with src's (`ensemble_checkpoint`); member: K, src is an ensemble and dst its K-th member alone.
    Returns (dst, "fp16" or "fp32": the weights written, fp16 also when src's were)."""
    ckpt = read_checkpoint(src, "--export")
    refuse_existing(dst)
    if ensemble and member:
        raise UserError("--ensemble makes an ensemble, --member takes one apart: pick one")
    if ensemble:
        ckpt = ensemble_checkpoint([src, *ensemble], [ckpt] + [read_checkpoint(p, "--ensemble") for p in ensemble])
    if member:
        ckpt = member_checkpoint(src, ckpt, member)
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    slim = {k: ckpt[k] for k in ("model", "input_size", "train_hw", "epoch", "step", "best", "args", "history",
                                 "versions", "train_seconds", "members_from", "members_args")
            if k in ckpt}
    save_checkpoint(dst, dict(slim, state_dict=state, exported_from=os.path.basename(src), tta=tta))
    return dst, "fp16" if any(v.dtype == torch.float16 for v in state.values()) else "fp32"


def ensemble_checkpoint(sources, ckpts):
    """One checkpoint whose model (model.Ensemble) averages the checkpoints' models: their descriptions and weights
    side by side (members.K.*), the record of the first (args, history, best: the card names the others) and each
    member's file name and args. UserError naming the file for a member that is an ensemble, whose weights do not
    fit its description, or whose input or training frame size differs from the first's."""
    sizes = []
    for path, ckpt in zip(sources, ckpts):
        if ckpt["model"].get("name") == ENSEMBLE:
            raise UserError(f"{path}: already an ensemble; pass its members' checkpoints instead")
        net = model_from_checkpoint(ckpt["model"], ckpt["state_dict"], path)
        sizes.append((net.input_size, tuple(checkpoint_train_hw(ckpt))))
        if sizes[-1] != sizes[0]:
            raise UserError(f"{path}: input size {sizes[-1][0]} and training frames {sizes[-1][1]} differ from "
                            f"{sources[0]}'s ({sizes[0][0]}, {sizes[0][1]}); an ensemble's members share both")
    model = {"name": ENSEMBLE, "members": [dict(c["model"]) for c in ckpts]}
    state = {f"members.{i}.{k}": v for i, c in enumerate(ckpts) for k, v in c["state_dict"].items()}
    return dict(ckpts[0], model=model, state_dict=state, members_from=[os.path.basename(p) for p in sources],
                members_args=[c.get("args") for c in ckpts])


def member_checkpoint(src, ckpt, k):
    """The K-th (1-based) member of an ensemble checkpoint as a one-model checkpoint: its description, its weights
    (members.K-1.*, as stored) and its args; the record of the ensemble's first member (history, best, epochs) only
    for K = 1, whose it is. UserError naming src when it is no ensemble or has fewer members."""
    members = ckpt["model"].get("members") if ckpt["model"].get("name") == ENSEMBLE else None
    if not members:
        raise UserError(f"{src}: not an ensemble; --member takes one model out of a file written with --ensemble")
    if k > len(members):
        raise UserError(f"{src}: an ensemble of {len(members)} models; --member takes 1 to {len(members)}, got {k}")
    prefix = f"members.{k - 1}."
    state = {name[len(prefix):]: v for name, v in ckpt["state_dict"].items() if name.startswith(prefix)}
    record = ("input_size", "train_hw", "versions") + (("epoch", "step", "best", "history", "train_seconds")
                                                       if k == 1 else ())
    args = (ckpt.get("members_args") or [None] * len(members))[k - 1]
    one = dict({key: ckpt[key] for key in record if key in ckpt}, model=dict(members[k - 1]), state_dict=state)
    model_from_checkpoint(one["model"], state, src)  # UserError when the weights do not fit
    return dict(one, **({"args": args} if args is not None else {}))


# ------------------------------------------------------------------------------------------------
# deployable graphs: TorchScript (.pt) and ONNX (.onnx) of predict_depth, the contract in the file's metadata

class DeployedDepth(nn.Module):
    """What an exported graph computes: predict_depth of a model (fp32, flip TTA if asked) on RGB [B,3,H,W] float
    in [0, 1]; metres [B,1,H,W] in [0, 20] at the input's size. A module because tracing takes one."""

    def __init__(self, net, tta):
        super().__init__()
        self.net, self.tta = net, tta

    def forward(self, rgb):
        return predict_depth(self.net, rgb, tta=self.tta)


def import_optional(name):
    """onnx or onnxruntime, imported only where ONNX is exported or run; UserError with the install line if absent."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"ONNX needs the optional packages onnx and onnxruntime ({name} is missing): {ONNX_HINT}"
                        ) from None
    except Exception as e:  # noqa: BLE001 - installed but broken (a bad build, a missing library): one line
        raise UserError(f"{name} is installed but importing it fails ({type(e).__name__}: {first_line(e)[:200]}); "
                        f"reinstall it: pip install --force-reinstall onnx onnxruntime") from None


def graph_contract(src, ckpt, net, tta, fmt):
    """The input/output contract written into an exported file (JSON under CONTRACT_KEY)."""
    axes, fixed = ["batch", 3, "height", "width"], getattr(net, "input_size", None)
    size = f"resized inside to the model's fixed input {fixed[0]}x{fixed[1]} and back" if fixed else \
        "predicted at the input's own size (any H, W)"
    return {
        "format": f"depthkit {fmt} graph v1", "source": os.path.basename(os.fspath(src)), "model": ckpt["model"],
        "input": {"name": "rgb", "shape": axes, "dtype": "float32", "range": [0.0, 1.0], "channels": "RGB",
                  "note": "ImageNet normalisation is inside the graph; pass plain RGB / 255"},
        "output": {"name": "depth_m", "shape": ["batch", 1, "height", "width"], "dtype": "float32", "unit": "metres",
                   "range": [0.0, MAX_DEPTH], "depth": "planar z-depth along the optical axis, clamped inside"},
        "dynamic_axes": ["batch", "height", "width"], "size": size, "tta": "flip" if tta else "none",
        "trained_hw": list(checkpoint_train_hw(ckpt)),
        "large_inputs": f"evaluate.py predicts images of more than {LARGE_INPUT:g}x the trained pixels at about "
                        "the trained size; this graph does not: resize such images before",
        "parity_tol_m": PARITY_TOL_M, "torch": str(torch.__version__),
    }


def torchscript_bytes(graph, example, contract):
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit's deprecation notices and TracerWarnings: check_graph is the test
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={CONTRACT_KEY: json.dumps(contract)})
    return buf.getvalue()


def onnx_bytes(graph, example, contract):
    """The legacy (TorchScript-based) exporter: offline, under a second, no onnxscript (torch's dynamo exporter
    needs onnxscript and took minutes on this model)."""
    onnx = import_optional("onnx")
    buf, dynamic = io.BytesIO(), {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=ONNX_OPSET, input_names=["rgb"],
                          output_names=["depth_m"], dynamic_axes={"rgb": dynamic, "depth_m": dynamic})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, {CONTRACT_KEY: json.dumps(contract)})
    return proto.SerializeToString()


def load_graph(path_or_bytes):
    """(predict(rgb tensor) -> depth tensor, contract dict) of an exported .pt or .onnx file (or its bytes)."""
    if isinstance(path_or_bytes, bytes):
        data = path_or_bytes
    else:
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    if data[:2] == b"PK":  # a TorchScript file is a zip
        extra = {CONTRACT_KEY: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)

        def predict(rgb):
            with torch.inference_mode():
                return module(rgb)
        return predict, json.loads(extra[CONTRACT_KEY])
    ort = import_optional("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch: comparable timings
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    contract = json.loads(session.get_modelmeta().custom_metadata_map[CONTRACT_KEY])
    return lambda rgb: torch.from_numpy(session.run(None, {"rgb": rgb.numpy()})[0]), contract


def check_graph(data, graph, hw, fmt, src):
    """UserError unless the exported graph reproduces predict_depth within PARITY_TOL_M at the training size (batch
    2) and at an odd smaller size (batch 1): a trace that froze a size or a branch fails here."""
    predict, _ = load_graph(data)
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, *hw), (1, 3, hw[0] // 2 + 3, hw[1] // 2 + 5)]:
        rgb = torch.rand(shape, generator=gen)
        with torch.inference_mode():
            want = graph(rgb)
        got = predict(rgb)
        diff = (got - want).abs().max().item() if got.shape == want.shape else math.inf
        if not diff <= PARITY_TOL_M:
            raise UserError(f"{src}: the {fmt} graph does not reproduce the model at {shape[2]}x{shape[3]} (batch "
                            f"{shape[0]}): max difference {diff:.3g} m > {PARITY_TOL_M:g} m (a size or branch the "
                            f"trace froze)")


def export_graph(src, dst, tta=None):
    """--export CKPT OUT.pt|OUT.onnx: a deployable graph of a main.py checkpoint (see DeployedDepth and
    graph_contract), checked against predict_depth (check_graph), written atomically; never overwrites dst.
    tta: "flip" or "none" baked into the graph; None takes the checkpoint's own (export --export_tta)."""
    fmt = GRAPH_FORMATS[os.path.splitext(dst)[1].lower()]
    if fmt == "ONNX":  # before any work: the install line
        import_optional("onnx")
        import_optional("onnxruntime")
    ckpt = read_checkpoint(src, "--export")
    refuse_existing(dst)
    tta = ckpt.get("tta") == "flip" if tta is None else tta == "flip"
    net = model_from_checkpoint(ckpt["model"], ckpt["state_dict"], src).float().eval()
    graph = DeployedDepth(net, tta).eval()
    hw = checkpoint_train_hw(ckpt)
    example = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            data = (torchscript_bytes if fmt == "TorchScript" else onnx_bytes)(graph, example,
                                                                               graph_contract(src, ckpt, net, tta, fmt))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every tracer or exporter failure becomes one line for the user
        hint = "; TorchScript (.pt) may still work" if fmt == "ONNX" else ""
        raise UserError(f"{src}: model '{ckpt['model'].get('name')}' cannot be exported to {fmt} "
                        f"({first_line(e)[:300]}){hint}") from None
    check_graph(data, graph, hw, fmt, src)
    atomic_write(dst, lambda f: f.write(data))
    return dst


def export_model(src, dst, half=False, tta=None, ensemble=(), member=None):
    """--export: by dst's suffix, .pth a slim checkpoint (export_checkpoint; an ensemble of src and `ensemble`'s
    checkpoints if given, or src's ensemble member `member`), .pt TorchScript, .onnx ONNX (export_graph). tta None:
    .pth names none, a graph takes the checkpoint's own. Returns (dst, "fp16" or "fp32": its weights)."""
    suffix = os.path.splitext(os.fspath(dst))[1].lower()
    if suffix == ".pth":
        return export_checkpoint(src, dst, half, None if tta in (None, "none") else tta, ensemble, member)
    if ensemble or member:
        raise UserError(f"{dst}: --{'ensemble' if ensemble else 'member'} writes a .pth checkpoint; export that file "
                        f"to a graph in a second step")
    if suffix not in GRAPH_FORMATS:
        raise UserError(f"{dst}: export picks the format by the suffix: .pth (checkpoint), .pt (TorchScript) or "
                        f".onnx (ONNX), got {suffix or 'none'}")
    if half:
        raise UserError(f"{dst}: --export_fp16 is for .pth checkpoints; a {GRAPH_FORMATS[suffix]} graph is fp32")
    return export_graph(src, dst, tta), "fp32"

