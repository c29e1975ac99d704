"""Loss specs parse, each term matches a hand computation, gradients are finite, the clip is honoured."""
import math

import pytest
import torch

from losses import TERMS, build_loss, parse_loss_spec
from utils import ssim


def test_specs_parse():
    assert parse_loss_spec("mse+0.15*ssim+0.05*edge") == [(1.0, "mse"), (0.15, "ssim"), (0.05, "edge")]
    assert parse_loss_spec("rmse + ssim") == [(1.0, "rmse"), (1.0, "ssim")]
    assert parse_loss_spec("1e-1*l1+.5*berhu+silog") == [(0.1, "l1"), (0.5, "berhu"), (1.0, "silog")]


@pytest.mark.parametrize("spec", ["", "mse+", "mse++ssim", "0.1*", "mse*0.1", "foo", "mse+ssim+mse", "2**mse",
                                  "mse-ssim"])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(ValueError, match="loss"):
        build_loss(spec)


def test_terms_hand_computed():
    pred = torch.tensor([[1.0, 3.0], [2.0, 6.0]]).view(1, 1, 2, 2)
    gt = torch.tensor([[2.0, 2.0], [2.0, 2.0]]).view(1, 1, 2, 2)
    # errors -1, 1, 0, 4
    assert TERMS["mse"](pred, gt).item() == pytest.approx((1 + 1 + 0 + 16) / 4)
    assert TERMS["rmse"](pred, gt).item() == pytest.approx(math.sqrt(18 / 4), rel=1e-6)
    assert TERMS["l1"](pred, gt).item() == pytest.approx(6 / 4)
    c = 0.2 * 4  # berHu threshold; |e| = 1 > c and 4 > c
    assert TERMS["berhu"](pred, gt).item() == pytest.approx(((1 + c * c) / (2 * c) * 2 + 0
                                                             + (16 + c * c) / (2 * c)) / 4)
    d = [math.log(0.5), math.log(1.5), 0.0, math.log(3.0)]
    ref = math.sqrt(sum(x * x for x in d) / 4 - 0.85 * (sum(d) / 4) ** 2)
    assert TERMS["silog"](pred, gt).item() == pytest.approx(ref, rel=1e-5)
    # x gradients: pred rows (2, 4) vs 0; y gradients: pred cols (1, 3) vs 0
    assert TERMS["edge"](pred, gt).item() == pytest.approx((2 + 4) / 2 + (1 + 3) / 2)
    assert TERMS["ssim"](pred, gt).item() == pytest.approx(1 - ssim(pred, gt).item())


def test_weighted_sum_and_parts():
    loss_fn = build_loss("mse+0.15*ssim+0.05*edge")
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 1, 16, 16, generator=g) * 15
    pred = gt + torch.randn(2, 1, 16, 16, generator=g)
    total, parts = loss_fn(pred, gt)
    assert total.item() == pytest.approx(parts["mse"].item() + 0.15 * parts["ssim"].item()
                                         + 0.05 * parts["edge"].item(), rel=1e-6)
    assert loss_fn.spec == "mse+0.15*ssim+0.05*edge"


@pytest.mark.parametrize("term", sorted(TERMS))
def test_gradients_finite_including_nonpositive_predictions(term):
    loss_fn = build_loss(term)
    gt = torch.rand(2, 1, 12, 12) * 20 + 0.1
    pred = (torch.randn(2, 1, 12, 12) * 10).requires_grad_()  # some values <= 0 and > 20
    total, _ = loss_fn(pred, gt)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(pred.grad).all()


def test_prediction_past_the_clip_is_right_where_truth_is_at_the_clip():
    loss_fn = build_loss("mse+l1")
    gt = torch.tensor([20.0, 20.0, 10.0]).view(1, 1, 1, 3)
    pred = torch.tensor([25.0, 20.0, 25.0]).view(1, 1, 1, 3).requires_grad_()
    total, parts = loss_fn(pred, gt)
    total.backward()
    assert parts["mse"].item() == pytest.approx(15 ** 2 / 3)  # only the pixel whose truth is 10 m counts
    assert pred.grad[0, 0, 0, 0].item() == 0.0 and pred.grad[0, 0, 0, 2].item() > 0


def test_msgrad_is_the_edge_term_over_four_scales_by_hand():
    """A residual that is a ramp of slope a along x: at every 2^k-th pixel its x-gradient is a * 2^k and its
    y-gradient 0, so the four scales average to a * (1 + 2 + 4 + 8) / 4."""
    gt = torch.rand(2, 1, 32, 48) * 20
    a = 0.01
    ramp = a * torch.arange(48.0).view(1, 1, 1, 48).expand(2, 1, 32, 48)
    total, parts = build_loss("msgrad", clip_aware_terms=False)(gt + ramp, gt)
    assert parts["msgrad"].item() == pytest.approx(a * 15 / 4, rel=1e-4)
    assert TERMS["msgrad"](gt + ramp, gt, scales=1).item() == pytest.approx(TERMS["edge"](gt + ramp, gt).item())
