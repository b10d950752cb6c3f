"""DINO baseline: the loss against the paper's pseudocode, schedules, the training step (EMA, no
teacher gradients, frozen last layer, clipping), the multi-crop transform, and short command-line
runs whose weights load into timm and finetune.py, and resume."""

import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from conftest import ROOT, run_script
from losses import DINOLoss, teacher_temp_schedule
from pipeline.dino_crops import DinoMultiCrop
from pretrain_dino import (DINOHead, MultiCropNet, WeightNormLinear, clip_gradients, cosine_scheduler, ema_update,
                           make_optimizer, param_groups, train_step)
from runtime.runs import read_csv_log
from runtime.weight_files import load_weights

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the loss

def reference_dino_loss(student, teacher, center, ncrops, tps, tpt, m):
    """DINO paper, Algorithm 1, generalised to multi-crop as in the paper's Section 3.1:
    H(t, s) = -(softmax((t - C) / tpt) * log softmax(s / tps)).sum(1).mean(), summed over
    (teacher global view i, student view v != i) and divided by the number of pairs;
    C <- m C + (1 - m) mean(teacher outputs)."""
    s_views = student.chunk(ncrops)
    t_views = teacher.chunk(2)

    def H(t, s):
        t = t.detach()
        s = F.softmax(s / tps, dim=1)
        t = F.softmax((t - center) / tpt, dim=1)
        return -(t * torch.log(s)).sum(dim=1).mean()

    total, n = 0.0, 0
    for i in range(2):
        for v in range(ncrops):
            if v == i:
                continue
            total = total + H(t_views[i], s_views[v])
            n += 1
    new_center = m * center + (1 - m) * torch.cat(t_views).mean(dim=0, keepdim=True)
    return total / n, new_center, n


@pytest.mark.parametrize("ncrops", [2, 4])
def test_dino_loss_matches_the_papers_pseudocode(ncrops):
    torch.manual_seed(0)
    B, K = 5, 11
    student = torch.randn(ncrops * B, K).requires_grad_()
    teacher = torch.randn(2 * B, K).requires_grad_()
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.04, 0, 10, student_temp=0.1, center_momentum=0.9)
    center0 = torch.randn(1, K) * 0.3
    loss_fn.center.copy_(center0)

    want, want_center, n_pairs = reference_dino_loss(student, teacher, center0, ncrops, 0.1, 0.04, 0.9)
    assert n_pairs == 2 * ncrops - 2  # the 2 same-view pairs are skipped
    got, stats = loss_fn(student, teacher, epoch=0, return_stats=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fn.center, want_center)

    # gradients reach the student only, and match the reference's
    g_got, = torch.autograd.grad(got, student, retain_graph=True)
    g_want, = torch.autograd.grad(want, student)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    assert got.grad_fn is not None and teacher.grad is None
    with pytest.raises(RuntimeError):
        torch.autograd.grad(got, teacher)

    # the statistics: mean teacher entropy, KL to the mean distribution, loss - entropy
    q = F.softmax((teacher.detach() - center0) / 0.04, dim=1)
    ent = -(q * q.clamp_min(1e-45).log()).sum(1).mean()
    qbar = q.mean(0)
    kl_mean = (q * (q.clamp_min(1e-45).log() - qbar.log())).sum(1).mean()
    torch.testing.assert_close(stats["teacher_entropy"], ent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["teacher_kl_to_mean"], kl_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["student_kl"], want.detach() - ent, rtol=1e-4, atol=1e-5)


def test_same_view_pairs_are_skipped():
    """With the 2 global crops only, the loss is the mean of the 2 cross pairs (teacher 0, student 1)
    and (teacher 1, student 0); the same-view pairs do not enter."""
    torch.manual_seed(1)
    B, K = 3, 7
    t = torch.randn(2 * B, K)
    s = torch.randn(2 * B, K)
    loss_fn = DINOLoss(K, 2)
    base = loss_fn(s, t, 0)
    q = F.softmax(t / 0.04, 1).chunk(2)
    lp = F.log_softmax(s / 0.1, 1).chunk(2)
    want = (-(q[0] * lp[1]).sum(1).mean() - (q[1] * lp[0]).sum(1).mean()) / 2
    torch.testing.assert_close(base, want)


def test_centre_moves_over_several_calls_and_is_saved():
    torch.manual_seed(2)
    K = 6
    loss_fn = DINOLoss(K, 3, center_momentum=0.9)
    c = torch.zeros(1, K)
    for _ in range(3):
        t = torch.randn(8, K)
        loss_fn(torch.randn(12, K), t, 0)
        c = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, c)
    assert torch.equal(loss_fn.state_dict()["center"], loss_fn.center)


def test_teacher_temperature_warm_up():
    loss_fn = DINOLoss(4, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30, nepochs=100)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(10) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert loss_fn.teacher_temp(29) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(30) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(99) == pytest.approx(0.07)
    # the default: no warm-up, 0.04 throughout
    assert set(teacher_temp_schedule(0.04, 0.04, 0, 5)) == {0.04}
    # a warm-up longer than the run is cut off, not an error
    short = teacher_temp_schedule(0.04, 0.07, 30, 10)
    assert len(short) == 10 and short[9] == pytest.approx(0.04 + 0.03 * 9 / 29)
    # and the loss really uses the epoch's temperature
    torch.manual_seed(3)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    for epoch in (0, 10, 50):
        fn = DINOLoss(5, 2, 0.04, 0.07, 30, 100)
        want, _, _ = reference_dino_loss(s, t, torch.zeros(1, 5), 2, 0.1, fn.teacher_temp(epoch), 0.9)
        torch.testing.assert_close(fn(s, t, epoch), want)


# ---------------------------------------------------------------- schedules

def test_cosine_scheduler_is_officials():
    sched = cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1)
    assert len(sched) == 20
    np.testing.assert_allclose(sched[:5], np.linspace(0, 1.0, 5))
    iters = np.arange(15)
    np.testing.assert_allclose(sched[5:], 0.1 + 0.45 * (1 + np.cos(np.pi * iters / 15)))
    mom = cosine_scheduler(0.996, 1.0, 2, 3)
    assert mom[0] == pytest.approx(0.996) and np.all(np.diff(mom) > 0) and mom[-1] < 1
    # warm-up epochs beyond the run: clipped, the run is all warm-up
    clipped = cosine_scheduler(1.0, 0.1, epochs=2, niter_per_ep=3, warmup_epochs=10)
    np.testing.assert_allclose(clipped, np.linspace(0, 1.0, 6))


# ---------------------------------------------------------------- model and training step

class TinyBackbone(nn.Module):
    """A small CNN with BatchNorm, pooled features (what create_backbone(num_classes=0) gives)."""
    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)


def tiny_pair(out_dim=32, norm_last_layer=True):
    torch.manual_seed(0)
    student = MultiCropNet(TinyBackbone(), DINOHead(8, out_dim, hidden_dim=16, bottleneck_dim=4,
                                                    norm_last_layer=norm_last_layer))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def crops(ncrops=4, B=4):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(B, 3, 16 if i < 2 else 8, 16 if i < 2 else 8, generator=g) for i in range(ncrops)]


def test_head_shapes_and_weight_norm():
    head = DINOHead(512)  # official defaults
    assert [m.weight.shape for m in head.mlp if isinstance(m, nn.Linear)] == [(2048, 512), (2048, 2048), (256, 2048)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.last_layer.weight_v.shape == (65536, 256) and not head.last_layer.weight_g.requires_grad
    out = head(torch.randn(3, 512))
    assert out.shape == (3, 65536)
    # same function as torch's weight norm of Linear(bias=False)
    wn = WeightNormLinear(5, 7)
    with torch.no_grad():
        wn.weight_g.uniform_(0.5, 2)
    ref = nn.Linear(5, 7, bias=False)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(wn.weight_g)
        ref.parametrizations.weight.original1.copy_(wn.weight_v)
    x = torch.randn(4, 5)
    torch.testing.assert_close(wn(x), ref(x))
    assert torch.allclose(DINOHead(4, 9, 8, 3).last_layer.weight().norm(dim=1), torch.ones(9))


def test_param_groups_decay_no_bias_nor_norm():
    student, _ = tiny_pair()
    decay, no_decay = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "backbone.conv.bias", "backbone.bn.weight", "backbone.bn.bias", "head.mlp.0.bias", "head.mlp.2.bias",
        "head.mlp.4.bias"}
    assert "head.last_layer.weight_g" not in {names[id(p)] for p in decay["params"]}  # frozen norm: not trained
    assert no_decay["weight_decay"] == 0.0


def test_ema_update_by_hand():
    student, teacher = tiny_pair()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * dict(student.named_parameters())[n])


def test_clip_gradients_per_parameter():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    model = nn.Module()
    model.a, model.b = a, b
    clip_gradients(model, 1.0)
    torch.testing.assert_close(a.grad.norm(), torch.tensor(1.0), atol=1e-5, rtol=0)  # 5 -> 1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # 0.5 < 1: untouched


def test_train_step_teacher_has_no_grads_and_follows_the_ema_last_layer_frozen():
    student, teacher = tiny_pair()
    loss_fn = DINOLoss(32, 4, nepochs=2)
    opt = make_optimizer("adamw", param_groups(student), CPU)
    kw = dict(lr=1e-2, wd=0.04, momentum=0.99, clip_grad=3.0, freeze_last_layer=1, device=CPU)

    s0 = {n: p.clone() for n, p in student.named_parameters()}
    t0 = {n: p.clone() for n, p in teacher.named_parameters()}
    loss, stats = train_step(crops(), student, teacher, loss_fn, opt, epoch=0, **kw)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and set(stats) == {
        "teacher_entropy", "teacher_kl_to_mean", "student_kl"}
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.04
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert all(p.grad is None for p in teacher.parameters())
    s1 = dict(student.named_parameters())
    # the last layer is frozen during epoch 0 (no step, no weight decay); the rest moved
    assert torch.equal(s1["head.last_layer.weight_v"], s0["head.last_layer.weight_v"])
    assert torch.equal(s1["head.last_layer.weight_g"], s0["head.last_layer.weight_g"])
    assert not torch.equal(s1["head.mlp.0.weight"], s0["head.mlp.0.weight"])
    assert not torch.equal(s1["backbone.conv.weight"], s0["backbone.conv.weight"])
    # teacher = 0.99 teacher + 0.01 student (after the student's step)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.99 * t0[n] + 0.01 * s1[n])
    assert loss_fn.center.abs().sum() > 0  # the centre moved

    # epoch 1: the last layer trains (its norm stays frozen at 1)
    train_step(crops(), student, teacher, loss_fn, opt, epoch=1, **kw)
    s2 = dict(student.named_parameters())
    assert not torch.equal(s2["head.last_layer.weight_v"], s0["head.last_layer.weight_v"])
    assert torch.equal(s2["head.last_layer.weight_g"], torch.ones_like(s2["head.last_layer.weight_g"]))
    assert all(p.grad is None for p in teacher.parameters())


def test_multicrop_wrapper_groups_crops_by_size():
    student, _ = tiny_pair()
    student.eval()
    cs = crops(ncrops=5, B=3)
    out = student(cs)
    assert out.shape == (15, 32)
    # global crops batched together, locals together: same as the backbone on the concatenations
    feats = torch.cat([student.backbone(torch.cat(cs[:2])), student.backbone(torch.cat(cs[2:]))])
    torch.testing.assert_close(out, student.head(feats))


# ---------------------------------------------------------------- multi-crop transform

@pytest.mark.parametrize("n_local", [0, 3])
def test_multicrop_views_and_sizes(n_local):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    views = DinoMultiCrop(32, 16, n_local)(img)
    assert len(views) == 2 + n_local
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * n_local
    assert all(v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])


# ---------------------------------------------------------------- command line

SMALL = ["--data", "synthetic", "--init", "random", "--img-size", "32", "--local-size", "16",
         "--local-crops", "2", "--bs", "8", "--limit-train", "16", "--workers", "0",
         "--out-dim", "1024", "--hidden-dim", "256", "--bottleneck-dim", "64",  # a small head: fast on CPU
         "--monitor-bank", "32", "--monitor-val", "16"]  # and a small monitor


def dino(tmp_path, out, *extra, check=True, stop_after_epoch=None):
    return run_script("pretrain_dino.py", *SMALL, "--out", out, *extra, cwd=tmp_path, check=check,
                      stop_after_epoch=stop_after_epoch)


@pytest.fixture(scope="module")
def resnet_runs(tmp_path_factory):
    """test_resnet, 2 epochs of 2 steps: once straight, once stopped after epoch 1 and rerun."""
    tmp = tmp_path_factory.mktemp("dino")
    args = ["--arch", "test_resnet", "--epochs", "2"]
    straight = dino(tmp, "straight", *args)
    dino(tmp, "resumed", *args, stop_after_epoch=1)
    stopped_early = not (tmp / "resumed" / "backbone.safetensors").exists()
    resumed = dino(tmp, "resumed", *args)
    return tmp, straight, resumed, stopped_early


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dino_vit")
    return tmp, dino(tmp, "straight", "--arch", "test_vit", "--epochs", "1")


@pytest.mark.slow
@pytest.mark.parametrize("arch,kw", [("test_resnet", {}), ("test_vit", {"img_size": 32})])
def test_cli_run_and_weights_load_for_finetuning(request, arch, kw):
    tmp, proc = request.getfixturevalue("resnet_runs")[:2] if arch == "test_resnet" else request.getfixturevalue("vit_run")
    out = tmp / "straight"
    epochs = 2 if arch == "test_resnet" else 1
    assert f"done: {epochs} epochs" in proc.stdout
    for name in ("config.json", "log.csv", "backbone.safetensors", "student_backbone.safetensors", "checkpoint.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == arch and config["momentum_teacher"] == 0.996 and config["lr"] == 5e-4
    rows = read_csv_log(out / "log.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    for key in ("epoch", "loss", "lr", "wd", "teacher_temp", "momentum", "seconds", "total_seconds", "img_per_s",
                "teacher_entropy", "teacher_kl_to_mean", "student_kl", "max_entropy"):
        assert key in rows[0], key
    # 2 steps per epoch; the 10 warm-up epochs are cut to the run, which is all warm-up ending at the peak
    peak = 5e-4 * 8 / 256
    want = np.linspace(0, peak, 2 * epochs)[1::2]
    np.testing.assert_allclose([float(r["lr"]) for r in rows], want, rtol=1e-4)
    assert float(rows[-1]["total_seconds"]) == pytest.approx(sum(float(r["seconds"]) for r in rows), rel=1e-3)
    assert all(0 < float(r["teacher_entropy"]) <= float(r["max_entropy"]) + 1e-3 for r in rows)

    # the TEACHER backbone is saved, and loads into a fresh timm model with a new head
    teacher = torch.load(out / "checkpoint.pt", weights_only=True)["teacher"]
    saved = load_file(out / "backbone.safetensors")
    assert all(torch.equal(teacher["backbone." + k], v) for k, v in saved.items())
    model = timm.create_model(arch, pretrained=False, num_classes=6, **kw)
    fresh = load_weights(model, out / "backbone.safetensors")
    assert fresh and all(k.startswith(("fc.", "head.")) for k in fresh)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved.items())

    if arch.startswith("vit") and (ROOT / "finetune.py").exists():  # the ViT only: a minute on a busy CPU
        run_script("finetune.py", "--data", "synthetic", "--arch", arch, "--img-size", "32", "--bs", "32",
                   "--epochs", "1", "--label-frac", "0.1", "--workers", "0",
                   "--weights", out / "backbone.safetensors", "--out", "ft", cwd=tmp)
        assert (tmp / "ft" / "metrics.json").is_file()


@pytest.mark.slow  # (the script runs of its fixture)
def test_resume_gives_the_same_teacher_bit_for_bit(resnet_runs):
    tmp, _, resumed, stopped_early = resnet_runs
    assert stopped_early and "resuming" in resumed.stdout
    a, b = (load_file(tmp / d / "backbone.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(tmp / d / "checkpoint.pt", weights_only=True) for d in ("straight", "resumed"))
    assert all(torch.equal(ca["teacher"][k], cb["teacher"][k]) for k in ca["teacher"])
    assert all(torch.equal(ca["student"][k], cb["student"][k]) for k in ca["student"])
    assert torch.equal(ca["dino_loss"]["center"], cb["dino_loss"]["center"])
    la, lb = (read_csv_log(tmp / d / "log.csv") for d in ("straight", "resumed"))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 2


@pytest.mark.slow
def test_bad_flags_are_one_line_errors(tmp_path):
    proc = dino(tmp_path, "bad", "--arch", "no_such_model_xyz", "--epochs", "1", check=False)
    assert proc.returncode == 2 and "unknown timm model" in proc.stderr and "Traceback" not in proc.stderr
    proc = dino(tmp_path, "bad2", "--arch", "test_resnet", "--bs", "32", check=False)
    assert proc.returncode == 2 and "--bs 32 is larger" in proc.stderr
