"""main.py end to end on tiny synthetic data: outputs, checkpoint format, exact resume, recipes, DDP, errors."""
import csv
import functools
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import main as main_mod
import model as model_lib
import schedules
from checkpoint import model_from_checkpoint
from safe_load import safe_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "unet_res", "--encoder", "resnet18", "--no-pretrained", "--batch_size", "4",
        "--train_eval_frames", "8", "--visualize_every", "0", "--seed", "3", "--device", "cpu", "--amp", "none"]


TWO_EPOCHS = ["--max_epochs", "2", "--evaluate_every", "1"] + FAST


def run_main(args, cwd=None, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + args, cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_epoch_run(small_synthetic_root, tmp_path_factory):
    """An uninterrupted run of two epochs, evaluated after each (test_resume_equals_uninterrupted cuts it)."""
    out = tmp_path_factory.mktemp("runs")
    assert main_mod.main(["--data_dir", small_synthetic_root, "--ckpt_dir", str(out), "--ckpt_name", "r"]
                         + TWO_EPOCHS) == 0
    yield os.path.join(out, "r")
    shutil.rmtree(out)  # 0.9 GB of resnet18 checkpoints: CI's disk is small


def test_two_epochs_write_everything(two_epoch_run):
    files = set(os.listdir(two_epoch_run))
    assert {"metrics.csv", "curves.png", "best.pth", "last.pth", "epoch002.pth", "figures"} <= files
    rows = read_csv(os.path.join(two_epoch_run, "metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[-1]["val_rmse"] and rows[-1]["train_ssim"]
    assert 0 < float(rows[-1]["val_rmse"]) < 20 and -1 <= float(rows[-1]["val_ssim"]) <= 1
    figs = os.listdir(os.path.join(two_epoch_run, "figures"))
    assert len([f for f in figs if f.startswith("epoch002_val")]) == 3  # val frames 0, 4, 7 of 8
    assert [f for f in figs if f.startswith("epoch002_train")] == ["epoch002_train12.png"]  # train frame 24 // 2


def test_the_loss_per_step_averages_to_the_epochs_train_loss(two_epoch_run):
    """loss_steps.csv: one row per step (2 epochs of 24 frames / batch 4), whose per-epoch mean is metrics.csv's
    train_loss (one batch size: the frame-weighted mean is the plain mean)."""
    steps, rows = read_csv(os.path.join(two_epoch_run, "loss_steps.csv")), read_csv(os.path.join(two_epoch_run,
                                                                                                  "metrics.csv"))
    assert [int(r["step"]) for r in steps] == list(range(1, 13))
    assert [int(r["epoch"]) for r in steps] == [1] * 6 + [2] * 6
    for row in rows:
        losses = [float(r["loss"]) for r in steps if r["epoch"] == row["epoch"]]
        assert sum(losses) / len(losses) == pytest.approx(float(row["train_loss"]), rel=1e-12)
    assert float(steps[-1]["lr"]) == pytest.approx(float(rows[-1]["lr"]), rel=1e-12)  # the LR after the last step
    ckpt = safe_load(os.path.join(two_epoch_run, "last.pth"))
    assert [r[2] for r in ckpt["step_log"]] == [float(r["loss"]) for r in steps]  # the checkpoint keeps it all


def test_init_fine_tunes_from_the_checkpoints_weights(two_epoch_run, small_synthetic_root, tmp_path, capsys):
    """--init: a new run folder, fresh optimizer and schedule, and its first step's loss is the checkpoint's model's
    loss on the first batch (computed here independently); another model named by a flag is one line."""
    import dataset
    import losses
    init = os.path.join(two_epoch_run, "last.pth")
    flags = FAST[FAST.index("--no-pretrained"):] + ["--augment", "none", "--channels_last", "off"]
    argv = ["--init", init, "--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path), "--max_epochs",
            "1"] + flags
    assert main_mod.main(argv) == 0
    run_dir = tmp_path / "unet_res"  # the model's name, from the checkpoint
    first = read_csv(run_dir / "loss_steps.csv")[0]
    ckpt = safe_load(init)
    net = model_from_checkpoint(ckpt["model"], ckpt["state_dict"], init).train()
    train = dataset.DepthDataset(small_synthetic_root, split="train")
    idx = dataset.epoch_order(len(train), 3, 0, 0, 1)[:4]  # --seed 3, epoch 0, one process; batch 4
    rgb, depth_m = torch.stack([train[i][0] for i in idx]), torch.stack([train[i][1] for i in idx])
    loss_fn = losses.build_loss(ckpt["args"]["loss"], clip_aware_terms=True)
    with torch.no_grad():
        want = loss_fn(net(rgb), depth_m)[0].item()
        scratch = loss_fn(model_lib.build_model("unet_res", encoder="resnet18").train()(rgb), depth_m)[0].item()
    assert float(first["loss"]) == pytest.approx(want, rel=1e-4) and abs(scratch - want) > 0.05 * want
    new = safe_load(run_dir / "last.pth")
    assert new["step"] == 6 and [h["epoch"] for h in new["history"]] == [1] and new["args"]["init"] == init
    assert new["scheduler"]["total_steps"] == 6  # its own one-epoch schedule, not the 12 steps of the first run
    assert "initialised from" in capsys.readouterr().out
    assert main_mod.main(argv + ["--model", "effnet_unet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--model effnet_unet (it holds unet_res)" in err


def test_checkpoint_reloads_weights_only_into_the_right_model(two_epoch_run, small_synthetic_root):
    ckpt = torch.load(os.path.join(two_epoch_run, "best.pth"), map_location="cpu", weights_only=True)
    assert ckpt["format"] == "depthkit-checkpoint-v1" and ckpt["model"]["name"] == "unet_res"
    assert ckpt["model"]["encoder"] == "resnet18" and ckpt["best"]["epoch"] in (1, 2)
    net = model_lib.build_model(**ckpt["model"])
    net.load_state_dict(ckpt["state_dict"])
    # the recorded val metrics are reproduced by the reloaded model
    from dataset import DepthDataset
    from evaluate import evaluate_batches
    from utils import summarize
    val = DepthDataset(small_synthetic_root, split="val")
    batches = [(torch.stack([val[i][0] for i in range(len(val))]), torch.stack([val[i][1] for i in range(len(val))]))]
    net.to(memory_format=torch.channels_last)  # as main.py evaluates on a CPU (channels_last auto)
    m = summarize(evaluate_batches(net, batches, "cpu", channels_last=True))
    rows = read_csv(os.path.join(two_epoch_run, "metrics.csv"))
    best_row = [r for r in rows if int(r["epoch"]) == ckpt["best"]["epoch"]][0]
    assert m["rmse"] == pytest.approx(float(best_row["val_rmse"]), abs=1e-6)
    assert m["ssim"] == pytest.approx(float(best_row["val_ssim"]), abs=1e-6)
    # state_dict is the weight average (EMA); the raw weights ride along for resuming and score val_raw_*
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["train_state_dict"][k]) for k in ckpt["state_dict"])
    net.load_state_dict(ckpt["train_state_dict"])
    raw = summarize(evaluate_batches(net, batches, "cpu", channels_last=True))
    assert raw["rmse"] == pytest.approx(float(best_row["val_raw_rmse"]), abs=1e-6)


def test_resume_equals_uninterrupted(two_epoch_run, small_synthetic_root, tmp_path):
    """The same run stopped after epoch 1 and resumed: every epoch's metrics, every step's loss and the weights (the
    average and the raw ones) are those of the uninterrupted two_epoch_run."""
    assert main_mod.main(["--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path), "--ckpt_name", "cut",
                          "--stop_after_epochs", "1"] + TWO_EPOCHS) == 0
    assert main_mod.main(["--resume", str(tmp_path / "cut" / "last.pth")]) == 0
    full_dir, cut_dir = two_epoch_run, str(tmp_path / "cut")
    full, cut = read_csv(os.path.join(full_dir, "metrics.csv")), read_csv(os.path.join(cut_dir, "metrics.csv"))
    assert len(full) == len(cut) == 2
    for a, b in zip(full, cut):
        for key in ("train_loss", "val_rmse", "val_ssim", "train_rmse", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key
    steps_full, steps_cut = [read_csv(os.path.join(d, "loss_steps.csv")) for d in (full_dir, cut_dir)]
    assert [r["step"] for r in steps_full] == [r["step"] for r in steps_cut] == [str(i) for i in range(1, 13)]
    assert all(float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-6) for a, b in zip(steps_full, steps_cut))
    wa = torch.load(os.path.join(full_dir, "last.pth"), weights_only=True)["state_dict"]
    wb = torch.load(os.path.join(cut_dir, "last.pth"), weights_only=True)["state_dict"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)
    ra = torch.load(os.path.join(full_dir, "last.pth"), weights_only=True)["train_state_dict"]
    rb = torch.load(os.path.join(cut_dir, "last.pth"), weights_only=True)["train_state_dict"]
    assert all(torch.allclose(ra[k].float(), rb[k].float(), atol=1e-6) for k in ra)


def test_resume_keeps_the_schedule_length(two_epoch_run, capsys):
    """A finished run resumed as it was is done at once; asking it for more epochs of its onecycle schedule (laid out
    over its own steps) is one line, not torch's 'Tried to step' traceback."""
    last = os.path.join(two_epoch_run, "last.pth")
    before = open(last, "rb").read()
    assert main_mod.main(["--resume", last]) == 0
    assert main_mod.main(["--resume", last, "--max_epochs", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "laid out over 12 steps" in err and "asks for 18" in err
    assert open(last, "rb").read() == before


def test_recipes_are_the_reports_way_and_say_what_differs(capsys):
    """--recipe: the report's plain 1x1-conv output and loss (no clip-aware terms), no EMA, train metrics on all
    frames; the printout lists what it cannot reproduce."""
    import losses
    for name in ("convnext_report", "resnet34_report"):
        args = main_mod.parse_args(["--recipe", name])[0]
        assert (args.head, args.ema, args.train_eval_frames, args.augment) == ("linear", 0.0, 0, "none")
        out = capsys.readouterr().out
        assert "not as in the report:" in out and "GPU" in out
    pred, gt = torch.full((1, 1, 4, 4), 25.0), torch.full((1, 1, 4, 4), 20.0)
    assert losses.build_loss("mse", clip_aware_terms=False)(pred, gt)[0].item() == pytest.approx(25.0)
    assert losses.build_loss("mse")(pred, gt)[0].item() == 0.0  # the clip head's loss: >20 m is right at the clip
    net = model_lib.build_model("effnet_unet", head="linear").eval()
    # PyTorch's init (bias within 1/sqrt(fan_in)), not the clip head's 10 m start
    assert abs(net.decoder.out.bias.item()) <= 1 / net.decoder.out.in_channels ** 0.5
    with torch.no_grad():
        net.decoder.out.bias.fill_(30.0)
        assert net(torch.rand(1, 3, 64, 64)).min().item() > 20.0  # the linear head is not clamped...
        assert model_lib.predict_depth(net, torch.rand(1, 3, 64, 64)).max().item() == 20.0  # ...the harness is


def test_ema_update_is_the_running_average():
    net, ema = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        net.weight.fill_(2.0); ema.weight.fill_(1.0)
        net.running_mean.fill_(4.0); ema.running_mean.fill_(0.0)
    net.num_batches_tracked.fill_(7)
    main_mod.ema_update(ema, net, decay=0.9, step=1000)  # past the warm-up: d = 0.9
    assert torch.allclose(ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.allclose(ema.running_mean, torch.full((3,), 0.4)) and int(ema.num_batches_tracked) == 7
    main_mod.ema_update(ema, net, decay=0.9, step=0)  # warm-up: d = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.weight, torch.full((3,), 0.1 * 1.1 + 0.9 * 2.0))


def test_clock_one_cycle_is_torchs_onecycle():
    """The time-budget schedule has OneCycleLR's shape: compare with torch's at the same fraction of the run."""
    n = 20001
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=n, cycle_momentum=False)
    for k in range(n):
        if k % 1000 == 0 or k == n - 1:
            assert opt.param_groups[0]["lr"] == pytest.approx(schedules.one_cycle_factor(k / (n - 1)), rel=2e-3,
                                                              abs=1e-8)
        opt.step(); sched.step()
    assert schedules.one_cycle_factor(0.3) == 1.0 and schedules.one_cycle_factor(2.0) == pytest.approx(1 / 25 / 1e4)


def test_time_budget_stops_on_time_and_anneals(small_synthetic_root, tmp_path):
    budget_min = 1e-4  # 6 ms: used up by the first step, whatever this machine's speed
    assert main_mod.main(["--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path), "--ckpt_name", "t",
                          "--time_budget", str(budget_min)] + FAST) == 0
    rows = read_csv(tmp_path / "t" / "metrics.csv")
    assert len(rows) == 1 and rows[0]["step"] == "1" and float(rows[0]["train_minutes"]) >= budget_min
    assert float(rows[0]["lr"]) == pytest.approx(1e-3 / 25 / 1e4) and rows[0]["val_rmse"]  # annealed, then evaluated
    assert safe_load(tmp_path / "t" / "best.pth")["train_seconds"] >= 60 * budget_min


def test_recipes_set_what_the_reports_say(capsys):
    a = main_mod.parse_args(["--recipe", "convnext_report"])[0]
    assert (a.model, a.encoder, a.loss, a.optimizer, a.encoder_lr, a.lr, a.scheduler, a.batch_size, a.max_epochs) == \
        ("convnext_unet", "convnext_base", "mse+0.15*ssim+0.05*edge", "adamw", 1e-4, 1e-3, "onecycle", 64, 80)
    assert "recipe convnext_report" in capsys.readouterr().out
    b = main_mod.parse_args(["--recipe", "resnet34_report", "--batch_size", "8"])[0]
    assert (b.model, b.loss, b.optimizer, b.lr, b.weight_decay, b.scheduler, b.max_epochs, b.batch_size) == \
        ("resnet34", "rmse+ssim", "adam", 1e-3, 1e-5, "cyclic", 100, 8)
    assert "overridden by flags: batch_size" in capsys.readouterr().out


def test_cyclic_schedule_is_the_reports():
    args, _ = main_mod.parse_args(["--recipe", "resnet34_report"])
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = schedules.make_scheduler(args, opt, total_steps=100 * args.max_epochs)
    lrs = []
    for _ in range(6001):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(); sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[1000] == pytest.approx(5e-3) and lrs[3000] == pytest.approx(1e-3)
    assert lrs[4000] == pytest.approx(3e-3)  # triangular2: the second cycle's amplitude is halved


def test_missing_explicit_data_dir_is_one_line(tmp_path):
    r = run_main(["--data_dir", str(tmp_path / "nope")] + FAST)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "nope" in r.stderr and "not found" in r.stderr


def test_bad_loss_spec_is_one_line(synthetic_root):
    r = run_main(["--data_dir", synthetic_root, "--loss", "mse+0.1*sharp"] + FAST)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "sharp" in r.stderr


def test_torchrun_two_gloo_processes(small_synthetic_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29533",
                        os.path.join(ROOT, "main.py"), "--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path),
                        "--ckpt_name", "ddp", "--max_epochs", "1"] + FAST, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("epoch 1: train loss") == 1  # only rank 0 prints
    rows = read_csv(tmp_path / "ddp" / "metrics.csv")
    assert len(rows) == 1 and float(rows[0]["val_rmse"]) > 0
    ckpt = safe_load(tmp_path / "ddp" / "best.pth")
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    # a time budget under torchrun: both processes stop at the same step (else the collectives would hang)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29534",
                        os.path.join(ROOT, "main.py"), "--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path),
                        "--ckpt_name", "ddp_budget", "--time_budget", "0.01"] + FAST, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_csv(tmp_path / "ddp_budget" / "metrics.csv")
    assert float(rows[-1]["train_minutes"]) >= 0.01 and rows[-1]["val_rmse"]
    assert "time budget of 0.01 minutes" in r.stdout


def test_export_ships_the_weights_and_the_tta_it_names(two_epoch_run, small_synthetic_root, tmp_path):
    import json
    import evaluate
    best, out, out_flip = os.path.join(two_epoch_run, "best.pth"), tmp_path / "ship.pth", tmp_path / "ship_flip.pth"
    assert main_mod.main(["--export", best, str(out), "--export_fp16"]) == 0
    assert main_mod.main(["--export", best, str(out_flip), "--export_tta", "flip"]) == 0
    shipped, full_precision = safe_load(out), safe_load(out_flip)
    assert "optimizer" not in shipped and "train_state_dict" not in shipped and shipped["tta"] is None
    assert all(v.dtype == torch.float16 for v in shipped["state_dict"].values() if v.is_floating_point())
    trained = safe_load(best)["state_dict"]
    # fp32 export: the same weights
    assert all(torch.equal(full_precision["state_dict"][k], trained[k]) for k in trained)
    assert os.path.getsize(out) < 0.6 * os.path.getsize(best)
    before = open(out, "rb").read()
    assert main_mod.main(["--export", best, str(out)]) == 2 and open(out, "rb").read() == before  # never overwritten

    def metrics(ckpt, *extra):
        path = tmp_path / f"m{len(os.listdir(tmp_path))}.json"
        assert evaluate.main(["--data", small_synthetic_root, "--ckpt", str(ckpt), "--amp", "none", "--out",
                              str(path)] + list(extra)) == 0
        return json.load(open(path))
    full, half = metrics(best), metrics(out)
    assert half["tta"] == "none" and half["rmse"] == pytest.approx(full["rmse"], abs=0.01)
    flip_default, flip_asked = metrics(out_flip), metrics(best, "--tta", "flip")  # out_flip: fp32, the same weights
    assert flip_default["tta"] == "flip" and flip_default["rmse"] == flip_asked["rmse"]
    assert metrics(out_flip, "--tta", "none")["rmse"] == full["rmse"]  # the flag still wins


def test_wsd_factor_by_hand():
    """Warm-up from 1/25 to 1, constant, then 1 - sqrt(fraction of the decay done), 0 at the end."""
    f = functools.partial(schedules.wsd_factor, warmup_steps=10, decay_start=50, total_steps=150)
    assert f(0) == pytest.approx(0.04) and f(5) == pytest.approx(0.04 + 0.96 * 0.5) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == 1.0
    assert f(75) == pytest.approx(0.5) and f(150) == 0.0 and f(200) == 0.0
    assert f(100) == pytest.approx(1 - math.sqrt(0.5))
    constant = functools.partial(schedules.wsd_factor, warmup_steps=10, decay_start=150, total_steps=150)
    assert all(constant(s) == 1.0 for s in range(10, 150))


LIGHT = ["--model", "effnet_unet", "--no-pretrained", "--batch_size", "4", "--train_eval_frames", "4",
         "--visualize_every", "0", "--seed", "3", "--device", "cpu", "--amp", "none"]  # the smallest model


def test_wsd_branch_is_the_dedicated_run_bit_for_bit(small_synthetic_root, tmp_path, capsys):
    """A 2-epoch branch (1 epoch of decay) from epoch 1 of a constant run trains exactly the run that the same length
    trains from scratch: every weight and every metric equal, the source run untouched."""
    common = ["--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path), "--scheduler", "wsd", "--keep", "9",
              "--evaluate_every", "1"] + LIGHT
    assert main_mod.main(common + ["--ckpt_name", "const", "--max_epochs", "2", "--decay_epochs", "0"]) == 0
    assert main_mod.main(common + ["--ckpt_name", "dedicated", "--max_epochs", "2", "--decay_epochs", "1"]) == 0
    source = tmp_path / "const" / "epoch001.pth"
    before = source.read_bytes()
    assert main_mod.main(["--branch", str(source), "--max_epochs", "2", "--decay_epochs", "1"]) == 0
    assert "branched from" in capsys.readouterr().out and source.read_bytes() == before
    branch, dedicated = (torch.load(tmp_path / n / "last.pth", weights_only=True) for n in ("const_e2", "dedicated"))
    for key in ("state_dict", "train_state_dict"):
        assert all(torch.equal(branch[key][k], dedicated[key][k]) for k in dedicated[key])
    timing = ("images_per_s", "train_minutes")
    assert [{k: v for k, v in h.items() if k not in timing} for h in branch["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in dedicated["history"]]
    assert [h["lr"] for h in branch["history"]] == [1e-3, 0.0]  # the constant LR, then the decay's end
    const = torch.load(tmp_path / "const" / "epoch002.pth", weights_only=True)
    assert not all(torch.equal(const["state_dict"][k], branch["state_dict"][k]) for k in branch["state_dict"])

    # a branch's optimizer flags are its own (loading the source's optimizer state would bring back the source's)
    assert main_mod.main(["--branch", str(source), "--max_epochs", "3", "--decay_epochs", "1", "--lr", "2e-3",
                          "--encoder_lr", "3e-4", "--weight_decay", "0.05", "--ckpt_name", "tuned"]) == 0
    out = capsys.readouterr().out
    assert "--lr 0.002 (the run's: 0.001)" in out and "--weight_decay 0.05 (the run's: 0.0001)" in out
    tuned = torch.load(tmp_path / "tuned" / "last.pth", weights_only=True)
    groups = tuned["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05] and [g["initial_lr"] for g in groups] == [3e-4, 2e-3]
    assert tuned["scheduler"]["base_lrs"] == [3e-4, 2e-3]
    assert [h["lr"] for h in tuned["history"]] == [1e-3, 2e-3, 0.0]  # the source's epoch, the branch's LR, decayed


def test_input_scale_trains_the_scaled_model_and_its_checkpoint_rebuilds_it(small_synthetic_root, tmp_path, capsys):
    """--input_scale 1.5 --decoder_channels: the run's model works at 1.5x the frame with those decoder widths, its
    checkpoint rebuilds that model (the recorded val RMSE is reproduced by the reloaded one, and not by the same weights
    at scale 1), and --init keeps both."""
    from evaluate import evaluate_batches
    from dataset import DepthDataset
    from utils import summarize
    argv = ["--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path), "--max_epochs", "1", "--input_scale",
            "1.5", "--decoder_channels", "48,32,16,12,8", "--channels_last", "off"] + LIGHT
    assert main_mod.main(argv + ["--ckpt_name", "scaled"]) == 0
    ckpt = torch.load(tmp_path / "scaled" / "last.pth", weights_only=True)
    assert ckpt["model"]["input_scale"] == 1.5 and ckpt["args"]["input_scale"] == 1.5
    assert ckpt["model"]["decoder_channels"] == [48, 32, 16, 12, 8] == ckpt["args"]["decoder_channels"]
    net = model_from_checkpoint(ckpt["model"], ckpt["state_dict"], "last.pth").eval()
    val = DepthDataset(small_synthetic_root, split="val")
    batches = [(torch.stack([val[i][0] for i in range(len(val))]), torch.stack([val[i][1] for i in range(len(val))]))]
    scaled = summarize(evaluate_batches(net, batches, "cpu"))["rmse"]
    assert scaled == pytest.approx(ckpt["history"][-1]["val_rmse"], abs=1e-6)
    net.input_scale = 1.0
    assert abs(summarize(evaluate_batches(net, batches, "cpu"))["rmse"] - scaled) > 1e-4
    capsys.readouterr()
    init = ["--init", str(tmp_path / "scaled" / "last.pth"), "--data_dir", small_synthetic_root] + LIGHT
    args, _ = main_mod.parse_args(init)  # the model flags default to the checkpoint's (it builds its model)
    assert args.input_scale == 1.5 and args.decoder_channels == [48, 32, 16, 12, 8]
    assert main_mod.main(init + ["--decoder_channels", "96,64,32,24,16"]) == 2
    assert "--decoder_channels 96,64,32,24,16 (it holds 48,32,16,12,8)" in capsys.readouterr().err


def test_branch_refusals_are_one_line(small_synthetic_root, tmp_path, capsys):
    common = ["--data_dir", small_synthetic_root, "--ckpt_dir", str(tmp_path), "--scheduler", "wsd", "--keep",
              "9"] + LIGHT
    assert main_mod.main(common + ["--ckpt_name", "decayed", "--max_epochs", "2", "--decay_epochs", "1.5",
                                   "--evaluate_every", "1"]) == 0
    capsys.readouterr()
    epoch1, last = str(tmp_path / "decayed" / "epoch001.pth"), str(tmp_path / "decayed" / "last.pth")
    for argv, words in [(["--branch", last, "--max_epochs", "2"], "2 epoch(s) done; give a longer --max_epochs"),
                        (["--branch", epoch1, "--max_epochs", "4", "--decay_epochs", "1"], "its own run decayed from "
                                                                                          "epoch 0.5"),
                        (["--branch", epoch1, "--max_epochs", "4", "--model", "unet"], "cannot change --model"),
                        (["--branch", epoch1, "--max_epochs", "4", "--input_scale", "1.5", "--decoder_channels",
                          "8,8,8,8,8"], "cannot change --input_scale, --decoder_channels"),
                        (["--branch", epoch1, "--resume", last], "pick one")]:
        assert main_mod.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err


def test_help_formats_and_names_every_flag():
    """argparse %-formats every help string: a stray % breaks --help for everyone."""
    parser = main_mod.get_parser()
    text = parser.format_help()
    assert all(opt in text for action in parser._actions for opt in action.option_strings)
    assert "20% of --max_epochs" in text
