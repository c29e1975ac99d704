"""Hostile, broken and wrong checkpoints, handed to evaluate.py and to main.py --resume: one line naming the file
and what is wrong with it, no code run, nothing written beside it.

    python -m pytest -q tests/test_hostile_checkpoints.py

Guarantees and limits: docs/reliability.md; the checks themselves: checkpoint.py and safe_load.py.
"""
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import main as main_mod
import model as model_lib
from checkpoint import CKPT_FORMAT, save_checkpoint
from conftest import ONE_THREAD, QUIET, exploit, message_lines, one_line, run_eval, run_script
from safe_load import safe_load

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# evaluate.py

def hostile_checkpoint(kind, ref_best, path, victim):
    """Write a checkpoint of the given kind at path; returns extra evaluate.py flags it needs."""
    good = safe_load(ref_best)
    config, state = dict(good["model"]), good["state_dict"]
    if kind == "empty":
        Path(path).write_bytes(b"")
    elif kind == "folder":
        os.makedirs(path)
    elif kind == "legacy_format_exploit":  # the pre-1.6 (non-zip) format goes through another unpickler
        torch.save({"state_dict": exploit(victim)}, path, _use_new_zipfile_serialization=False)
    elif kind == "numpy_inside":
        torch.save({"model": config, "state_dict": {"w": np.zeros(3)}}, path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    elif kind == "strings_for_weights":
        torch.save({"model": config, "state_dict": {"w": "not a tensor"}}, path)
    elif kind == "unknown_model":
        save_checkpoint(path, {"model": {"name": "evil"}, "state_dict": state})
    elif kind == "unknown_option":
        save_checkpoint(path, {"model": dict(config, rm_rf=True), "state_dict": state})
    elif kind == "unknown_encoder":
        save_checkpoint(path, {"model": dict(config, encoder="no_such_net"), "state_dict": state})
    elif kind == "bare_state_dict_of_another_model":
        torch.save(model_lib.build_model("unet_res", encoder="resnet18").state_dict(), path)
        return ["--model", "unet_res", "--encoder", "mobilenetv3_small_050"]
    elif kind == "nan_weights":
        bad = {k: v.clone() for k, v in state.items()}
        bad["decoder.out.weight"][0, 0] = float("nan")
        save_checkpoint(path, {"model": config, "state_dict": bad})
    elif kind == "asks_to_fetch_and_read_files":  # options that would download or read: ignored, weights are here
        save_checkpoint(path, {"model": dict(config, pretrained=True, encoder_weights=str(victim)),
                               "state_dict": state})
    elif kind == "raw_pickle_exploit":  # pickle's default protocol: torch calls it an unsupported operand
        Path(path).write_bytes(pickle.dumps({"state_dict": exploit(victim)}))
    elif kind == "absurd_widths":  # a 3 MB file describing a decoder of ~10^12 parameters
        save_checkpoint(path, {"model": dict(config, decoder_channels=[2 ** 20] * 5), "state_dict": state})
    elif kind == "inflating_records":  # a small file with one deflated record of 64 MiB of zeros
        buf = io.BytesIO()
        torch.save({"model": config, "state_dict": state, "format": CKPT_FORMAT}, buf)
        with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                dst.writestr(info, src.read(info))
            bomb = zipfile.ZipInfo(src.namelist()[0].split("/")[0] + "/data/bomb")
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(bomb, "w") as f:
                for _ in range(64):
                    f.write(bytes(2 ** 20))
    elif kind == "named_pipe":  # opening it would block forever
        os.mkfifo(path)
    return []


HOSTILE = {  # kind: (exit status, the line on stderr; {ckpt} is the file)
    "empty": (2, "error: {ckpt}: checkpoint file is empty (0 bytes)"),
    "folder": (2, "error: {ckpt}: is a folder, not a checkpoint file"),
    "legacy_format_exploit": (2, "error: {ckpt}: refused: it holds Python objects other than tensors and plain types"),
    "numpy_inside": (2, "error: {ckpt}: refused: it holds Python objects other than tensors and plain types"),
    "not_a_dict": (2, "error: {ckpt}: not a checkpoint (holds a list, expected a dict)"),
    "strings_for_weights": (2, "error: {ckpt}: its state_dict holds something other than tensors"),
    "unknown_model": (2, "error: {ckpt}: cannot build the model it describes (unknown model 'evil'"),
    "unknown_option": (2, "error: {ckpt}: cannot build the model it describes "
                       "(model unet_res: got an unexpected keyword "
                          "argument 'rm_rf'"),
    "unknown_encoder": (2, "error: {ckpt}: cannot build the model it describes (unknown timm encoder 'no_such_net'"),
    "bare_state_dict_of_another_model": (2, "error: {ckpt}: weights do not fit model 'unet_res': "),
    "nan_weights": (3,
                    "warning: {ckpt}: 1 tensor(s) hold NaN/inf (e.g. decoder.out.weight); predictions will be wrong"),
    "asks_to_fetch_and_read_files": (0, None),
    "raw_pickle_exploit": (2, "error: {ckpt}: refused: it holds Python objects other than tensors and plain types "
                              "(loading it could run code)"),
    "absurd_widths": (2, "error: {ckpt}: weights do not fit model 'unet_res': "),
    "inflating_records": (2, "error: {ckpt}: refused: its records inflate to "),
    "named_pipe": (2, "error: {ckpt}: not a regular file (a named pipe, device or socket); refused"),
}


@QUIET
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_evaluate_refuses_hostile_checkpoints_in_one_line(reference, small_root, tmp_path, capsys, kind):
    ckpt, victim = str(tmp_path / f"{kind}.pth"), tmp_path / "pwned"
    extra = hostile_checkpoint(kind, os.path.join(reference["dir"], "best.pth"), ckpt, victim)
    rc = evaluate.main(["--data", small_root, "--split", "val", "--ckpt", ckpt, "--amp", "none",
                        "--out", str(tmp_path / "m.json"), "--save_dir", str(tmp_path / "preds")] + extra)
    status, line = HOSTILE[kind]
    err = capsys.readouterr().err
    assert rc == status, err
    if line:
        assert "weights_only" not in one_line(err, line.format(ckpt=ckpt))  # never advice to load it unsafely
    else:
        assert message_lines(err) == []
    assert not victim.exists()  # no code ran (and exit 0 for asks_to_fetch...: nothing was fetched or read)
    if kind == "nan_weights":  # evaluated, but the NaN metrics are null in the JSON, never a number
        m = json.loads((tmp_path / "m.json").read_text())
        assert m["rmse"] is None and m["frames"] == 4


def test_bare_state_dict_needs_model_name(ckpt_path, synthetic_root, tmp_path):
    sd = torch.load(ckpt_path, weights_only=True)["state_dict"]
    torch.save(sd, tmp_path / "bare.pth")
    r = run_eval(["--data", synthetic_root, "--ckpt", str(tmp_path / "bare.pth")])
    assert r.returncode == 2 and "--model" in r.stderr and r.stderr.strip().count("\n") == 0
    assert evaluate.main(["--data", synthetic_root, "--ckpt", str(tmp_path / "bare.pth"), "--model", "unet_res",
                          "--encoder", "resnet18", "--amp", "none"]) == 0


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(synthetic_root, tmp_path):
    victim = tmp_path / "pwned.txt"
    torch.save({"state_dict": _Exploit(str(victim))}, tmp_path / "evil.pth")
    with open(tmp_path / "evil_plain.pkl", "wb") as f:
        pickle.dump(_Exploit(str(victim)), f)
    for name, expected in (("evil.pth", "refused"), ("evil_plain.pkl", "refused")):
        r = run_eval(["--data", synthetic_root, "--ckpt", str(tmp_path / name)])
        assert r.returncode == 2 and expected in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0
    assert not victim.exists()


def test_wrong_model_and_corrupt_checkpoints(ckpt_path, synthetic_root, tmp_path):
    net = model_lib.build_model("resnet34")
    save_checkpoint(tmp_path / "other.pth", {"model": {"name": "unet_res", "encoder": "resnet18", "head": "clip"},
                                             "state_dict": net.state_dict()})
    (tmp_path / "trunc.pth").write_bytes(open(ckpt_path, "rb").read()[:5000])
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    cases = {"other.pth": "do not fit", "trunc.pth": "not a readable checkpoint",
             "random.pth": "not a readable checkpoint",
             "missing.pth": "not found"}
    for name, expected in cases.items():
        r = run_eval(["--data", synthetic_root, "--ckpt", str(tmp_path / name)])
        assert r.returncode == 2 and expected in r.stderr and str(tmp_path / name) in r.stderr, (name, r.stderr)
        assert r.stderr.strip().count("\n") == 0


# ------------------------------------------------------------------------------------------------
# main.py --resume

def resume_checkpoint(kind, ref_last, path, victim):
    """A broken or hostile checkpoint handed to `main.py --resume`."""
    ckpt = safe_load(ref_last)
    if kind == "exploit":
        torch.save({"args": exploit(victim)}, path)
    elif kind == "raw_pickle_exploit":
        import pickle
        Path(path).write_bytes(pickle.dumps(exploit(victim)))
    elif kind == "truncated":
        Path(path).write_bytes(Path(ref_last).read_bytes()[:os.path.getsize(ref_last) // 2])
    elif kind == "random_bytes":
        Path(path).write_bytes(np.random.default_rng(0).bytes(10000))
    elif kind == "empty":
        Path(path).write_bytes(b"")
    elif kind == "folder":
        os.makedirs(path)
    elif kind == "evaluation_only":
        save_checkpoint(path, {"model": ckpt["model"], "state_dict": ckpt["state_dict"]})
    elif kind == "no_optimizer":
        torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, path)
    elif kind == "weights_of_another_model":
        torch.save(dict(ckpt, state_dict=model_lib.build_model("unet_res", encoder="resnet18").state_dict()), path)
    elif kind == "unknown_model":
        torch.save(dict(ckpt, model={"name": "evil"}), path)
    elif kind == "optimizer_of_another_model":
        torch.save(dict(ckpt, optimizer={"state": {}, "param_groups": []}), path)
    elif kind == "damaged_rng":
        torch.save(dict(ckpt, rng={"torch": torch.zeros(3)}), path)


RESUME = {
    "exploit": "refused: it holds Python objects other than tensors and plain types",
    "raw_pickle_exploit": "refused: it holds Python objects other than tensors and plain types",
    "truncated": "not a readable checkpoint (truncated, corrupt or not a PyTorch file",
    "random_bytes": "not a readable checkpoint",
    "empty": "checkpoint file is empty (0 bytes)",
    "folder": "is a folder, not a checkpoint file",
    "missing": "checkpoint file not found",
    "evaluation_only":
        "not a main.py training checkpoint (no args, optimizer, epoch, step, best, history, rng recorded)",
    "no_optimizer": "not a main.py training checkpoint (no optimizer recorded)",
    "weights_of_another_model": "weights do not fit model 'unet_res': ",
    "unknown_model": "cannot build the model it describes (unknown model 'evil'",
    "optimizer_of_another_model": "cannot resume from it (damaged training state: "
                                  "ValueError: loaded state dict has a different "
                                  "number of parameter groups)",
    "damaged_rng": "cannot resume from it (damaged training state: TypeError: ",
}


@QUIET
@pytest.mark.parametrize("kind", list(RESUME))
def test_resume_refuses_hostile_or_broken_checkpoints_in_one_line(reference, tmp_path, capsys, kind):
    path, victim = str(tmp_path / "last.pth"), tmp_path / "pwned"
    resume_checkpoint(kind, os.path.join(reference["dir"], "last.pth"), path, victim)
    assert main_mod.main(["--resume", path]) == 2
    one_line(capsys.readouterr().err, f"error: {path}: {RESUME[kind]}")
    assert not victim.exists()
    assert sorted(os.listdir(tmp_path)) == (["last.pth"] if kind != "missing" else [])  # nothing written beside it


def test_resume_exploit_in_a_real_process(reference, tmp_path):
    path, victim = tmp_path / "last.pth", tmp_path / "pwned"
    resume_checkpoint("exploit", os.path.join(reference["dir"], "last.pth"), str(path), victim)
    r = run_script("main.py", ["--resume", path], env=ONE_THREAD)
    assert r.returncode == 2 and r.stdout == ""
    one_line(r.stderr, f"error: {path}: refused")
    assert not victim.exists()
