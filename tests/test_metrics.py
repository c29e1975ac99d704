"""SSIM and the depth metrics against independent references (plain numpy loops, hand-computed values)."""
import math

import numpy as np
import pytest
import torch

from utils import add_sums, depth_colors, metric_sums, ssim, ssim_map, summarize

C1, C2 = 0.01 ** 2, 0.03 ** 2


def gaussian_1d(size=11, sigma=1.5):
    g = np.array([math.exp(-((i - size // 2) ** 2) / (2 * sigma ** 2)) for i in range(size)])
    return g / g.sum()


def ssim_reference(a, b):
    """Course SSIM with explicit loops: 11x11 Gaussian, zero padding, mean of the map (one HxW pair)."""
    g = gaussian_1d()
    w = np.outer(g, g)
    h, wd = a.shape
    total = 0.0
    for y in range(h):
        for x in range(wd):
            mu_a = mu_b = aa = bb = ab = 0.0
            for dy in range(-5, 6):
                for dx in range(-5, 6):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < wd:  # zero padding: outside pixels add nothing
                        k = w[dy + 5, dx + 5]
                        va, vb = a[yy, xx], b[yy, xx]
                        mu_a += k * va; mu_b += k * vb
                        aa += k * va * va; bb += k * vb * vb; ab += k * va * vb
            var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
            total += ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a ** 2 + mu_b ** 2 + C1) * (var_a + var_b + C2))
    return total / (h * wd)


def test_ssim_matches_loop_reference_on_random_maps():
    rng = np.random.default_rng(1)
    for h, w in [(14, 17), (9, 23)]:
        a = rng.uniform(0, 20, (h, w))
        b = np.clip(a + rng.normal(0, 2, (h, w)), 0, 20)
        got = ssim(torch.tensor(a)[None, None], torch.tensor(b)[None, None]).item()
        assert got == pytest.approx(ssim_reference(a, b), abs=1e-10)


def test_ssim_identical_maps_is_one():
    x = torch.rand(2, 1, 30, 40, dtype=torch.float64) * 20
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_maps_closed_form():
    # Constant maps a and b: with zero padding, a pixel whose window keeps weight s = sx*sy inside the
    # image sees mu = a*s, var = a^2 s(1-s), cov = ab s(1-s); in the interior s = 1.
    a, b, h, w = 3.0, 5.0, 16, 20
    g = gaussian_1d()
    inside = lambda n: np.array([sum(g[k + 5] for k in range(-5, 6) if 0 <= i + k < n) for i in range(n)])
    s = np.outer(inside(h), inside(w))
    ref = ((2 * a * b * s ** 2 + C1) * (2 * a * b * s * (1 - s) + C2)) / \
          (((a * a + b * b) * s ** 2 + C1) * ((a * a + b * b) * s * (1 - s) + C2))
    got = ssim_map(torch.full((1, 1, h, w), a, dtype=torch.float64), torch.full((1, 1, h, w), b, dtype=torch.float64))
    np.testing.assert_allclose(got[0, 0].numpy(), ref, atol=1e-12)
    # an interior pixel (window fully inside): the textbook (2ab + C1) / (a^2 + b^2 + C1); variances of
    # ~1e-16 from rounding are divided by C2 = 9e-4, hence the 1e-9 tolerance
    assert got[0, 0, 8, 10].item() == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-9)


def test_metrics_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    gt = torch.full((1, 1, 2, 2), 2.0)
    m = summarize(add_sums({}, metric_sums(pred, gt)))
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1 + 4) / 4))
    assert m["mae"] == pytest.approx(1.0)
    assert m["abs_rel"] == pytest.approx((0.5 + 0 + 0.5 + 1.0) / 4)
    assert m["sq_rel"] == pytest.approx((0.5 + 0 + 0.5 + 2.0) / 4)
    logs = [math.log(1 / 2), 0.0, math.log(3 / 2), math.log(2)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in logs) / 4))
    assert m["log10"] == pytest.approx(sum(abs(x) for x in logs) / math.log(10) / 4)
    # ratios max(p/g, g/p): 2, 1, 1.5, 2
    assert m["delta1"] == pytest.approx(0.25)
    assert m["delta2"] == pytest.approx(0.5)
    assert m["delta3"] == pytest.approx(0.5)
    assert m["ssim"] == pytest.approx(ssim(pred.double(), gt.double()).item())


def test_metrics_do_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(10, 1, 20, 24, generator=g) * 20
    pred = (gt + torch.randn(10, 1, 20, 24, generator=g) * 3).clamp(0, 20)
    results = []
    for bs in (1, 3, 4, 10):
        total = {}
        for i in range(0, 10, bs):
            add_sums(total, metric_sums(pred[i:i + bs], gt[i:i + bs]))
        results.append(summarize(total))
    for r in results[1:]:
        for k in r:
            assert r[k] == pytest.approx(results[0][k], abs=1e-12)
    # RMSE is over all pixels, not a mean of per-image RMSEs
    all_px = math.sqrt(((pred.double() - gt.double()) ** 2).mean().item())
    assert results[0]["rmse"] == pytest.approx(all_px, abs=1e-12)
    assert results[0]["ssim"] == pytest.approx(ssim(pred.double(), gt.double()).item(), abs=1e-12)


def test_silog_hand_computed_per_image_then_mean():
    # image 1: d = ln(p/g) = [ln 2, ln 2, 0, 0] -> sqrt(mean d^2 - mean(d)^2) = ln2 * sqrt(1/2 - 1/4) = ln2 / 2
    # image 2: p = 3 g everywhere, a pure scale: d constant -> 0 (scale invariant)
    gt = torch.tensor([[1.0, 2.0], [4.0, 5.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    pred = torch.stack([gt[0] * torch.tensor([[2.0, 2.0], [1.0, 1.0]]), gt[1] * 3.0])
    m = summarize(add_sums({}, metric_sums(pred, gt)))
    assert m["silog"] == pytest.approx(100 * (math.log(2) / 2 + 0.0) / 2, abs=1e-9)
    one = summarize(add_sums({}, metric_sums(pred[:1], gt[:1])))
    assert one["silog"] == pytest.approx(100 * math.log(2) / 2, abs=1e-9)


def test_depth_colours_near_dark_far_light():
    """The reports' convention: near dark, far light; luminance rises with depth over the whole 0-20 m scale."""
    rgb = depth_colors(np.linspace(0.0, 20.0, 41)[None, :]).astype(np.float64)[0]
    luminance = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > 0)
    assert luminance[0] < 10 and luminance[-1] > 200


def test_ssim_band_matmul_equals_the_separable_convolutions(monkeypatch):
    """The two ways ssim_map blurs (banded matmuls up to BAND_MAX_SIDE a side, grouped convolutions beyond) agree."""
    import utils
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(3, 1, 37, 53, generator=g, dtype=torch.float64) * 20
    pred = gt + torch.randn(3, 1, 37, 53, generator=g, dtype=torch.float64)
    band = ssim_map(pred, gt)
    monkeypatch.setattr(utils, "BAND_MAX_SIDE", 0)
    np.testing.assert_allclose(ssim_map(pred, gt).numpy(), band.numpy(), atol=1e-12)
