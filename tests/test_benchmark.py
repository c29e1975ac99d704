"""benchmark.py end to end on tiny synthetic data: a smoke test of every figure and the JSON (no timing assertions)."""
import json
import math

import pytest

import benchmark
import model as model_lib
from checkpoint import save_checkpoint


def test_benchmark_writes_every_figure(synthetic_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--data_dir", synthetic_root, "--batch_size", "2", "--warmup", "1", "--steps", "1",
                           "--repeats", "1", "--template_workers", "0", "--device", "cpu", "--profile",
                           "--encoder", "tf_efficientnet_lite1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())

    assert {"machine", "config", "train", "eval", "utilisation", "profile"} <= set(result)
    assert result["machine"]["cpu"] and result["machine"]["torch"] and result["machine"]["device"] == "cpu"
    assert result["config"]["encoder"] == "tf_efficientnet_lite1"  # not effnet_unet's default, Lite0
    assert result["config"]["batch_size"] == 2 and result["config"]["image_hw"] == [144, 256]
    assert result["config"]["template"]["autocast"] is None and result["config"]["template"]["channels_last"] is False
    for kind in ("train", "eval"):
        assert result[kind]["speedup"] > 0 and 0 <= result[kind]["depthwise_conv_flop_share"] < 1
        for path in ("ours", "template"):
            r = result[kind][path]
            assert len(r["repeats"]) == 1 and r["min"] <= r["images_per_s"] <= r["max"]
            for key in ("images_per_s", "flops_per_image", "flops_per_s", "mfu", "peak_memory_mb"):
                assert math.isfinite(r[key]) and r[key] > 0, (kind, path, key, r[key])
    util = result["utilisation"]
    # backward costs about twice the forward
    assert util["train_flops_per_image"] > 2 * util["eval_flops_per_image"] > 0
    assert util["matmul_peak_flops_per_s"]["float32"] > 0
    profile = result["profile"]
    assert profile["top_ops"] and abs(sum(profile["time_share_by_kind"].values()) - 1) < 1e-6

    printed = capsys.readouterr().out
    assert "model effnet_unet tf_efficientnet_lite1 (" in printed
    assert "train ours" in printed and "eval template" in printed and "mfu" in printed
    assert "what bounds the step: memory bandwidth" in printed and "warm-up" in printed
    assert 0 < result["train"]["dense_conv_flop_share"] <= 1 and result["train"]["ours"]["warmup_s"] > 0


def test_deploy_latency_times_every_path(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    net = model_lib.build_model("effnet_unet")
    ckpt = str(tmp_path / "small.pth")
    save_checkpoint(ckpt, {"model": dict(net.config), "state_dict": net.state_dict(), "tta": "flip"})
    out = tmp_path / "deploy.json"
    assert benchmark.main(["--deploy", ckpt, "--deploy_batches", "1,2", "--steps", "1", "--repeats", "1",
                           "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["tta"] == "flip" and result["machine"]["cpu"] and set(result["latency"]) == {"1", "2"}
    for row in result["latency"].values():
        assert set(row) == {"eager", "eager_fast", "torchscript", "onnxruntime"}
        assert all(math.isfinite(r["ms_per_frame"]) and r["ms_per_frame"] > 0 for r in row.values())
    assert "per-frame latency" in capsys.readouterr().out
