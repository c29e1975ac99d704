"""The checkpoint format: one self-describing dict of plain types and tensors, read with
torch.load(weights_only=True).

A checkpoint holds 'model' (the name and options `build_model` takes), 'state_dict' (the weights evaluation uses)
and, written by main.py, the run's record and all a --resume needs (RESUME_KEYS; runstate.training_state). Written by
`save_checkpoint`; read by `read_checkpoint`, the one check of "is this a checkpoint we can use" for main.py
(--resume, --branch, --init, --export) and evaluate.py, with one message per kind of wrong file; the model it
describes is rebuilt by `model_from_checkpoint`. The file itself is read by safe_load.py.
"""
import io

import torch

from model import TRAIN_HW, build_model
from safe_load import find_state_dict, is_state_dict, safe_load, without_module_prefix
from utils import UserError, atomic_write, first_line

CKPT_FORMAT = "depthkit-checkpoint-v1"
RESUME_KEYS = ("args", "model", "state_dict", "optimizer", "epoch", "step", "best", "history", "rng")


def save_checkpoint(path, ckpt):
    """Write a checkpoint dict atomically. It must hold 'model' (name + options) and 'state_dict'."""
    for key in ("model", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"checkpoint dict lacks '{key}'")
    ckpt = dict(ckpt, format=CKPT_FORMAT)
    buf = io.BytesIO()  # torch.save straight to a file turns a full disk into "unexpected pos ..." RuntimeErrors
    torch.save(ckpt, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def read_checkpoint(path, flag=None, bare_model=None):
    """A checkpoint read safely and checked for what its reader needs; UserError naming `path`, one message per kind
    of wrong file. flag: the main.py flag that reads it: --resume and --branch need a training checkpoint (RESUME_KEYS),
    --init and --export a model description and its state dict; None (evaluate.py) takes a bare state dict too,
    described by `bare_model` (evaluate.py's --model flags: a dict for `build_model`). Returns the checkpoint with its
    state dicts ('state_dict', 'train_state_dict') without a 'module.' prefix, and 'model' always the description."""
    ckpt = safe_load(path)
    described = "state_dict" in ckpt and isinstance(ckpt.get("model"), dict) and "name" in ckpt["model"]
    if not described:
        try:
            state = find_state_dict(ckpt, path)
        except UserError:
            raise UserError(f"{path}: not a depth checkpoint (no model description and no state dict of tensors)"
                            ) from None
        if bare_model is None:
            hint = "pass --model NAME (and --encoder/--head if not the defaults)" if flag is None else \
                f"{flag} takes a checkpoint main.py wrote"
            raise UserError(f"{path}: a bare state dict with no model description; {hint}")
        return dict(ckpt, model=dict(bare_model), state_dict=state)
    ckpt = dict(ckpt)
    for key in ("state_dict", "train_state_dict"):
        if key == "state_dict" or ckpt.get(key) is not None:  # train_state_dict: None without --ema
            if not is_state_dict(ckpt[key]):
                raise UserError(f"{path}: its {key} holds something other than tensors")
            ckpt[key] = without_module_prefix(ckpt[key])
    if flag in ("--resume", "--branch"):
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing or not isinstance(ckpt.get("args"), dict):
            raise UserError(f"{path}: not a main.py training checkpoint (no {', '.join(missing) or 'args'} "
                            f"recorded); it cannot be {'resumed' if flag == '--resume' else 'branched'}")
    return ckpt


def model_from_checkpoint(config, state, source):
    """The model a checkpoint describes (config: model name and options), with its weights loaded (config and state
    as `read_checkpoint` returns them).

    UserError naming `source` when the description cannot be built or the weights do not fit it. Options
    that would fetch or read other files (pretrained, encoder_weights) are ignored: the weights are here.
    """
    config = {k: v for k, v in config.items() if k not in ("pretrained", "encoder_weights")}
    try:
        with torch.device("meta"):  # shapes only, no memory: a description of absurd size is refused before it is built
            own = build_model(**config).state_dict()
    except (UserError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{source}: cannot build the model it describes ({first_line(e)})") from None
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(x)} {what} (e.g. {', '.join(x[:3])})" for x, what in
                 [(missing, "missing keys"), (unexpected, "unexpected keys"), (wrong, "shape mismatches")] if x]
        raise UserError(f"{source}: weights do not fit model '{config['name']}': " + "; ".join(parts))
    net = build_model(**config)  # as large as the tensors already loaded
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return net


def checkpoint_train_hw(ckpt):
    """The (H, W) a checkpoint was trained at, as it records it; TRAIN_HW for one that does not (or records junk)."""
    hw = ckpt.get("train_hw")
    ok = isinstance(hw, (list, tuple)) and len(hw) == 2 and all(isinstance(x, int) and x > 0 for x in hw)
    return tuple(hw) if ok else TRAIN_HW


def nonfinite_tensors(state):
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
