import math

import pytest
import torch

from losses import CASSLoss, cass_loss, collapse_guard


@pytest.mark.parametrize("r,t,expected", [
    ([[3.0, 4.0]], [[4.0, 3.0]], 2 - 2 * 24 / 25),   # cos = (12 + 12) / (5 * 5)
    ([[1.0, 0.0]], [[0.0, 2.0]], 2.0),               # orthogonal
    ([[1.0, 0.0]], [[-3.0, 0.0]], 4.0),              # opposite
    ([[2.0, 2.0]], [[5.0, 5.0]], 0.0),               # same direction, different length
    ([[3.0, 4.0], [1.0, 0.0]], [[4.0, 3.0], [0.0, 1.0]], ((2 - 2 * 24 / 25) + 2.0) / 2),  # batch mean
])
def test_cass_loss_matches_hand_computation(r, t, expected):
    assert cass_loss(torch.tensor(r), torch.tensor(t)).item() == pytest.approx(expected, abs=1e-6)


def test_cass_loss_updates_both_arms():
    r = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    cass_loss(r, t).backward()
    assert r.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_guard_fires_on_identical_outputs_only():
    torch.manual_seed(0)
    r = torch.randn(8, 1000)
    r2, t2, fired = collapse_guard(r, r.clone())
    assert fired.item()
    assert not torch.equal(r2, r) and not torch.equal(t2, r)
    # noise of the paper's scale: mean 1e-6 on the CNN side, 1e-10 on the Transformer side
    assert (r2 - r).mean().item() == pytest.approx(1e-6, rel=0.05)
    assert (t2 - r).abs().max().item() < 1e-5

    t = r.clone()
    t[3, 7] += 1e-4  # different in a single element: no noise at all
    r3, t3, fired = collapse_guard(r, t)
    assert not fired.item()
    assert torch.equal(r3, r) and torch.equal(t3, t)


def test_guard_makes_identical_outputs_give_a_loss_and_gradient():
    r = torch.randn(4, 16, requires_grad=True)
    loss, fired = CASSLoss()(r, r)
    assert fired.item()
    loss.backward()
    assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_head_activation_is_applied_before_the_loss(act):
    r, t = torch.randn(5, 7), torch.randn(5, 7)
    f = (lambda z: z.softmax(-1)) if act == "softmax" else torch.sigmoid
    loss, _ = CASSLoss(act)(r, t)
    assert loss.item() == pytest.approx(cass_loss(f(r), f(t)).item(), abs=1e-6)
    assert not math.isclose(loss.item(), cass_loss(r, t).item(), abs_tol=1e-4)
