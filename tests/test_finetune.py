"""finetune.py and study/aggregate.py: metrics against scikit-learn, the labelled subset, early stopping,
starting weights, errors, command-line runs on the synthetic data, frozen-feature evaluations and
resume.

Runs that only need plumbing use a tiny class-per-folder data set and timm's `test_resnet` (0.4M
parameters); the command-line runs use the real synthetic data and timm's test_resnet as a user would."""

import csv
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from run_with_hooks import stop_after_epoch
from safetensors.torch import load_file
from sklearn import metrics as skm

import datasets as D
import finetune as FT
import models
from conftest import run_script
from runtime import weight_files
from runtime.errors import UserError
from study import aggregate

FOLDER_COUNTS = {"alpha": 30, "beta": 20, "gamma": 14}  # imbalanced, each class has val and test images
TINY = ["--arch", "test_resnet", "--init", "random", "--img-size", "32", "--bs", "16", "--workers", "0"]


def make_folder_data(root: Path) -> Path:
    """64 small PNGs, one folder per class; each class has its own colour and stripe direction."""
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(FOLDER_COUNTS.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 60, (32, 32, 3)).astype(np.int32)
            a[..., c] += 150
            if c == 1:
                a[::4] += 40
            elif c == 2:
                a[:, ::4] += 40
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread here and in the scripts started from here: on a small shared machine two
    threads that wait on each other under load made these runs up to ten times slower."""
    old_threads, old_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return make_folder_data(tmp_path_factory.mktemp("folder_data"))


def read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- command-line runs on synthetic data

def cli_run(tmp_path_factory, data, epochs):
    cwd = tmp_path_factory.mktemp(f"cli-{data}")
    out = cwd / "run"
    proc = run_script("finetune.py", "--data", data, "--arch", "test_resnet", "--init", "random", "--img-size", 32,
                      "--epochs", epochs, "--label-frac", 0.1, "--bs", 32, "--workers", 0, "--out", out, cwd=cwd)
    return SimpleNamespace(cwd=cwd, out=out, proc=proc, data=data, epochs=epochs)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, cass_cache):
    return cli_run(tmp_path_factory, "synthetic", 2)


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, cass_cache):
    return cli_run(tmp_path_factory, "synthetic-multilabel", 1)  # one epoch: the multi-label path is the same


def check_run_files(run, n_classes):
    out = run.out
    for name in ("config.json", "labelled_ids.json", "log.csv", "metrics.json", "predictions.csv",
                 "confusion_matrix.png", "best.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()  # removed once metrics.json is written
    with open(out / "log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in log] == list(range(run.epochs))
    for key in ("train_loss", "val_loss", "val_f1_macro", "lr", "seconds"):
        assert all(math.isfinite(float(r[key])) for r in log), key
    assert float(log[0]["lr"]) == pytest.approx(3e-4)
    m = read_json(out / "metrics.json")
    for key in ("f1_macro", "f1_micro", "f1_weighted", "balanced_accuracy"):
        assert 0 <= m[key] <= 1, key
    assert m["headline_metric"] == "f1_macro" and m["headline_value"] == m["f1_macro"]
    assert 0 <= m["best_epoch"] < run.epochs and m["epochs_run"] == run.epochs
    # the whole test split is scored, in one row per image
    table = D.load_table(run.data, cache_dir=read_json(out / "config.json")["cache_dir"])
    split = D.get_split(table, run.cwd / D.default_split_file(table, 77))
    assert m["n_test"] == len(split["test"]) == len(read_predictions(out / "predictions.csv"))
    assert {r["id"] for r in read_predictions(out / "predictions.csv")} == {table.ids[r] for r in split["test"]}
    # the saved subset is the one labelled_subset draws: 10% of the training split, per class
    lab = read_json(out / "labelled_ids.json")
    assert lab["ids"] == [table.ids[r] for r in FT.labelled_subset(table, split["train"], 0.1, 0)]
    assert lab["n_labelled"] == round(0.1 * len(split["train"]))
    # best.safetensors is the restored model: a test_resnet with a head for the classes
    model = models.create_backbone("test_resnet", "random", num_classes=n_classes)
    assert weight_files.load_weights(model, out / "best.safetensors") == []
    assert "done (finetune): best epoch" in run.proc.stdout
    return m


@pytest.mark.slow
def test_single_label_cli_run(single_run):
    m = check_run_files(single_run, 6)
    assert m["multilabel"] is False and len(m["confusion_matrix"]) == 6
    assert np.sum(m["confusion_matrix"]) == m["n_test"]


@pytest.mark.slow
def test_multi_label_cli_run(multi_run):
    m = check_run_files(multi_run, 5)
    assert m["multilabel"] is True and np.asarray(m["confusion_matrix"]).shape == (5, 2, 2)
    assert set(m) >= {"f1_samples", "threshold"}


def recompute_single(rows, class_names):
    y = np.array([int(r["y_true"]) for r in rows])
    pred = np.array([int(r["y_pred"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
    assert (probs.argmax(1) == pred).all()
    C = len(class_names)
    p, rc, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(C), zero_division=0)
    got = {"f1_macro": skm.f1_score(y, pred, average="macro", zero_division=0),
           "f1_micro": skm.f1_score(y, pred, average="micro", zero_division=0),
           "f1_weighted": skm.f1_score(y, pred, average="weighted", zero_division=0),
           "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
           "accuracy": skm.accuracy_score(y, pred),
           "auroc_macro": skm.roc_auc_score(y, probs / probs.sum(1, keepdims=True), multi_class="ovr")
           if len(set(y)) == C else None,
           "confusion_matrix": skm.confusion_matrix(y, pred, labels=range(C)).tolist()}
    per = {c: {"precision": p[i], "recall": rc[i], "f1": f[i], "support": s[i]} for i, c in enumerate(class_names)}
    return got, per


def recompute_multi(rows, class_names, threshold):
    y = np.array([[int(r[f"true_{c}"]) for c in class_names] for r in rows])
    pred = np.array([[int(r[f"pred_{c}"]) for c in class_names] for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
    assert ((probs >= threshold).astype(int) == pred).all()
    bacc = [skm.balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(len(class_names))]
    got = {f"f1_{a}": skm.f1_score(y, pred, average=a, zero_division=0)
           for a in ("macro", "micro", "samples", "weighted")}
    got.update(balanced_accuracy=np.mean(bacc), accuracy=skm.accuracy_score(y, pred),
               auroc_macro=np.mean([skm.roc_auc_score(y[:, j], probs[:, j]) for j in range(len(class_names))]),
               confusion_matrix=skm.multilabel_confusion_matrix(y, pred).tolist())
    p, rc, f, s = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    per = {c: {"precision": p[j], "recall": rc[j], "f1": f[j], "support": s[j], "balanced_accuracy": bacc[j]}
           for j, c in enumerate(class_names)}
    return got, per


def assert_metrics_match(m, got, per):
    for key, value in got.items():
        if key == "confusion_matrix":
            assert m[key] == value
        elif key == "auroc_macro":  # the CSV holds 9 significant digits: float32 probabilities exactly
            assert (m[key] is None) == (value is None)
            if value is not None:
                assert m[key] == pytest.approx(value, abs=1e-6)
        else:
            assert m[key] == pytest.approx(value, abs=1e-12), key
    for c, d in per.items():
        for key, value in d.items():
            assert m["per_class"][c][key] == pytest.approx(value, abs=1e-12), (c, key)


@pytest.mark.slow  # (the script runs of its fixtures)
@pytest.mark.parametrize("which", ["single", "multi"])
def test_every_metric_is_recomputed_from_predictions_csv(which, request):
    run = request.getfixturevalue(f"{which}_run")
    m = read_json(run.out / "metrics.json")
    rows = read_predictions(run.out / "predictions.csv")
    if which == "single":
        got, per = recompute_single(rows, m["class_names"])
    else:
        got, per = recompute_multi(rows, m["class_names"], m["threshold"])
    assert_metrics_match(m, got, per)


def test_metrics_with_a_class_absent_from_the_test_set():
    y = np.array([0, 0, 1, 1, 0])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.3, .3, .4], [.6, .3, .1]])
    m = FT.compute_metrics(y, probs, ["a", "b", "c"], multilabel=False)
    assert m["auroc_macro"] is None  # class c never occurs: one-vs-rest AUROC undefined
    assert m["per_class"]["c"]["support"] == 0
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, probs.argmax(1), average="macro", zero_division=0))


# ---------------------------------------------------------------- the labelled subset

@pytest.mark.parametrize("data", ["synthetic", "synthetic-multilabel"])
def test_labelled_subset_is_stratified_seeded_and_inside_the_training_split(data, cass_cache):
    table = D.load_table(data, cache_dir=str(cass_cache))
    split = D.make_split(table, 77)
    train = split["train"]
    a = FT.labelled_subset(table, train, 0.1, seed=3)
    assert np.array_equal(a, FT.labelled_subset(table, train, 0.1, seed=3))  # deterministic per seed
    assert not np.array_equal(a, FT.labelled_subset(table, train, 0.1, seed=4))  # other seed, other subset
    assert set(a) <= set(train) and not set(a) & (set(split["val"]) | set(split["test"]))
    assert len(a) == len(set(a)) == round(0.1 * len(train))
    # stratified: each stratum (class, or label combination) gives 10% of its members, within one
    strata = D._strata(table, train)
    chosen = np.isin(train, a)
    for s in np.unique(strata):
        assert abs(chosen[strata == s].sum() - 0.1 * (strata == s).sum()) < 1 + 1e-9, s
    assert np.array_equal(FT.labelled_subset(table, train, 1.0, seed=3), np.sort(train))


@pytest.mark.parametrize("data", ["synthetic", "synthetic-multilabel"])
def test_tiny_label_fraction_keeps_every_class(data, cass_cache):
    table = D.load_table(data, cache_dir=str(cass_cache))
    train = D.make_split(table, 77)["train"]
    a = FT.labelled_subset(table, train, 0.001, seed=0)  # round(2.1) = 2 images before the guarantee
    counts = table.class_counts(a)
    assert (counts >= 1).all(), counts
    assert len(a) <= 2 + len(table.class_names)


def test_label_fraction_out_of_range_is_refused():
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(UserError, match="--label-frac"):
            FT.get_args(["--label-frac", bad])


# ---------------------------------------------------------------- early stopping

def test_early_stopping_counts_patience_and_keeps_the_best():
    es = FT.EarlyStopping(patience=3)
    losses = [1.0, 0.6, 0.7, 0.6, 0.5, 0.55, 0.9, 1.0, 0.4]
    stopped_at = None
    for epoch, v in enumerate(losses):
        es.step(v, epoch)
        if es.should_stop:
            stopped_at = epoch
            break
    assert stopped_at == 7 and es.best_epoch == 4 and es.best == 0.5  # an equal loss (0.6) is no improvement
    es2 = FT.EarlyStopping(patience=99)
    es2.load_state_dict(es.state_dict())
    assert es2.state_dict() == es.state_dict()
    never = FT.EarlyStopping(patience=0)
    for epoch in range(20):
        never.step(float(epoch), epoch)
    assert not never.should_stop and never.best_epoch == 0
    nan = FT.EarlyStopping(patience=1)
    nan.step(float("nan"), 0)
    assert nan.should_stop and nan.best_epoch == -1


def test_a_run_stops_on_rising_validation_loss_and_restores_the_best_epoch(folder_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scripted = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.3])  # best after epoch 1, patience 2: stop after epoch 3
    snapshots = []
    real = FT.forward_all

    def fake_forward_all(model, loader, device, criterion=None, desc=""):
        out = real(model, loader, device, criterion, desc)
        if criterion is None:  # the test pass
            return out
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return out[:3] + (next(scripted),)

    monkeypatch.setattr(FT, "forward_all", fake_forward_all)
    FT.main(["--data", "folder", "--data-root", str(folder_data), *TINY, "--epochs", "10", "--patience", "2",
             "--out", "run"])
    m = read_json("run/metrics.json")
    assert m["best_epoch"] == 1 and m["epochs_run"] == 4 and m["stopped_early"] is True
    assert m["best_val_loss"] == 0.5 and len(snapshots) == 4
    best = load_file("run/best.safetensors")
    assert all(torch.equal(best[k], snapshots[1][k]) for k in best)
    assert not all(torch.equal(best[k], snapshots[3][k]) for k in best)
    with open("run/log.csv") as f:
        assert [float(r["val_loss"]) for r in csv.DictReader(f)] == [1.0, 0.5, 0.7, 0.8]


@pytest.mark.parametrize("step", ["epoch", "batch"])
def test_cosine_schedule_per_epoch_or_per_batch(step, folder_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    FT.main(["--data", "folder", "--data-root", str(folder_data), *TINY, "--epochs", "3", "--patience", "0",
             "--sched-step", step, "--out", "run"])
    with open("run/log.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    n_batches = math.ceil(read_json("run/labelled_ids.json")["n_labelled"] / 16)
    t_max, per_epoch = (3, 1) if step == "epoch" else (16, n_batches)  # batch: the authors' T_max 16
    expected = [1e-6 + (3e-4 - 1e-6) * (1 + math.cos(math.pi * e * per_epoch / t_max)) / 2 for e in range(3)]
    assert lrs == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- starting weights

def args_for(arch, weights=None, init="random", img_size=32):
    return SimpleNamespace(arch=arch, weights=weights, init=init, img_size=img_size)


@pytest.mark.parametrize("file_classes", [1000, 3, 0])  # a CASS arm's 1000-d head, a head of the same shape, none
def test_fine_tuning_starts_from_the_backbone_of_the_weight_file(tmp_path, file_classes):
    torch.manual_seed(1)
    src = models.create_backbone("resnet18", "random", num_classes=file_classes)
    with torch.no_grad():  # make the BatchNorm statistics distinguishable from a fresh model's
        for mod in src.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1), mod.running_var.uniform_(0.5, 2)
    models.save_weights(src, tmp_path / "cnn.safetensors")
    torch.manual_seed(2)
    model, fresh = FT.build_model(args_for("resnet18", tmp_path / "cnn.safetensors"), 3)
    assert fresh == ["fc.bias", "fc.weight"]
    own, file = model.state_dict(), load_file(tmp_path / "cnn.safetensors")
    backbone = [k for k in own if not k.startswith("fc.")]
    assert backbone and all(torch.equal(own[k], file[k]) for k in backbone)
    assert own["fc.weight"].shape == (3, 512)
    if file_classes == 3:  # a head of the right shape in the file is still re-initialised
        assert not torch.equal(own["fc.weight"], file["fc.weight"])


def test_the_first_training_step_sees_the_weight_files_backbone(folder_data, tmp_path, monkeypatch):
    """Through main: the weights at the first forward pass of training are the file's (plus a new head)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    models.save_weights(models.create_backbone("test_resnet", "random", num_classes=1000), tmp_path / "cnn.safetensors")
    file = load_file(tmp_path / "cnn.safetensors")
    seen = []
    real = FT.build_model

    def spy(args, num_classes):
        model, fresh = real(args, num_classes)

        def first_forward(module, inputs):
            if module.training and not seen:
                seen.append({k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
        model.register_forward_pre_hook(first_forward)
        return model, fresh

    monkeypatch.setattr(FT, "build_model", spy)
    FT.main(["--data", "folder", "--data-root", str(folder_data), *TINY, "--weights", str(tmp_path / "cnn.safetensors"),
             "--epochs", "1", "--out", "run"])
    backbone = [k for k in seen[0] if not k.startswith("fc.")]
    assert all(torch.equal(seen[0][k], file[k]) for k in backbone)
    assert seen[0]["fc.weight"].shape[0] == 3
    assert read_json("run/metrics.json")["init"] == f"{tmp_path.name}-cnn"


def test_vit_arm_weights_load_with_a_new_head(tmp_path):
    src = models.create_backbone("test_vit", "random", num_classes=1000, img_size=32)
    models.save_weights(src, tmp_path / "vit.safetensors")
    model, fresh = FT.build_model(args_for("test_vit", tmp_path / "vit.safetensors"), 4)
    assert fresh == ["head.bias", "head.weight"]
    own, file = model.state_dict(), load_file(tmp_path / "vit.safetensors")
    assert all(torch.equal(own[k], file[k]) for k in own if not k.startswith("head."))


def test_init_path_is_the_same_as_weights(tmp_path):
    a = FT.get_args(["--init", str(tmp_path / "w.safetensors"), "--arch", "test_resnet"])
    assert a.weights == str(tmp_path / "w.safetensors") and a.init == "random"
    assert a.out == f"runs/finetune/synthetic-test_resnet-{tmp_path.name}-w-frac1-seed0"


@pytest.mark.slow
def test_a_weight_file_of_another_arch_is_a_one_line_error(folder_data, tmp_path):
    vit = models.create_backbone("test_vit", "random", num_classes=0, img_size=32)
    models.save_weights(vit, tmp_path / "vit.safetensors")
    proc = run_script("finetune.py", "--data", "folder", "--data-root", folder_data, "--arch", "test_resnet",
                      "--weights", tmp_path / "vit.safetensors", "--img-size", 32, "--workers", 0,
                      "--no-cache",  # (else the first test to read this folder also prints the cache's progress line)
                      cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --weights") and "does not fit" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- frozen-feature evaluations

def test_knn_vote_matches_scikit_learns_classifier():
    from sklearn.neighbors import KNeighborsClassifier
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(20, 8))
    y = rng.integers(0, 3, 50)
    ref = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(a, y).predict_proba(b)
    assert np.allclose(FT.knn_probs(a, y, b, 7, 3, multilabel=False), ref)
    ym = (rng.random((50, 4)) < 0.4).astype(np.float32)
    got = FT.knn_probs(a, ym, b, 7, 4, multilabel=True)
    ref_ml = KNeighborsClassifier(n_neighbors=7, metric="cosine", algorithm="brute").fit(a, ym).predict_proba(b)
    assert np.allclose(got, np.stack([p[:, 1] for p in ref_ml], 1))


@pytest.mark.parametrize("mode", ["knn", "linear"])
def test_frozen_feature_evaluation_run(mode, folder_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    FT.main(["--data", "folder", "--data-root", str(folder_data), *TINY, "--eval", mode])
    out = tmp_path / "runs" / mode / "folder-test_resnet-random-frac1-seed0"
    m = read_json(out / "metrics.json")
    assert m["eval"] == mode and m["best_epoch"] is None
    assert (out / "confusion_matrix.png").is_file() and not (out / "best.safetensors").exists()
    got, per = recompute_single(read_predictions(out / "predictions.csv"), m["class_names"])
    assert_metrics_match(m, got, per)
    if mode == "knn":
        assert m["knn_k"] == 20 and m["feature_dim"] > 0
    # colour separates the classes of this data set, even for random features
    assert m["balanced_accuracy"] > 0.5


# ---------------------------------------------------------------- resume

def test_an_interrupted_run_resumes_to_the_same_result(folder_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common_args = ["--data", "folder", "--data-root", str(folder_data), *TINY, "--epochs", "3", "--patience", "0"]
    FT.main(common_args + ["--out", "whole"])
    with stop_after_epoch(1):  # a run killed after epoch 1 (tests/run_with_hooks.py)
        FT.main(common_args + ["--out", "cut"])
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    capsys.readouterr()
    FT.main(common_args + ["--out", "cut"])
    assert "resuming" in capsys.readouterr().out
    whole, cut = read_json("whole/metrics.json"), read_json("cut/metrics.json")
    for m in (whole, cut):
        m.pop("train_seconds")
    assert whole == cut
    logs = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(f"{d}/log.csv"))]
            for d in ("whole", "cut")]
    assert logs[0] == logs[1] and len(logs[0]) == 3
    a, b = load_file("whole/best.safetensors"), load_file("cut/best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is left alone
    FT.main(common_args + ["--out", "cut"])
    assert "already holds a finished run" in capsys.readouterr().out
    # another config in the same folder is refused
    with pytest.raises(UserError, match="differs in: lr"):
        FT.main(common_args + ["--out", "cut", "--lr", "1e-3"])


# ---------------------------------------------------------------- aggregation over seeds

def test_aggregate_mean_std_over_seeds(tmp_path, capsys):
    vals = [0.5, 0.6, 0.7]
    for s, v in enumerate(vals):
        d = tmp_path / f"data-arch-init-frac0.1-seed{s}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"f1_macro": v, "balanced_accuracy": v / 2,
                                                    "auroc_macro": None if s == 0 else v, "arch": "x"}))
    (tmp_path / "data-arch-init-frac0.1-seed9").mkdir()  # unfinished: skipped
    dirs = sorted(tmp_path.glob("*-seed*"))
    r = aggregate.aggregate(dirs)
    assert r["f1_macro"] == pytest.approx((0.6, np.std(vals, ddof=1), 3))
    assert r["auroc_macro"][2] == 2 and "arch" not in r
    assert math.isnan(aggregate.aggregate(dirs[:1])["f1_macro"][1])
    aggregate.main([str(tmp_path / "*")])
    out = capsys.readouterr().out
    assert "data-arch-init-frac0.1 " in out and "0.6000 ± 0.1000" in out and "1 unfinished" in out
