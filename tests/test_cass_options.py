"""The options of pretrain_cass.py against collapse (--predictor, --projector, --var-reg): their losses
against hand computations, the stop-gradient, and CLI runs whose weights fine-tune."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import run_script
from losses import CASSLoss, cass_loss, covariance_penalty, predictor_loss, variance_hinge
from models import CassArm, MLPHead
from runtime.runs import read_csv_log


def d_np(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(2 - 2 * (a * b).sum(1)))


def test_predictor_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    r, t, pr, pt = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))
    want = 0.5 * (d_np(pr.numpy(), t.numpy()) + d_np(pt.numpy(), r.numpy()))
    assert predictor_loss(pr, pt, r, t).item() == pytest.approx(want, rel=1e-6)
    loss, fired = CASSLoss(guard=False)(r, t, pr, pt)
    assert loss.item() == pytest.approx(want, rel=1e-6) and not fired


def test_the_stop_gradient_stops_the_gradient():
    """Each arm's output gets gradient only through its own predictor's term, none from the term that
    uses it as the (fixed) target."""
    g = torch.Generator().manual_seed(1)
    r = torch.randn(6, 4, generator=g, requires_grad=True)
    t = torch.randn(6, 4, generator=g, requires_grad=True)
    w_r, w_t = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    loss, _ = CASSLoss(guard=False)(r, t, r @ w_r, t @ w_t)
    loss.backward()
    # reference: r only through D(p(r), t fixed) / 2, t only through D(p(t), r fixed) / 2
    r2, t2 = r.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    (0.5 * cass_loss(r2 @ w_r, t.detach())).backward()
    (0.5 * cass_loss(t2 @ w_t, r.detach())).backward()
    assert torch.allclose(r.grad, r2.grad, atol=1e-7) and torch.allclose(t.grad, t2.grad, atol=1e-7)
    # in D(p(R), sg(T)) the target T gets no gradient at all (its predictor output held fixed here)
    r4, t4 = r.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    predictor_loss(r4 @ w_r, (t4 @ w_t).detach(), r4, t4).backward()
    assert t4.grad is None and r4.grad is not None and r4.grad.abs().sum() > 0


def test_variance_hinge_and_covariance_penalty_against_hand_computations():
    z = torch.tensor([[0.0, 1.0, 3.0], [0.2, 2.0, -3.0], [0.4, 6.0, 0.0]], dtype=torch.float64)
    std = np.sqrt(np.var(z.numpy(), axis=0, ddof=1) + 1e-4)
    assert variance_hinge(z).item() == pytest.approx(np.maximum(0, 1 - std).mean(), rel=1e-6)
    c = np.cov(z.numpy(), rowvar=False)
    off = c - np.diag(np.diag(c))
    assert covariance_penalty(z).item() == pytest.approx((off ** 2).sum() / 3, rel=1e-6)
    assert variance_hinge(torch.ones(8, 5)).item() == pytest.approx(1 - 1e-2, rel=1e-6)  # collapsed: the full hinge


def test_var_reg_adds_the_weighted_terms_and_off_is_equation_1():
    g = torch.Generator().manual_seed(2)
    r, t = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    base, _ = CASSLoss(guard=False)(r, t)
    assert base.item() == cass_loss(r, t).item()
    reg, _ = CASSLoss(guard=False, var_reg=2.0, cov_weight=0.5)(r, t)
    want = base + 2.0 * sum(variance_hinge(z) + 0.5 * covariance_penalty(z) for z in (r, t))
    assert reg.item() == pytest.approx(want.item(), rel=1e-6)


def test_cass_arm_shapes_and_heads_apart():
    bb = timm.create_model("resnet18", pretrained=False, num_classes=0)
    arm = CassArm(bb, MLPHead(512, 32, 16), MLPHead(16, 8, 16))
    z, p = arm(torch.randn(4, 3, 32, 32))
    assert z.shape == (4, 16) and p.shape == (4, 16)
    heads = arm.heads_state_dict()
    assert heads and all(k.startswith(("projector.", "predictor.")) for k in heads)
    z, p = CassArm(timm.create_model("resnet18", pretrained=False, num_classes=10))(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 10) and p is None


SMALL = ["--data", "synthetic", "--cnn", "test_resnet", "--vit", "test_vit", "--img-size", "32",
         "--init", "random", "--workers", "0", "--bs", "16", "--epochs", "2", "--limit-train", "48",
         "--monitor-bank", "32", "--monitor-val", "16"]
OPTIONS = {"predictor": ["--predictor", "--pred-hidden", "32"],
           "projector": ["--projector", "32", "--proj-hidden", "64"],
           "var_reg": ["--var-reg", "1"],
           "proj_pred": ["--projector", "32", "--proj-hidden", "64", "--predictor", "--pred-hidden", "16"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_runs_and_its_weights_fine_tune(tmp_path, name):
    run_script("pretrain_cass.py", *SMALL, *OPTIONS[name], "--out", "run", cwd=tmp_path)
    out = tmp_path / "run"
    rows = read_csv_log(out / "log.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    heads = out / "heads.safetensors"
    if name == "var_reg":
        assert not heads.exists()  # no heads to save
    else:
        keys = load_file(heads).keys()
        assert {k.split(".")[0] for k in keys} == {"cnn", "vit"}
        assert any(".predictor." in k for k in keys) == ("--predictor" in OPTIONS[name])
        assert any(".projector." in k for k in keys) == ("--projector" in OPTIONS[name])
    cnn = load_file(out / "cnn.safetensors")  # the backbone alone: no head keys leak in
    assert not any(k.startswith(("projector.", "predictor.", "backbone.")) for k in cnn)
    assert any(k.startswith("fc.") for k in cnn) == ("--projector" not in OPTIONS[name])
    run_script("finetune.py", "--data", "synthetic", "--arch", "test_vit", "--img-size", "32",
               "--weights", out / "vit.safetensors", "--eval", "knn", "--workers", "0", "--out", "knn", cwd=tmp_path)
    assert (tmp_path / "knn" / "metrics.json").is_file()


@pytest.mark.slow
def test_an_option_run_resumes_bit_identically(tmp_path):
    args = [*SMALL, *OPTIONS["proj_pred"], "--no-monitor"]
    run_script("pretrain_cass.py", *args, "--out", "straight", cwd=tmp_path)
    run_script("pretrain_cass.py", *args, "--out", "resumed", cwd=tmp_path, stop_after_epoch=1)
    run_script("pretrain_cass.py", *args, "--out", "resumed", cwd=tmp_path)
    for f in ("cnn.safetensors", "vit.safetensors", "heads.safetensors"):
        a, b = load_file(tmp_path / "straight" / f), load_file(tmp_path / "resumed" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.slow
def test_bad_option_values_are_one_line_errors(tmp_path):
    proc = run_script("pretrain_cass.py", *SMALL, "--projector", "-3", "--out", "bad", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--projector must be" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("pretrain_cass.py", *SMALL, "--var-reg", "-1", "--out", "bad2", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--var-reg" in proc.stderr and not (tmp_path / "bad2").exists()
