"""The focal loss of fine-tuning and its class weights, against hand computations and torchvision."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from losses import FocalLoss, class_weights

LOGITS = [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.5, 3.0, 0.0], [0.0, 0.0, 4.0]]
TARGETS = [0, 2, 1, 0]


def softmax_focal_by_hand(logits, targets, alpha, gamma, weight):
    total = 0.0
    for z, y in zip(logits, targets):
        p = math.exp(z[y]) / sum(math.exp(v) for v in z)
        w = 1.0 if weight is None else weight[y]
        total += -alpha * w * (1 - p) ** gamma * math.log(p)
    return total / len(logits)


def sigmoid_focal_by_hand(logits, targets, alpha, gamma, weight):
    total, n = 0.0, 0
    for z_row, y_row in zip(logits, targets):
        for j, (z, y) in enumerate(zip(z_row, y_row)):
            p = 1 / (1 + math.exp(-z))
            p_t = p if y == 1 else 1 - p
            w = 1.0 if weight is None else weight[j]
            total += -alpha * w * (1 - p_t) ** gamma * math.log(p_t)
            n += 1
    return total / n


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.25])
@pytest.mark.parametrize("weight", [None, [0.2, 0.5, 1.0]])
def test_softmax_focal_matches_the_formula(gamma, alpha, weight):
    w = None if weight is None else torch.tensor(weight)
    got = FocalLoss(alpha, gamma, w)(torch.tensor(LOGITS), torch.tensor(TARGETS)).item()
    assert got == pytest.approx(softmax_focal_by_hand(LOGITS, TARGETS, alpha, gamma, weight), rel=1e-6)


def test_softmax_focal_with_gamma_0_is_cross_entropy():
    z, y = torch.tensor(LOGITS), torch.tensor(TARGETS)
    assert FocalLoss(1.0, 0.0)(z, y).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)


ML_TARGETS = [[1, 0, 1], [0, 0, 1], [0, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", [1.0, 0.25])
@pytest.mark.parametrize("weight", [None, [1.0, 0.2, 0.6]])
def test_sigmoid_focal_matches_the_formula(gamma, alpha, weight):
    w = None if weight is None else torch.tensor(weight)
    got = FocalLoss(alpha, gamma, w, multilabel=True)(torch.tensor(LOGITS), torch.tensor(ML_TARGETS)).item()
    assert got == pytest.approx(sigmoid_focal_by_hand(LOGITS, ML_TARGETS, alpha, gamma, weight), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_sigmoid_focal_matches_torchvision(gamma):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5, generator=g) * 3
    y = (torch.rand(16, 5, generator=g) < 0.4).float()
    ref = torchvision.ops.sigmoid_focal_loss(z, y, alpha=-1, gamma=gamma, reduction="mean")
    assert FocalLoss(1.0, gamma, multilabel=True)(z, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_focal_loss_gradient_is_finite_for_confident_logits():
    z = torch.tensor([[40.0, -40.0], [-40.0, 40.0]], requires_grad=True)
    FocalLoss()(z, torch.tensor([0, 0])).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("mode, expected", [
    ("minmax", [0.2, 0.2 + 0.8 * 40 / 90, 1.0]),  # the most frequent class weighs most (paper's code)
    ("inverse", [160 / 30, 160 / 150, 160 / 300]),  # n / (C c)
    ("none", [1.0, 1.0, 1.0]),
])
def test_class_weights_for_known_counts(mode, expected):
    assert class_weights([10, 50, 100], mode).tolist() == pytest.approx(expected, rel=1e-6)


def test_class_weights_edge_cases():
    assert class_weights([7, 7, 7], "minmax").tolist() == [1.0, 1.0, 1.0]
    assert torch.isfinite(class_weights([0, 5], "inverse")).all()
    with pytest.raises(ValueError):
        class_weights([1, 2], "log")
