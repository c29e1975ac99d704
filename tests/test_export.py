"""main.py --export OUT.pt|OUT.onnx: graphs that reproduce predict_depth, carry their contract, fail in one line."""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import export as export_lib
import main as main_mod
import model as model_lib
from checkpoint import model_from_checkpoint, save_checkpoint
from dataset import DepthDataset
from export import CONTRACT_KEY, PARITY_TOL_M, load_graph
from model import predict_depth
from safe_load import safe_load


def needs_onnx(suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")


def save_small(net, path, tta=None):
    save_checkpoint(path, {"model": dict(net.config), "state_dict": net.state_dict(), "input_size": None, "tta": tta})
    return str(path)


@pytest.fixture(scope="module")
def flip_ckpt(tmp_path_factory):
    """A small effnet_unet whose random weights are spread so predictions span metres, with flip TTA named."""
    torch.manual_seed(0)
    net = model_lib.build_model("effnet_unet")
    with torch.no_grad():
        net.decoder.out.weight.mul_(300.0)
    return save_small(net, tmp_path_factory.mktemp("export") / "flip.pth", tta="flip")


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_graph_reproduces_predict_depth_on_synthetic_frames(flip_ckpt, synthetic_root, tmp_path, suffix):
    needs_onnx(suffix)
    out = tmp_path / ("model" + suffix)
    assert main_mod.main(["--export", flip_ckpt, str(out)]) == 0
    predict, contract = load_graph(str(out))
    ckpt = safe_load(flip_ckpt)
    net = model_from_checkpoint(ckpt["model"], ckpt["state_dict"], flip_ckpt).eval()
    test = DepthDataset(synthetic_root, split="test")
    rgb = torch.stack([test.load(i)[0] for i in range(len(test))])  # batch 6 (traced at 2), 144x256
    for frames in (rgb, rgb[:1, :, 5:102, 7:138]):  # and one odd-sized crop, 97x131
        with torch.inference_mode():
            want = predict_depth(net, frames, tta=True)  # the checkpoint names flip: the graph has it inside
        got = predict(frames)
        assert got.shape == want.shape == (len(frames), 1, *frames.shape[-2:])
        assert (got - want).abs().max().item() <= PARITY_TOL_M
        assert want.std() > 0.5 and 0 <= got.min() and got.max() <= 20  # metres that vary, clamped inside
    assert contract["tta"] == "flip" and contract["input"]["range"] == [0.0, 1.0] and contract["source"] == "flip.pth"
    assert contract["output"]["name"] == "depth_m" and contract["model"]["name"] == "effnet_unet"
    assert main_mod.main(["--export", flip_ckpt, str(out), "--export_tta", "none"]) == 2  # never overwritten


def test_onnx_file_names_its_dynamic_axes_and_contract(flip_ckpt, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "no_tta.onnx"
    assert main_mod.main(["--export", flip_ckpt, str(out), "--export_tta", "none"]) == 0
    proto = onnx.load(str(out))
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert [i.name for i in proto.graph.input] == ["rgb"] and [o.name for o in proto.graph.output] == ["depth_m"]
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(proto.graph.output[0]) == ["batch", 1, "height", "width"]
    contract = json.loads({p.key: p.value for p in proto.metadata_props}[CONTRACT_KEY])
    assert contract["tta"] == "none" and contract["dynamic_axes"] == ["batch", "height", "width"]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_model_the_onnx_exporter_lacks_fails_in_one_line(tmp_path, capsys):
    needs_onnx(".onnx")
    ckpt = save_small(model_lib.build_model("resnet34"), tmp_path / "r34.pth")  # antialiased resize to 224x224
    assert main_mod.main(["--export", ckpt, str(tmp_path / "r34.onnx")]) == 2
    line = one_error_line(capsys)
    assert "cannot be exported to ONNX" in line and "resnet34" in line
    assert not os.path.exists(tmp_path / "r34.onnx")


class FrozenBranch(nn.Module):
    """A model whose output depends on a Python branch on the image width: a trace keeps one branch only."""

    def forward(self, rgb):
        return rgb[:, :1] * (10.0 if rgb.shape[-1] > 200 else 5.0)


def test_graph_that_froze_a_branch_fails_the_parity_check_in_one_line(flip_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_lib, "model_from_checkpoint", lambda *_: FrozenBranch())
    assert main_mod.main(["--export", flip_ckpt, str(tmp_path / "frozen.pt")]) == 2
    line = one_error_line(capsys)
    assert "does not reproduce the model at 75x133" in line and not os.path.exists(tmp_path / "frozen.pt")


def test_missing_onnx_packages_and_wrong_suffix_say_what_to_do(flip_ckpt, tmp_path, capsys, monkeypatch):
    assert main_mod.main(["--export", flip_ckpt, str(tmp_path / "m.tflite")]) == 2
    assert ".pth (checkpoint), .pt (TorchScript) or .onnx (ONNX)" in one_error_line(capsys)
    assert main_mod.main(["--export", flip_ckpt, str(tmp_path / "m.pt"), "--export_fp16"]) == 2
    assert "--export_fp16 is for .pth" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    assert main_mod.main(["--export", flip_ckpt, str(tmp_path / "m.onnx")]) == 2
    assert "pip install onnx onnxruntime" in one_error_line(capsys)
    assert not os.listdir(tmp_path)
