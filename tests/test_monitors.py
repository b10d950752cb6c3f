"""evaluation/monitors.py and evaluation/feature_monitors.py: spread, effective rank, online k-NN, the collapse warning, and
their place in the pretraining runs' log.csv (CASS and DINO)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.neighbors import KNeighborsClassifier

from conftest import run_script
from evaluation import feature_monitors as F
from evaluation import monitors as M
from runtime.runs import read_csv_log


def test_effective_rank_of_a_rank_k_matrix_is_k():
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 10):
        u, _ = torch.linalg.qr(torch.randn(200, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(64, k, generator=g, dtype=torch.float64))
        a = u @ (5.0 * v.T)  # k equal singular values, the rest 0
        assert F.effective_rank(a) == pytest.approx(k, rel=1e-3)  # (RankMe's eps = 1e-7 adds ~1e-4)


def test_effective_rank_against_a_hand_computation():
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    p = np.array([3, 2, 1]) / 6 + 1e-7
    assert F.effective_rank(a) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_spread_of_a_collapsed_output_is_zero_and_of_orthogonal_rows_is_known():
    z = torch.tensor([[0.3, -1.2, 2.0, 0.1]]).repeat(50, 1)
    assert M.spread(z) == pytest.approx(0.0, abs=1e-12)
    assert M.spread(3 * z + 0) == pytest.approx(0.0, abs=1e-12)  # the scale does not matter
    d = 16
    eye = torch.eye(d) * 7  # normalised: one-hot rows; each dimension is 1 in 1/d of them
    assert M.spread(eye) == pytest.approx(math.sqrt(1 / d - 1 / d ** 2), rel=1e-9)
    assert M.even_spread(d) == pytest.approx(0.25)


def test_spread_from_running_moments_equals_the_direct_spread():
    z = torch.randn(37, 10, generator=torch.Generator().manual_seed(1))
    moments = {}
    for part in (z[:20], z[20:]):
        M.output_moments(moments, "cnn", part)
    row = M.output_spreads(moments, len(z))
    assert row["cnn_std"] == pytest.approx(M.spread(z), rel=1e-5)
    assert row["cnn_std_frac"] == pytest.approx(M.spread(z) * math.sqrt(10), rel=1e-5)


def test_knn_accuracy_is_one_on_separable_features_and_matches_sklearn():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    ytr, yte = rng.integers(0, 4, 200), rng.integers(0, 4, 80)
    tr = centres[ytr] + rng.normal(size=(200, 4))
    te = centres[yte] + rng.normal(size=(80, 4))
    assert F.knn_accuracy(tr, ytr, te, yte, k=20) == 1.0
    # overlapping classes, odd k with 2 classes (no ties): the same votes as scikit-learn's classifier
    ytr2, yte2 = ytr % 2, yte % 2
    tr2, te2 = rng.normal(size=(200, 5)) + ytr2[:, None] * 0.5, rng.normal(size=(80, 5)) + yte2[:, None] * 0.5
    ref = KNeighborsClassifier(n_neighbors=21, metric="cosine", algorithm="brute").fit(tr2, ytr2).score(te2, yte2)
    assert F.knn_accuracy(tr2, ytr2, te2, yte2, k=21) == pytest.approx(ref)
    # multi-label: per (image, label) pair
    yml_tr = (centres[ytr][:, :3] > 0).astype(float)
    yml_te = (centres[yte][:, :3] > 0).astype(float)
    assert F.knn_accuracy(tr, yml_tr, te, yml_te, k=5, multilabel=True) == 1.0


def _row(cnn, vit):
    return {"cnn_std_frac": cnn, "vit_std_frac": vit, "cnn_feat_std_frac": 0.3, "vit_feat_std_frac": 0.3}


def test_collapse_warning_fires_once_on_a_collapsed_run_and_never_on_a_healthy_one():
    lines = []
    w = M.CollapseWarning([])
    healthy = _row(0.25, 0.09)
    assert w.check(healthy, 0, lines.append) == [] and healthy["collapse"] == "" and lines == []
    bad = _row(0.003, 0.001)
    assert w.check(bad, 1, lines.append) == ["cnn", "vit"]
    assert bad["collapse"] == "cnn+vit" and len(lines) == 1
    assert lines[0].startswith("warning: collapse at epoch 2") and "--init imagenet" in lines[0]
    again = _row(0.001, 0.001)
    w.check(again, 2, lines.append)
    assert len(lines) == 1 and again["collapse"] == ""  # once per run
    resumed = M.CollapseWarning([{"epoch": "1", "collapse": "cnn+vit"}])  # a rerun whose log already warned
    resumed.check(_row(0.001, 0.001), 3, lines.append)
    assert len(lines) == 1


class Constant(torch.nn.Module):
    """A 'backbone' that gives every image the same pooled features."""

    def forward_features(self, x):
        return torch.ones(len(x), 8)

    def forward_head(self, f, pre_logits=False):
        return f * torch.arange(1.0, 9.0)


class FakeTable:
    multilabel, class_names = False, ["a", "b"]

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.array = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
        self.labels = np.arange(n) % 2
        self.paths, self.extra = None, {}


def test_monitor_of_a_constant_backbone_reads_collapse():
    table = FakeTable(40)
    split = {"train": np.arange(30), "val": np.arange(30, 40), "test": np.arange(0)}
    mon = F.Monitor(table, split, 8, torch.device("cpu"), n_bank=20, n_val=10)
    assert mon.x["bank"].shape == (20, 3, 8, 8) and mon.x["val"].shape == (10, 3, 8, 8)
    row = mon.measure({"const": Constant()})
    assert row["const_feat_std"] == pytest.approx(0.0, abs=1e-12)
    assert row["const_rank"] == pytest.approx(1.0, abs=1e-4)
    assert M.collapsed_arms({k: v for k, v in row.items()}) == ["const"]  # no output spread: the features'


SMALL = ["--data", "synthetic", "--cnn", "test_resnet", "--vit", "test_vit", "--img-size", "32",
         "--init", "random", "--workers", "0", "--bs", "16", "--epochs", "2", "--limit-train", "48",
         "--monitor-bank", "64", "--monitor-val", "32"]


@pytest.fixture(scope="module")
def cass_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cass_mon")
    on = run_script("pretrain_cass.py", *SMALL, "--out", "on", cwd=tmp)
    off = run_script("pretrain_cass.py", *SMALL, "--out", "off", "--no-monitor", cwd=tmp)
    return tmp, on, off


@pytest.mark.slow
def test_cass_log_holds_the_monitors_and_the_plot_is_written(cass_runs):
    tmp, on, _ = cass_runs
    rows = read_csv_log(tmp / "on" / "log.csv")
    for arm in ("cnn", "vit"):
        for key in ("std", "std_frac", "feat_std", "feat_std_frac", "rank", "knn"):
            assert f"{arm}_{key}" in rows[0], f"{arm}_{key}"
        for r in rows:
            assert 1.0 <= float(r[f"{arm}_rank"]) <= 64 and 0.0 <= float(r[f"{arm}_knn"]) <= 1.0
            assert float(r[f"{arm}_std_frac"]) == pytest.approx(float(r[f"{arm}_std"]) * math.sqrt(1000), rel=1e-3)
    assert "collapse" in rows[0] and "monitor_seconds" in rows[0]
    init = json.loads((tmp / "on" / "monitors_init.json").read_text())  # the start, before any step
    assert {"cnn_rank", "vit_rank", "cnn_knn", "vit_feat_std_frac"} <= set(init)
    assert not (tmp / "off" / "monitors_init.json").exists()
    assert "cnn: out" in on.stdout and " rank " in on.stdout and " knn " in on.stdout
    assert (tmp / "on" / "monitors.png").stat().st_size > 10_000


def test_the_monitor_changes_nothing_in_training(cass_runs):
    tmp, _, _ = cass_runs
    on, off = read_csv_log(tmp / "on" / "log.csv"), read_csv_log(tmp / "off" / "log.csv")
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert "cnn_rank" not in off[0] and "cnn_std" in off[0]
    for arm in ("cnn", "vit"):
        a, b = load_file(tmp / "on" / f"{arm}.safetensors"), load_file(tmp / "off" / f"{arm}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_dino_log_holds_the_teachers_monitors(tmp_path):
    proc = run_script("pretrain_dino.py", "--data", "synthetic", "--arch", "test_resnet", "--img-size", "32",
                      "--local-size", "16", "--local-crops", "2", "--out-dim", "256", "--hidden-dim", "64",
                      "--bottleneck-dim", "32", "--init", "random", "--workers", "0", "--bs", "8", "--epochs", "1",
                      "--limit-train", "16", "--monitor-bank", "32", "--monitor-val", "16", "--out", "d",
                      cwd=tmp_path)
    rows = read_csv_log(tmp_path / "d" / "log.csv")
    for key in ("teacher_std", "teacher_std_frac", "teacher_feat_std_frac", "teacher_rank", "teacher_knn", "collapse"):
        assert key in rows[0], key
    assert float(rows[0]["teacher_std_frac"]) > 0 and "teacher: out" in proc.stdout
    assert (tmp_path / "d" / "monitors.png").is_file()


@pytest.mark.slow
def test_plot_cli_redraws_and_refuses_a_folder_without_a_log(cass_runs, tmp_path):
    tmp, _, _ = cass_runs
    (tmp / "on" / "monitors.png").unlink()
    proc = run_script("evaluation.monitors", tmp / "on", cwd=tmp)
    assert (tmp / "on" / "monitors.png").is_file() and "monitors.png" in proc.stdout
    proc = run_script("evaluation.monitors", tmp_path, cwd=tmp, check=False)
    assert proc.returncode == 2 and "no log.csv" in proc.stderr
