"""The reports' remaining details: the model's shapes (--summary, the ResNet-34 report's Table I), freezing the
encoder up to a named stage, and the ResNet-34 report's 224x224 scoring (evaluate.py --protocol resnet34_224)."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluate
import main as main_mod
import model as model_lib
from conftest import CONSTANT_DEPTH_M, write_frame

# the ResNet-34 report, Table I: (feature map, channels) through the decoder, after the encoder's 7x7x512 input
TABLE_I = [("Transposed Conv 1", 14, 256), ("Transposed Conv 2", 28, 128), ("Conv", 28, 128),
           ("Transposed Conv 3", 56, 64), ("Transposed Conv 4", 112, 32), ("Conv", 112, 32),
           ("Transposed Conv 5", 224, 1), ("Conv", 224, 1), ("Output", 224, 1)]


def conv_flops(net, rgb):
    """A second count of FLOPs: 2 x multiply-adds of every convolution, from forward hooks."""
    total = []

    def hook(m, inputs, out):
        if isinstance(m, nn.ConvTranspose2d):  # every input pixel meets every kernel tap
            total.append(2 * inputs[0][0].numel() * m.out_channels // m.groups * math.prod(m.kernel_size))
        else:
            total.append(2 * out[0].numel() * m.in_channels // m.groups * math.prod(m.kernel_size))
    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        net.eval()(rgb)
    for h in hooks:
        h.remove()
    return sum(total)


def test_summary_reproduces_table_one_of_the_resnet34_report(capsys):
    net = model_lib.build_model("resnet34")
    rows, hw, flops = model_lib.model_summary(net)
    assert hw == (224, 224)
    encoder = [r for r in rows if r["part"] == "encoder"]
    assert [r["shape"] for r in encoder] == [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    assert encoder[-1]["shape"] == (512, 7, 7)  # Table I's input: 7x7, 512 channels
    layers = [r for r in rows if r["part"] in ("decoder", "output")]
    assert [(r["shape"][1], r["shape"][2], r["shape"][0]) for r in layers] == [(s, s, c) for _, s, c in TABLE_I]
    kinds = [r["name"].split()[1] for r in layers[:-1]]  # the last Conv is our output conv ("out conv1x1")
    assert kinds == ["ConvTranspose2d" if n.startswith("Transposed") else "Conv2d" for n, _, _ in TABLE_I[:7]] + [
        "conv1x1"]
    # parameters by hand: ConvT 512->256 4x4 with bias, then its BN (weight, bias); a stage's count is its modules'
    assert layers[0]["params"] == 512 * 256 * 16 + 256 + 2 * 256
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in net.parameters())
    assert encoder[0]["params"] == 64 * 3 * 49 + 2 * 64  # conv1 7x7 (no bias) + bn1
    assert flops == conv_flops(net, torch.zeros(1, 3, 224, 224))
    assert main_mod.main(["--summary", "64x96", "--model", "unet_res", "--encoder", "resnet18"]) == 0
    out = capsys.readouterr().out  # the command line: the size asked for, stage by stage down to 1/32
    assert "input 3x64x96" in out and "512 x 2 x 3" in out and "1 x 64 x 96" in out and "GFLOPs per image" in out
    # the model flags shape it: decoder widths per stage, the scale the encoder works at
    assert main_mod.main(["--summary", "64x96", "--model", "unet_res", "--encoder", "resnet18", "--input_scale", "2",
                          "--decoder_channels", "40,30,20,10,5"]) == 0
    out = capsys.readouterr().out
    assert "encoder and decoder at 128x192, input_scale 2" in out and "512 x 4 x 6" in out and "40 x 8 x 12" in out
    assert "5 x 128 x 192" in out and "1 x 64 x 96" in out


# per family: the encoder's parameter-name prefixes through each stage (timm features_only names)
FAMILIES = {
    ("unet_res", "resnet18"): [["conv1.", "bn1."]] + [[f"layer{i}."] for i in range(1, 5)],
    ("effnet_unet", None): [["conv_stem.", "bn1.", "blocks.0."], ["blocks.1."], ["blocks.2."],
                            ["blocks.3.", "blocks.4."], ["blocks.5.", "blocks.6."]],
    ("convnext_unet", "convnext_atto"): [["stem_0.", "stem_1.", "stages_0."]] + [[f"stages_{i}."] for i in (1, 2, 3)],
}


@pytest.mark.parametrize("name,encoder", list(FAMILIES))
def test_freeze_up_to_a_stage_leaves_exactly_those_parameters_without_gradient(name, encoder):
    """--freeze stageK: exactly the encoder's parameters through stage K take no gradient (a backward pass leaves
    them None) and its batch norms stay in eval mode (running statistics kept) in a training model."""
    prefixes, built = FAMILIES[(name, encoder)], model_lib.build_model(name, encoder=encoder)
    for k in range(len(prefixes)):
        net = copy.deepcopy(built)
        model_lib.freeze_encoder(net, f"stage{k}")
        net.train()
        frozen = tuple(p for ps in prefixes[:k + 1] for p in ps)
        want = {n for n, _ in net.encoder.named_parameters() if n.startswith(frozen)}
        assert {n for n, p in net.encoder.named_parameters() if not p.requires_grad} == want, f"stage{k}"
        assert all(p.requires_grad for p in net.decoder.parameters())
        bns = {n: m for n, m in net.encoder.named_modules() if isinstance(m, nn.BatchNorm2d)}
        assert {n for n, m in bns.items() if not m.training} == {n for n in bns if (n + ".").startswith(frozen)}
        if k == 1:  # one real backward pass: the same parameters get no gradient, frozen BN statistics stay
            before = {n: m.running_mean.clone() for n, m in bns.items()}
            net(torch.rand(2, 3, 64, 64)).mean().backward()
            assert {n for n, p in net.encoder.named_parameters() if p.grad is None} == want
            assert {n for n, m in bns.items() if torch.equal(m.running_mean, before[n])} == {
                n for n in bns if (n + ".").startswith(frozen)}
    with pytest.raises(model_lib.UserError, match=f"stage{len(prefixes)}: encoder .* has stages stage0, "):
        model_lib.freeze_encoder(net, f"stage{len(prefixes)}")


def test_resize_center_crop_of_a_known_frame():
    """A 144x256 frame whose value is a ramp along x: the report's Resize((224, 224)) + CenterCrop((224, 224))
    is PIL's antialiased bilinear resize, about the ramp at the new pixel centres; an aspect-keeping
    Resize((224, 398)) + CenterCrop((224, 224)) keeps columns 87..310."""
    x = torch.arange(256, dtype=torch.float64)
    frame = (2.0 + 0.05 * x).expand(1, 1, 144, 256).contiguous()
    out = evaluate.resize_center_crop(frame, (224, 224), (224, 224))
    assert out.shape == (1, 1, 224, 224)
    pil = Image.fromarray(frame[0, 0].numpy().astype(np.float32), mode="F").resize((224, 224), Image.BILINEAR)
    assert np.abs(out[0, 0].numpy() - np.asarray(pil)).max() < 1e-5  # PIL's antialiased bilinear resize
    j = torch.arange(224, dtype=torch.float64)
    want = 2.0 + 0.05 * ((j + 0.5) * 256 / 224 - 0.5)  # the ramp at the new pixel centres, within the filter's wobble
    assert torch.allclose(out[0, 0, 100, 4:-4], want[4:-4], atol=0.005)
    assert torch.allclose(out[0, 0], out[0, 0, :1].expand(224, 224), atol=1e-12)  # rows stay equal
    crop = evaluate.resize_center_crop(frame, (224, 398), (224, 224))
    want = 2.0 + 0.05 * ((j + 87 + 0.5) * 256 / 398 - 0.5)
    assert crop.shape == (1, 1, 224, 224) and torch.allclose(crop[0, 0, 50], want, atol=1e-9)


def test_evaluate_protocol_resnet34_224_scores_at_224(constant_depth_ckpt, tmp_path):
    """A 7 m prediction against a depth ramp along y (2 m + 0.1 m per row): the split protocol scores the 144x256
    rows, resnet34_224 the 224 rows of the resized ramp (bilinear, half-pixel centres, clamped at the edges)."""
    rows = np.arange(144, dtype=np.float64)
    depth = np.repeat((2.0 + 0.1 * rows)[:, None], 256, axis=1).astype(np.float32)
    for name in ("0001", "0002"):
        write_frame(str(tmp_path / "data"), "val", name, np.full((144, 256, 3), 128, np.uint8), depth)
    results = {}
    for protocol in ("split", "resnet34_224"):
        out = tmp_path / f"{protocol}.json"
        assert evaluate.main(["--data", str(tmp_path / "data"), "--split", "val", "--ckpt", constant_depth_ckpt,
                              "--amp", "none", "--protocol", protocol, "--out", str(out)]) == 0
        results[protocol] = json.loads(out.read_text())
    native = 2.0 + 0.1 * rows
    resized = 2.0 + 0.1 * np.clip((np.arange(224) + 0.5) * 144 / 224 - 0.5, 0, 143)
    rmse = lambda d: math.sqrt(np.mean((CONSTANT_DEPTH_M - d) ** 2))
    assert results["split"]["rmse"] == pytest.approx(rmse(native), rel=1e-5)
    assert results["resnet34_224"]["rmse"] == pytest.approx(rmse(resized), rel=1e-5)
    assert results["resnet34_224"]["protocol"] == "resnet34_224"
