"""Read a torch.save file without running code: a checkpoint, a bare state dict, encoder weights.

`safe_load` reads with torch.load(weights_only=True) after refusing what should never reach it (a missing, empty or
special file, zip records that inflate far beyond the file); a file torch refuses is scanned, never unpickled, to say
in one line whether it would run code. `find_state_dict` finds the weights in a loaded file. checkpoint.py checks
that a file is one of our checkpoints (`read_checkpoint`); model.py reads encoder weights with these.
"""
import contextlib
import os
import pickle
import pickletools
import re
import warnings
import zipfile

import torch

from utils import UserError, first_line, refuse_special_file

INFLATE_SLACK = 2 ** 20  # bytes a checkpoint's zip records may hold beyond the file's own size
CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}


def safe_load(path, map_location="cpu"):
    """Load a checkpoint or a bare state dict safely (weights_only=True); UserError on anything else.

    Returns the loaded dict. A dict of tensors (a bare state_dict) comes back as it is; the caller
    decides whether it can use one.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: checkpoint file not found")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a checkpoint file")
    refuse_special_file(path)
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{path}: checkpoint file is empty (0 bytes)")
    inflated = zip_records_bytes(path)
    if inflated > size + INFLATE_SLACK:
        raise UserError(f"{path}: refused: its records inflate to {inflated / 2 ** 20:.0f} MiB from a "
                        f"{size / 2 ** 20:.1f} MiB file (torch.save never compresses)")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles; the refusal below says it in one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line for the user
        if would_run_code(path, e):
            raise UserError(f"{path}: refused: it holds Python objects other than tensors and plain types "
                            f"(loading it could run code); only weights-only checkpoints are accepted") from None
        detail = first_line(str(e).split("WeightsUnpickler error:", 1)[-1].strip() or e)
        if re.search(r"weights_only|trust", detail, re.IGNORECASE):  # never pass on advice to load it unsafely
            detail = type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint (truncated, corrupt or not a PyTorch file: "
                        f"{detail[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, expected a dict)")
    return obj


def zip_records_bytes(path):
    """Total uncompressed bytes of a zip file's records (a torch.save file is a zip of stored records); 0 for a
    file that is not a zip."""
    try:
        with zipfile.ZipFile(path) as z:
            return sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return 0


def would_run_code(path, error):
    """Whether torch's weights-only refusal of a file is for code: its refusal of a global (in any wording), or a
    pickle (raw, or a zip's data.pkl) that scans whole to its end and imports or calls something (random bytes
    do not). Scanned, never unpickled."""
    if not isinstance(error, pickle.UnpicklingError):
        return False
    if re.search(r"global|unsupported class", str(error), re.IGNORECASE):
        return True
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                archive = stack.enter_context(zipfile.ZipFile(path))
                stream = stack.enter_context(archive.open(next(n for n in archive.namelist()
                                                                if n.endswith("data.pkl"))))
            else:
                stream = stack.enter_context(open(path, "rb"))
            opcodes = {op.name for op, _, _ in pickletools.genops(stream)}
            whole = stream.read(1) == b""  # the pickle ends where the file (or record) does
    except Exception:  # noqa: BLE001 - not a whole pickle: random bytes or a damaged file
        return False
    return whole and bool(opcodes & CODE_OPCODES)


def is_state_dict(obj):
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()))


def find_state_dict(obj, source):
    """The state dict in a loaded file: the file itself, or the one under 'state_dict', 'model_state_dict' or
    'model'; without a 'module.' prefix (DistributedDataParallel). UserError naming `source` when there is none."""
    state = next((obj[k] for k in ("state_dict", "model_state_dict", "model") if is_state_dict(obj.get(k))), obj)
    if not is_state_dict(state):
        raise UserError(f"{source}: holds no state dict (a dict of tensors, or one under 'state_dict', "
                        f"'model_state_dict' or 'model')")
    return without_module_prefix(state)


def without_module_prefix(state):
    """A state dict's keys without DistributedDataParallel's 'module.' prefix."""
    return {k.removeprefix("module."): v for k, v in state.items()}

