"""Numerics: NaN/inf losses and NaN gradients stop a run naming the step and keep the last good checkpoint; the
grad scaler skips an overflowing step; fp16 where it cannot run; the same seed gives the same numbers to the last bit.

    python -m pytest -q tests/test_numerics.py

Guarantees and limits: docs/reliability.md.
"""
import os

import pytest
import torch

import losses
import main as main_mod
from conftest import TIMING, assert_same_run, one_line, read_csv, sha, train_args
from safe_load import safe_load

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ------------------------------------------------------------------------------------------------
# determinism

def test_same_seed_same_numbers(small_root, reference, tmp_path):
    assert main_mod.main(train_args(small_root, tmp_path, "again")) == 0
    rows = read_csv(tmp_path / "again" / "metrics.csv")
    ref_rows = read_csv(os.path.join(reference["dir"], "metrics.csv"))
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in ref_rows]  # identical to the last digit
    a, b = weights(tmp_path / "again" / "last.pth"), weights(os.path.join(reference["dir"], "last.pth"))
    assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------------------
# NaN and inf

def term_that_goes_bad(at_call, how, on_call=None):
    """A stand-in for the 'mse' loss term: right, except on training call `at_call`, where it returns NaN
    ('nan_loss'), inf ('inf_loss') or a finite value with NaN gradients ('nan_grad': d sqrt(x)/dx at 0 is inf,
    times 0)."""
    real, calls = losses.TERMS["mse"], [0]

    def term(pred, gt):
        calls[0] += 1
        out = real(pred, gt)
        if calls[0] == at_call:
            if on_call:
                on_call()
            out = out * float(how[:3]) if how.endswith("_loss") else out + (pred * 0).abs().sqrt().mean()
        return out
    return term


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        small_root, reference, tmp_path, monkeypatch, capsys):
    last = tmp_path / "n" / "last.pth"
    seen = {}
    monkeypatch.setitem(losses.TERMS, "mse", term_that_goes_bad(6, "nan_loss", lambda: seen.update(sha=sha(last))))
    assert main_mod.main(train_args(small_root, tmp_path, "n")) == 1
    one_line(capsys.readouterr().err,
             f"error: loss is nan at step 6 (epoch 2); stopping. The last good checkpoint is kept: {last}")
    assert sha(last) == seen["sha"] and safe_load(last)["step"] == 4  # untouched since epoch 1 ended
    monkeypatch.undo()
    assert main_mod.main(["--resume", str(last)]) == 0  # and the kept checkpoint continues to the same end
    assert_same_run(str(tmp_path / "n"), reference["dir"])


def test_inf_loss_before_any_checkpoint_says_so(small_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(losses.TERMS, "mse", term_that_goes_bad(2, "inf_loss"))
    assert main_mod.main(train_args(small_root, tmp_path, "n0")) == 1
    one_line(capsys.readouterr().err,
             "error: loss is inf at step 2 (epoch 1); stopping. No checkpoint had been written yet.")
    assert not (tmp_path / "n0" / "last.pth").exists()


def test_nan_gradients_never_replace_a_good_checkpoint(small_root, tmp_path, monkeypatch, capsys):
    """A finite loss with NaN gradients on the last step of epoch 2 poisons the weights: the epoch-end
    save refuses them, names the step, and last.pth stays the one of epoch 1."""
    last = tmp_path / "g" / "last.pth"
    seen = {}
    monkeypatch.setitem(losses.TERMS, "mse", term_that_goes_bad(8, "nan_grad", lambda: seen.update(sha=sha(last))))
    assert main_mod.main(train_args(small_root, tmp_path, "g", "--max_epochs", "2")) == 1
    one_line(capsys.readouterr().err, "error: weights hold NaN/inf (e.g. ", "after step 8 (epoch 2); stopping. "
             f"The last good checkpoint is kept: {last}")
    assert sha(last) == seen["sha"] and not (tmp_path / "g" / "best.pth").exists()


# ------------------------------------------------------------------------------------------------
# the grad scaler and fp16

def tiny_step_setup(device="cpu"):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 1, 3, padding=1).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rgb, depth = torch.rand(2, 3, 8, 8, device=device), torch.rand(2, 1, 8, 8, device=device) * 20
    return net, opt, rgb, depth


def test_overflowing_step_is_skipped_by_an_enabled_grad_scaler_not_fatal():
    """The fp16 path's logic, on CPU: GradScaler finds inf/NaN gradients, skips that optimizer step and halves
    its scale; training goes on. (Real fp16 autocast overflow needs CUDA: see the CUDA-only test below.)"""
    net, opt, rgb, depth = tiny_step_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    bad_grad = lambda p, g: ((p - g) ** 2).mean() + (p * 0).abs().sqrt().mean()
    before = [p.detach().clone() for p in net.parameters()]
    loss = main_mod.train_step(net, None, rgb, depth, lambda p, g: (bad_grad(p, g), {}), opt, None, scaler, None, False)
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # skipped
    main_mod.train_step(net, None, rgb, depth, lambda p, g: (((p - g) ** 2).mean(), {}), opt, None, scaler, None, False)
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # and the next step trains


def test_disabled_grad_scaler_is_a_plain_step():
    """On a CPU main.py's GradScaler is disabled (no fp16): train_step is exactly loss.backward(); step()."""
    net, opt, rgb, depth = tiny_step_setup()
    twin = torch.nn.Conv2d(3, 1, 3, padding=1)
    twin.load_state_dict(net.state_dict())
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    mse = lambda p, g: (((p - g) ** 2).mean(), {})
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    main_mod.train_step(net, None, rgb, depth, mse, opt, None, scaler, None, False)
    mse(twin(rgb), depth)[0].backward()
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_fp16_on_a_cpu_is_refused_in_one_line(small_root, tmp_path, capsys):
    assert main_mod.main(train_args(small_root, tmp_path, "f", "--amp", "fp16")) == 2
    one_line(capsys.readouterr().err, "error: --amp fp16 is for CUDA; on a CPU use --amp bf16 or none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
def test_fp16_overflow_steps_are_skipped_on_cuda():
    import model as model_lib
    torch.manual_seed(0)
    net = model_lib.build_model("unet_res", encoder="mobilenetv3_small_050").cuda().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)  # far too large: the first steps overflow in fp16
    rgb, depth = torch.rand(4, 3, 48, 64, device="cuda"), torch.rand(4, 1, 48, 64, device="cuda") * 20
    loss_fn = losses.build_loss("mse+0.15*ssim+0.05*edge")
    before = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    main_mod.train_step(net, None, rgb, depth, loss_fn, opt, None, scaler, torch.float16, True)
    assert scaler.get_scale() < 2.0 ** 40
    assert all(torch.equal(before[k], p) for k, p in net.named_parameters())  # skipped, not fatal
    for _ in range(40):
        main_mod.train_step(net, None, rgb, depth, loss_fn, opt, None, scaler, torch.float16, True)
    assert any(not torch.equal(before[k], p) for k, p in net.named_parameters())
    assert all(torch.isfinite(p).all() for p in net.parameters())
