"""main.py --export CKPT OUT.pth --ensemble CKPT2 ...: one checkpoint whose model averages its members' predictions;
evaluate.py, --export_fp16 and graph export take it like any checkpoint; wrong members fail in one line;
--member K takes one model back out."""
import functools
import os

import pytest
import torch

import main as main_mod
import model as model_lib
from checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from conftest import evaluate_out, split_copy
from dataset import DepthDataset
from export import load_graph
from model import predict_depth
from utils import add_sums, metric_sums, summarize


def member(path, seed, name="unet_res", encoder="mobilenetv3_small_050", spread=300.0):
    """A small model with random weights spread so that its predictions span metres, saved as a checkpoint."""
    torch.manual_seed(seed)
    net = model_lib.build_model(name, encoder=encoder)
    with torch.no_grad():
        net.decoder.out.weight.mul_(spread)
    save_checkpoint(path, {"model": dict(net.config), "state_dict": net.state_dict(), "input_size": None,
                           "args": {"seed": seed}})
    return str(path)


def loaded(path):
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt["model"], ckpt["state_dict"], path).eval()


def refused_in_one_line(capsys, argv, *fragments):
    """main.py refuses argv with exit 2 and one stderr line holding every fragment."""
    assert main_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(f in err for f in fragments), err


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    return [member(folder / f"m{k}.pth", seed=k) for k in range(3)]


def test_ensemble_predicts_the_mean_of_its_members(members, synthetic_root, tmp_path):
    out = str(tmp_path / "ens.pth")
    assert main_mod.main(["--export", members[0], out, "--ensemble", *members[1:], "--export_tta", "flip"]) == 0
    ckpt = read_checkpoint(out)
    assert ckpt["model"]["name"] == "ensemble" and len(ckpt["model"]["members"]) == 3
    assert ckpt["members_from"] == ["m0.pth", "m1.pth", "m2.pth"]
    assert [a["seed"] for a in ckpt["members_args"]] == [0, 1, 2]
    test = DepthDataset(synthetic_root, split="test")
    rgb = torch.stack([test.load(i)[0] for i in range(len(test))])
    depth = torch.stack([test.load(i)[1] for i in range(len(test))])
    nets, ens = [loaded(p) for p in members], loaded(out)
    with torch.inference_mode():
        for tta in (False, True):
            each = [predict_depth(n, rgb, tta=tta) for n in nets]
            want, got = torch.stack(each).mean(0), predict_depth(ens, rgb, tta=tta)
            assert (got - want).abs().max().item() < 1e-4
            assert min((a - b).abs().mean().item() for a in each for b in each if a is not b) > 0.5  # members differ
    # evaluate.py on the ensemble file: its default TTA is the one exported (flip), its figures those of the mean
    total = {}
    with torch.inference_mode():
        add_sums(total, metric_sums(torch.stack([predict_depth(n, rgb, tta=True) for n in nets]).mean(0), depth))
    want_metrics = summarize(total)
    got_metrics = evaluate_out(["--data", split_copy(synthetic_root, tmp_path / "test"), "--ckpt", out],
                               tmp_path / "m.json")
    assert got_metrics["tta"] == "flip"
    assert got_metrics["rmse"] == pytest.approx(want_metrics["rmse"], abs=1e-4)
    assert got_metrics["ssim"] == pytest.approx(want_metrics["ssim"], abs=1e-4)
    # fp16 halves the file and moves predictions by little; a graph exported from the ensemble file reproduces it
    half = str(tmp_path / "ens16.pth")
    assert main_mod.main(["--export", members[0], half, "--ensemble", *members[1:], "--export_fp16"]) == 0
    assert 0.45 < os.path.getsize(half) / os.path.getsize(out) < 0.55
    with torch.inference_mode():
        assert (predict_depth(loaded(half), rgb) - predict_depth(ens, rgb)).abs().mean().item() < 0.05
    graph = str(tmp_path / "ens.pt")
    assert main_mod.main(["--export", out, graph]) == 0  # export's own parity check passed
    with torch.inference_mode():
        assert (load_graph(graph)[0](rgb) - predict_depth(ens, rgb, tta=True)).abs().max().item() < 1e-3


def test_wrong_ensembles_fail_in_one_line(members, tmp_path, capsys):
    refused = functools.partial(refused_in_one_line, capsys)
    out = str(tmp_path / "ens.pth")
    refused(["--ensemble", members[1]], "--ensemble goes with --export")
    refused(["--export", members[0], str(tmp_path / "ens.pt"), "--ensemble", members[1]], "writes a .pth")
    assert main_mod.main(["--export", members[0], out, "--ensemble", members[1]]) == 0
    refused(["--export", members[2], str(tmp_path / "e2.pth"), "--ensemble", out], "ens.pth: already an ensemble")
    r34 = member(tmp_path / "r34.pth", seed=0, name="resnet34", encoder=None, spread=1.0)  # a fixed 224x224 input
    refused(["--export", members[0], str(tmp_path / "e3.pth"), "--ensemble", r34], "r34.pth: input size", "share")
    bad = tmp_path / "bad.pth"
    ckpt = read_checkpoint(members[1])
    save_checkpoint(bad, dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if "decoder" not in k}))
    refused(["--export", members[0], str(tmp_path / "e4.pth"), "--ensemble", str(bad)], "bad.pth: weights do not fit")
    refused(["--init", out, "--max_epochs", "1"], f"--init {out}: an ensemble of 2 models", "--member K")
    one = tmp_path / "one.pth"
    save_checkpoint(one, {"model": {"name": "ensemble", "members": [ckpt["model"]]},
                          "state_dict": {f"members.0.{k}": v for k, v in ckpt["state_dict"].items()}})
    refused(["--export", str(one), str(tmp_path / "e5.pth"), "--ensemble", members[0]], "one.pth: already an ensemble")
    import evaluate
    assert evaluate.main(["--data", str(tmp_path), "--ckpt", str(one)]) == 2
    assert "one.pth: cannot build the model it describes (an ensemble has 2 to 8 members, got 1)" in \
        capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / f"e{k}.pth") for k in range(2, 6))  # nothing written when refused


def test_member_takes_one_model_back_out_bit_for_bit(members, tmp_path, capsys):
    refused = functools.partial(refused_in_one_line, capsys)
    ens, ens16 = str(tmp_path / "ens.pth"), str(tmp_path / "ens16.pth")
    assert main_mod.main(["--export", members[0], ens, "--ensemble", *members[1:]]) == 0
    assert main_mod.main(["--export", members[0], ens16, "--ensemble", *members[1:], "--export_fp16"]) == 0
    for k, source in enumerate(members, start=1):
        out = str(tmp_path / f"m{k}.pth")
        assert main_mod.main(["--export", ens, out, "--member", str(k)]) == 0
        got, want = read_checkpoint(out), read_checkpoint(source)
        assert got["model"] == want["model"] and got["args"] == want["args"] and got["tta"] is None
        assert got["state_dict"].keys() == want["state_dict"].keys()
        assert all(torch.equal(got["state_dict"][n], v) for n, v in want["state_dict"].items())
        half = str(tmp_path / f"m{k}_16.pth")  # from the fp16 ensemble: the member's weights in fp16, as stored
        capsys.readouterr()
        assert main_mod.main(["--export", ens16, half, "--member", str(k)]) == 0
        assert "MiB, fp16 weights)" in capsys.readouterr().out  # what was written, without --export_fp16 too
        assert all(torch.equal(read_checkpoint(half)["state_dict"][n], v.half())
                   for n, v in want["state_dict"].items() if v.is_floating_point())
    refused(["--export", ens, str(tmp_path / "x4.pth"), "--member", "4"], "ens.pth: an ensemble of 3 models",
            "1 to 3, got 4")
    refused(["--export", members[0], str(tmp_path / "x5.pth"), "--member", "1"], "m0.pth: not an ensemble")
    refused(["--export", ens, str(tmp_path / "x6.pt"), "--member", "1"], "x6.pt: --member writes a .pth")
    refused(["--export", ens, str(tmp_path / "x7.pth"), "--member", "1", "--ensemble", members[0]], "pick one")
    refused(["--member", "1"], "--member goes with --export")
    refused(["--export", ens, str(tmp_path / "m1.pth"), "--member", "1"], "m1.pth: exists")  # never overwritten
    assert not any(os.path.exists(tmp_path / f"x{k}.{s}") for k in range(4, 8) for s in ("pth", "pt"))
