"""study/tables.py on run folders written by hand in a temporary directory: cells are matched by what the
runs are (config.json), means and sample standard deviations over seeds, missing and unfinished
cells marked, the paper's column, Table 2 times summed from log.csv, Figure 2 drawn."""

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from study import cells as S
from study import paper_results as PR
from study import profiles as P
from study import tables
from study.run_index import Runs

# ---------------------------------------------------------------- fake run folders

def write_run(d: Path, config: dict, metrics: dict = None, log_seconds=None, files=()):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if log_seconds is not None:
        lines = ["epoch,loss,seconds"] + [f"{i},0.5,{s}" for i, s in enumerate(log_seconds)]
        (d / "log.csv").write_text("\n".join(lines) + "\n")
    for f in files:
        (d / f).write_bytes(b"")
    return d


def cass_config(data, cnn="resnet18", vit="vit_tiny_patch16_224", bs=32, epochs=3, init="random", **kw):
    cfg = {"data": data, "cnn": cnn, "vit": vit, "bs": bs, "epochs": epochs, "init": init, "extra_aug": [],
           "cnn_opt": "adam", "head_act": "none", "seed": 0, "img_size": 32, "lr": 1e-3, "t_max": 16}
    cfg.update(kw)
    return cfg


def dino_config(data, arch, bs=32, epochs=3, init="random", seed=0):
    return {"data": data, "arch": arch, "bs": bs, "epochs": epochs, "init": init, "out_dim": 1024, "seed": seed,
            "img_size": 32}


def ft_config(data, arch, frac, seed, weights=None, init="random"):
    return {"data": data, "arch": arch, "label_frac": frac, "seed": seed, "weights": weights, "init": init,
            "eval": "finetune", "img_size": 32, "epochs": 3}


def metrics(f1, bacc=None):
    return {"f1_macro": f1, "f1_micro": f1 + 0.01, "f1_weighted": f1, "balanced_accuracy": f1 if bacc is None else bacc,
            "best_epoch": 2}


def read_md_row(md_text: str, label: str) -> list:
    for line in md_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"row {label!r} not in\n{md_text}")


@pytest.fixture()
def quick_runs(tmp_path):
    """A quick-mode runs folder: supervised test_resnet at 10% with two seeds, a CASS pretraining run
    with its CNN arm fine-tuned at 10% (one seed) and its ViT arm's run unfinished, DINO runs for Table 2, an
    ablation-like CASS run (SGD) that must not leak into the main table, and an unrelated folder."""
    runs = tmp_path / "runs" / "quick"
    syn = runs / "synthetic"
    q = dict(cnn="test_resnet", vit="test_vit", bs=16)
    cw = {"class_weights": "inverse"}  # the quick mode's fine-tuning weighting
    write_run(syn / "ft" / "sup-r18-0.1-seed0", {**ft_config("synthetic", "test_resnet", 0.1, 0), **cw}, metrics(0.5))
    write_run(syn / "ft" / "sup-r18-0.1-seed1", {**ft_config("synthetic", "test_resnet", 0.1, 1), **cw}, metrics(0.7))
    cass = write_run(syn / "cass" / "a", cass_config("synthetic", **q), log_seconds=[10, 20, 30],
                     files=("cnn.safetensors", "vit.safetensors"))
    write_run(syn / "ft" / "cass-cnn-0.1-seed0",
              {**ft_config("synthetic", "test_resnet", 0.1, 0, weights=str(cass / "cnn.safetensors")), **cw}, metrics(0.9))
    write_run(syn / "ft" / "cass-vit-0.1-seed0",  # still running: no metrics.json
              {**ft_config("synthetic", "test_vit", 0.1, 0, weights=str(cass / "vit.safetensors")), **cw})
    write_run(syn / "dino" / "r18", dino_config("synthetic", "test_resnet", bs=16), log_seconds=[50, 50, 50],
              files=("backbone.safetensors",))
    write_run(syn / "dino" / "vit", dino_config("synthetic", "test_vit", bs=16), log_seconds=[40, 40, 40],
              files=("backbone.safetensors",))
    sgd = write_run(syn / "cass" / "sgd", cass_config("synthetic", cnn_opt="sgd", **q), log_seconds=[1, 1, 1],
                    files=("cnn.safetensors", "vit.safetensors"))
    write_run(syn / "ft" / "cass-sgd-cnn-0.1-seed0",
              {**ft_config("synthetic", "test_resnet", 0.1, 0, weights=str(sgd / "cnn.safetensors")), **cw}, metrics(0.1))
    (runs / "splits").mkdir(parents=True)
    (runs / "splits" / "x.json").write_text("{}")
    return runs


def test_quick_tables_means_std_missing_and_paper_na(quick_runs, tmp_path):
    out = tmp_path / "results"
    summary = tables.build_all("quick", quick_runs, out)
    md = (out / "quick_synthetic.md").read_text()
    # two seeds: mean 0.6, sample std (ddof=1) of (0.5, 0.7) = 0.1414
    row = read_md_row(md, "Supervised (test_resnet)")
    assert row[1] == "0.6000 ± 0.1414 (n=2)"
    assert row[2] == "0.6100 ± 0.1414 (n=2)"  # micro F1 beside the macro headline
    assert row[3] == "n/a"  # the paper has no synthetic data
    assert row[4] == "— (no run)"  # supervised 100%: no run
    assert "| Method (backbone) | 10% macro F1 ours | 10% micro F1 ours | 10% paper (F1) |" in md
    assert "test F1 (macro)" in md.splitlines()[0]
    # one seed: no std; the SGD variant (0.1) does not leak into the default CASS cell
    row = read_md_row(md, "CASS (test_resnet)")
    assert row[1] == "0.9000 (n=1)" and row[2] == "0.9100 (n=1)"
    assert row[4] == ""  # the quick mode fine-tunes the pretrained rows with 10% of the labels only
    # a run folder without metrics.json is counted as unfinished
    assert read_md_row(md, "CASS (test_vit/16)")[1] == "— (1 unfinished)"
    assert read_md_row(md, "DINO (test_resnet)")[1] == "— (no run)"
    assert summary["quick_synthetic"] == (2, 8)
    assert summary["quick_synthetic_multilabel"] == (0, 2)  # supervised rows with all labels only
    # the frozen probes: 3 starts x 2 backbones x (20-NN, linear), none run here
    assert summary["quick_frozen"] == (0, 12)
    # CSV: the same numbers, machine-readable
    rows = list(csv.DictReader(open(out / "quick_synthetic.csv")))
    sup = next(r for r in rows if r["row"] == "Supervised (test_resnet)" and r["column"] == "10%")
    assert float(sup["ours_mean"]) == pytest.approx(0.6) and float(sup["ours_std"]) == pytest.approx(math.sqrt(0.02))
    assert sup["ours_n"] == "2" and sup["paper_mean"] == ""
    assert float(sup["ours_f1_micro_mean"]) == pytest.approx(0.61)
    all_md = (out / "tables.md").read_text()
    assert "do NOT reproduce the paper" in all_md and "quick_synthetic_multilabel" in all_md


def test_table2_times_summed_from_logs(quick_runs, tmp_path):
    out = tmp_path / "results"
    tables.build_all("quick", quick_runs, out)
    row = read_md_row((out / "quick_time.md").read_text(), "synthetic")
    assert row[1] == "1 min 0 s (n=1)"  # 10 + 20 + 30 s
    assert row[2].startswith("4 min 30 s (2 min 30 s + 2 min 0 s)")  # DINO CNN 150 s + ViT 120 s
    assert row[3] == "78%"  # 1 - 60 / 270
    rows = list(csv.DictReader(open(out / "quick_time.csv")))
    syn = next(r for r in rows if r["data"] == "synthetic")
    assert float(syn["cass_seconds"]) == 60 and float(syn["dino_seconds"]) == 270


def test_unfinished_pretraining_is_not_timed(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "cass", cass_config("synthetic"), log_seconds=[10, 20])  # 2 of 3 epochs, no weights
    t = Runs(runs)
    assert t.pretrain_seconds(S.default_cass(P.QUICK, "synthetic")) is None


def test_paper_tables_show_paper_numbers_and_match_runs(tmp_path):
    runs = tmp_path / "runs" / "paper"
    auto = runs / "autoimmune"
    base = dict(cnn="resnet50", vit="vit_base_patch16_384", bs=16, epochs=100, init="imagenet")
    cass = write_run(auto / "cass" / "default", cass_config("autoimmune", **base), log_seconds=[12.0] * 100,
                     files=("cnn.safetensors", "vit.safetensors"))
    for seed, f1 in enumerate((0.86, 0.87, 0.88)):
        write_run(auto / "ft" / f"vit-{seed}", ft_config("autoimmune", "vit_base_patch16_384", 1.0, seed,
                                                         weights=str(cass / "vit.safetensors")), metrics(f1))
    sgd = write_run(auto / "cass" / "sgd", cass_config("autoimmune", cnn_opt="sgd", **base),
                    files=("cnn.safetensors", "vit.safetensors"))
    write_run(auto / "ft" / "sgd-cnn", ft_config("autoimmune", "resnet50", 1.0, 0,
                                                 weights=str(sgd / "cnn.safetensors")), metrics(0.8))
    write_run(auto / "ft" / "sup-r50", ft_config("autoimmune", "resnet50", 1.0, 0, init="imagenet"), metrics(0.84))
    isic = runs / "isic2019"
    write_run(isic / "ft" / "sup", ft_config("isic2019", "resnet50", 0.01, 0, init="imagenet"),
              metrics(0.9, bacc=0.3))
    out = tmp_path / "results"
    tables.build_all("paper", runs, out)

    t1 = (out / "table1.md").read_text()
    row = read_md_row(t1, "CASS (ViT-B/16)")
    assert row[4] == "0.8700 ± 0.0100 (n=3)" and row[5] == "0.8800 ± 0.0100 (n=3)"  # macro, then micro
    assert row[6] == "0.8894 ± 0.005"  # the paper's number beside ours
    assert read_md_row(t1, "DINO (ResNet-50)")[3] == "0.8237 ± 0.001"
    assert read_md_row(t1, "Supervised (ResNet-50)")[4] == "0.8400 (n=1)"
    assert "10% macro F1 ours" in t1 and "100% paper (F1)" in t1 and "test F1 (macro)" in t1.splitlines()[0]
    # ablations: the SGD run lands in Table 10's SGD row only; Table 9's default row is the main run
    t10 = (out / "table10.md").read_text()
    assert read_md_row(t10, "SGD")[1] == "0.8000 (n=1)" and read_md_row(t10, "SGD")[3] == "0.8648 ± 0.0005"
    assert read_md_row(t10, "Adam")[1] == "— (no run)" and read_md_row(t10, "Adam")[4] == "0.8700 ± 0.0100 (n=3)"
    assert t10.splitlines()[0].endswith(": test F1 (macro)")
    assert read_md_row((out / "table13.md").read_text(), "ResNet-50")[1] == "0.8400 (n=1)"
    # ISIC 2019 uses balanced accuracy
    t5 = (out / "table5.md").read_text()
    assert "balanced accuracy" in t5 and read_md_row(t5, "Supervised (ResNet-50)")[1] == "0.3000 (n=1)"
    # every table of the paper is written, with the paper's numbers
    for i in range(1, 22):
        assert (out / f"table{i}.md").is_file() and (out / f"table{i}.csv").is_file()
    assert "0.9091 ± 8.2e-05" in (out / "table7.md").read_text()
    t2 = (out / "table2.md").read_text()
    assert read_md_row(t2, "autoimmune")[1] == "20 min 0 s (n=1)"  # 100 x 12 s
    assert read_md_row(t2, "autoimmune")[4] == "21 min 0 s" and read_md_row(t2, "autoimmune")[5] == "1 h 13 min"
    assert read_md_row(t2, "isic2019")[5] == "109 h 21 min"
    assert (out / "figures" / "fig2.png").stat().st_size > 1000


def test_figure2_draws_what_exists(tmp_path):
    runs = tmp_path / "runs" / "paper" / "autoimmune"
    for epochs, f1s in ((50, (0.80, 0.82)), (100, (0.85, 0.86))):
        c = write_run(runs / f"cass{epochs}", cass_config("autoimmune", "resnet50", "vit_base_patch16_384", 16,
                                                           epochs, "imagenet"), files=("cnn.safetensors",))
        for seed, f1 in enumerate(f1s):
            write_run(runs / f"ft{epochs}-{seed}", ft_config("autoimmune", "resnet50", 1.0, seed,
                                                             weights=str(c / "cnn.safetensors")), metrics(f1))
    td = S.study(P.PAPER)["fig2"]
    data = tables.figure2_data(td, Runs(tmp_path / "runs"))
    pts = sorted(data["epochs"]["CASS cnn"])
    assert [p[0] for p in pts] == [50, 100] and pts[0][1] == pytest.approx(0.81) and pts[0][3] == 2
    assert "DINO cnn" not in data.get("epochs", {})
    # paper's "mean variance": variance over the settings of the means (one backbone here)
    assert tables.mean_variance(data["epochs"], "CASS") == pytest.approx(((0.855 - 0.81) / 2) ** 2)
    out = tmp_path / "fig2.png"
    tables.build_figure2(td, Runs(tmp_path / "runs"), out, quick=False, arch_names={"cnn": "R50", "vit": "V"})
    assert out.stat().st_size > 1000


def test_relative_weight_paths_resolve_from_the_repository_layout(tmp_path, monkeypatch):
    """study/run_all.py writes --weights relative to the repository root (runs/<mode>/...)."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "quick"
    write_run(runs / "synthetic" / "cass" / "x", cass_config("synthetic", cnn="test_resnet", vit="test_vit", bs=16),
              files=("cnn.safetensors",))
    write_run(runs / "synthetic" / "ft" / "y",
              ft_config("synthetic", "test_resnet", 0.1, 0, weights="runs/quick/synthetic/cass/x/cnn.safetensors"),
              metrics(0.4))
    stat, _ = Runs(runs).cell(S.main_cells(P.QUICK, "synthetic", (0.1,))[1].ft, "f1_macro")
    assert stat[0] == pytest.approx(0.4)


def test_paper_results_are_complete():
    assert set(PR.MAIN) == {"table1", "table3", "table4", "table5"}
    assert set(PR.ABLATION) == {f"table{i}" for i in range(6, 22)}
    for name, spec in PR.MAIN.items():
        for cells in spec["cells"].values():
            assert set(cells) == set(spec["fracs"])
    assert PR.main_cell("table4", "cass", "vit", 0.01) == (0.3345, 0.11)
    assert PR.TABLE2["autoimmune"] == {"dino": 73 * 60, "cass": 21 * 60}
    # every paper cell of the study's tables has a number (no typo in the row labels)
    for name, td in S.study(P.PAPER).items():
        if td.kind in ("main", "ablation", "supervised"):
            assert all(c.paper is not None for c in td.cells), name


def test_cli_writes_into_out(tmp_path):
    from conftest import run_script
    proc = run_script("study.tables", "--mode", "quick", "--runs", tmp_path / "none", "--out", tmp_path / "res",
                      cwd=tmp_path)
    assert "tables written to" in proc.stdout
    assert (tmp_path / "res" / "quick_synthetic.md").is_file()
    assert (tmp_path / "res" / "quick_frozen.md").is_file()  # the frozen probes table, empty but there


def test_cpu_tables_probes_and_monitors(tmp_path):
    """cpu mode: fine-tuned cells beside the paper's Table 4, frozen-feature probes in their own table
    (a probe never lands in a fine-tuning cell), and the monitors of each pretraining run."""
    runs = tmp_path / "runs" / "cpu"
    mri = runs / "brain-mri"
    log = ("epoch,loss,seconds,cnn_std_frac,vit_std_frac,cnn_feat_std_frac,vit_feat_std_frac,cnn_rank,vit_rank,"
           "cnn_knn,vit_knn,collapse\n"
           "0,0.02,100,0.30,0.20,0.25,0.10,60.5,12.0,0.61,0.66,\n"
           "1,0.0001,100,0.004,0.001,0.20,0.02,40.0,1.5,0.55,0.60,cnn+vit\n"
           "2,0.00005,100,0.003,0.001,0.20,0.02,38.0,1.4,0.54,0.60,\n")
    cass = write_run(mri / "cass" / "c", cass_config("brain-mri", bs=16, epochs=3, img_size=64),
                     files=("cnn.safetensors", "vit.safetensors"))
    (cass / "log.csv").write_text(log)
    (cass / "monitors_init.json").write_text(json.dumps({"cnn_rank": 13.5, "cnn_knn": 0.574, "cnn_feat_std_frac": 0.08}))
    option = write_run(mri / "cass" / "option", cass_config("brain-mri", bs=16, epochs=3, img_size=64, predictor=True),
                       files=("cnn.safetensors", "vit.safetensors"))  # cpu-options' run in the same folder
    (option / "log.csv").write_text(log)
    w = str(cass / "cnn.safetensors")
    write_run(mri / "ft" / "ft", ft_config("brain-mri", "resnet18", 1.0, 0, weights=w), metrics(0.8))
    write_run(mri / "ft" / "knn", {**ft_config("brain-mri", "resnet18", 1.0, 0, weights=w), "eval": "knn"},
              {**metrics(0.5), "accuracy": 0.55})
    write_run(mri / "ft" / "rand-lin", {**ft_config("brain-mri", "resnet18", 1.0, 0), "eval": "linear"},
              {**metrics(0.6), "accuracy": 0.65})
    out = tmp_path / "results"
    tables.build_all("cpu", runs, out)
    main = (out / "cpu_brain_mri.md").read_text()
    row = read_md_row(main, "CASS (ResNet-18)")
    assert row[7] == "0.8000 (n=1)" and row[9] == "0.9909 ± 0.0032"  # ours beside the paper's Table 4
    frozen = (out / "cpu_frozen.md").read_text()
    assert read_md_row(frozen, "CASS (ResNet-18)")[1:] == ["0.5500 (n=1)", "— (no run)"]
    assert read_md_row(frozen, "Random init (ResNet-18)")[1:] == ["— (no run)", "0.6500 (n=1)"]
    assert "paper" not in frozen.split("\n|")[1]  # no paper columns: the paper has no probes
    assert read_md_row((out / "cpu_frozen_f1.md").read_text(), "CASS (ResNet-18)")[1] == "0.5000 (n=1)"
    mon = (out / "monitors.md").read_text()
    assert "cass c" in mon and "cass option" not in mon  # only the runs of this mode's tables
    cnn = next(ln for ln in mon.splitlines() if "| cnn |" in ln)
    assert "0.3000 → 0.0030" in cnn and "13.5 → 60.5 → 38.0" in cnn and "0.574 → 0.610 → 0.540" in cnn
    assert "0.080 → 0.200" in cnn and "epoch 2 (cnn+vit)" in cnn and "0.02 → 5e-05" in cnn
    vit = next(ln for ln in mon.splitlines() if "| vit |" in ln)
    assert "| 12.0 → 1.4 |" in vit  # no initial value measured for this arm
    assert "Real brain-MRI data, CPU scale" in (out / "tables.md").read_text()


def test_options_table_reads_option_runs_by_their_flags(tmp_path):
    runs = tmp_path / "runs"
    mri = runs / "brain-mri"
    log = "epoch,loss,seconds,cnn_std_frac,vit_std_frac,cnn_rank,vit_rank,cnn_knn,vit_knn,collapse\n" \
          "0,0.5,100,0.3,0.2,50,20,0.6,0.6,\n1,0.4,120,0.25,0.15,55,25,0.7,0.65,\n"
    pred = write_run(mri / "cass" / "p", cass_config("brain-mri", bs=16, epochs=3, predictor=True),
                     files=("cnn.safetensors", "vit.safetensors"))
    (pred / "log.csv").write_text(log)
    w = str(pred / "vit.safetensors")
    for seed, f1 in ((0, 0.5), (1, 0.7)):
        write_run(mri / "ft" / f"p{seed}", ft_config("brain-mri", "vit_tiny_patch16_224", 0.1, seed, weights=w),
                  metrics(f1))
    write_run(mri / "ft" / "pk", {**ft_config("brain-mri", "vit_tiny_patch16_224", 1.0, 0, weights=w), "eval": "knn"},
              {**metrics(0.4), "accuracy": 0.45})
    prof = replace(P.CPU_OPTIONS, epochs=3)
    out = tmp_path / "res"
    tables.build_all("cpu-options", runs, out, prof=prof)
    md = (out / "cpu_options.md").read_text()
    vit = next(ln for ln in md.splitlines() if ln.startswith("| --predictor | ViT-Ti/16"))
    cells = [c.strip() for c in vit.strip("|").split("|")]
    assert cells[2:6] == ["0.1500", "25.0", "0.650", "0.4500 (n=1)"]
    assert cells[8] == "0.6000 ± 0.1414 (n=2)" and cells[9] == "1 min 50 s" and cells[10] == "none"
    paper = next(ln for ln in md.splitlines() if ln.startswith("| Paper recipe"))
    assert "— (no run)" in paper  # the predictor's runs never land in the paper recipe's row


def test_options_table_puts_the_clean_test_beside_the_full_one_when_it_leaks(tmp_path):
    runs = tmp_path / "runs"
    mri = runs / "brain-mri"
    pred = write_run(mri / "cass" / "p", cass_config("brain-mri", bs=16, epochs=3, predictor=True),
                     files=("cnn.safetensors", "vit.safetensors"))
    (pred / "log.csv").write_text("epoch,loss,seconds\n0,0.5,100\n")
    w = str(pred / "vit.safetensors")
    leak = {"n_test": 100, "n_test_clean": 60}
    write_run(mri / "ft" / "p0", ft_config("brain-mri", "vit_tiny_patch16_224", 0.1, 0, weights=w),
              {**metrics(0.5), "f1_macro_clean": 0.3, **leak})
    write_run(mri / "ft" / "pk", {**ft_config("brain-mri", "vit_tiny_patch16_224", 1.0, 0, weights=w), "eval": "knn"},
              {**metrics(0.4), "accuracy": 0.45, "accuracy_clean": 0.25, **leak})
    out = tmp_path / "res"
    tables.build_all("cpu-options", runs, out, prof=replace(P.CPU_OPTIONS, epochs=3))
    md = (out / "cpu_options.md").read_text()
    assert "| 10% F1 (macro) | Frozen 20-NN accuracy, clean test |" in md
    vit = next(ln for ln in md.splitlines() if ln.startswith("| --predictor | ViT-Ti/16"))
    cells = [c.strip() for c in vit.strip("|").split("|")]
    assert cells[5] == "0.4500 (n=1)" and cells[8] == "0.5000 (n=1)"
    assert cells[9] == "0.2500 (n=1)" and cells[12] == "0.3000 (n=1)"
    with open(out / "cpu_options.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["option"] == "--predictor" and r["arm"] == "vit")
    assert float(row["knn_acc_clean_mean"]) == pytest.approx(0.25) and row["f1_10pct_clean_n"] == "1"


def test_class_weight_runs_land_in_their_own_rows(tmp_path):
    runs = tmp_path / "runs" / "cpu"
    ft = runs / "brain-mri" / "finetune"
    for cw, f1 in (("minmax", 0.5), ("inverse", 0.6), ("none", 0.7)):
        write_run(ft / cw, {**ft_config("brain-mri", "resnet18", 0.1, 0, init="random"), "class_weights": cw},
                  metrics(f1))
    out = tmp_path / "results"
    tables.build_all("cpu-weights", runs, out)
    md = (out / "cpu_class_weights.md").read_text()
    for row, want in (("min-max (paper)", "0.5000"), ("inverse frequency", "0.6000"), ("none", "0.7000")):
        assert read_md_row(md, f"ResNet-18, {row}")[1] == f"{want} (n=1)", row  # the 10% macro F1 column
    assert "balanced accuracy" in (out / "cpu_class_weights_bacc.md").read_text()
    main = Runs(runs)  # and the cpu mode's own table sees only the min-max run
    stat, _ = main.cell(S.Finetune("brain-mri", "resnet18", 0.1, None, None, "random"), "f1_macro")
    assert stat[0] == pytest.approx(0.5) and stat[2] == 1


def test_multilabel_table_states_the_all_positive_reference(tmp_path):
    """A multi-label table names the macro F1 of marking every label present, computed from the test
    labels in a run's predictions.csv (against scikit-learn); a single-label table names none."""
    from sklearn.metrics import f1_score
    runs = tmp_path / "runs" / "quick"
    y = [[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]]
    d = write_run(runs / "synthetic-multilabel" / "ft" / "sup",
                  {**ft_config("synthetic-multilabel", "test_resnet", 1.0, 0), "class_weights": "inverse"},
                  metrics(0.5))
    lines = ["id,true_a,true_b,true_c,pred_a,pred_b,pred_c"] + [f"{i},{a},{b},{c},1,0,0" for i, (a, b, c) in enumerate(y)]
    (d / "predictions.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "res"
    tables.build_all("quick", runs, out)
    want = f1_score(y, [[1, 1, 1]] * 4, average="macro", zero_division=0)  # (0.857 + 0.4 + 0.4) / 3
    assert f"marks every label present scores a macro F1 of {want:.3f}" in (out / "quick_synthetic_multilabel.md").read_text()
    assert "marks every label present" not in (out / "quick_synthetic.md").read_text()


def test_pretraining_key_keeps_arm_1s_own_init():
    """Tables 15 and 17: ResNet-200 starts random beside an ImageNet ViT (--cnn-init random); its run
    must be found by the cell that asks for it, and not by the plain ImageNet pair's cell."""
    from study.run_index import pretrain_key
    cfg = cass_config("autoimmune", cnn="resnet200", vit="vit_base_patch16_384", bs=16, epochs=100,
                      init="imagenet", cnn_init="random")
    r200 = S.default_cass(P.PAPER, "autoimmune", cnn="resnet200")
    assert r200.cnn_init == "random"
    assert pretrain_key(cfg) == r200.key()
    assert pretrain_key({**cfg, "cnn_init": None}) == replace(r200, cnn_init=None).key() != r200.key()


def test_a_leaking_test_gets_the_clean_column_beside_the_full_one(tmp_path):
    """Runs whose metrics.json say the test leaks (n_test_clean < n_test) put <metric>_clean in a column of its
    own beside the full test's, in the markdown and the CSV; the frozen tables too."""
    runs = tmp_path / "runs" / "cpu"
    mri = runs / "brain-mri"
    leak = {"n_test": 1311, "n_test_clean": 825}
    for seed, (f1, clean) in enumerate(((0.80, 0.70), (0.84, 0.72))):
        write_run(mri / "ft" / f"sup{seed}", ft_config("brain-mri", "resnet18", 0.1, seed),
                  {**metrics(f1), "f1_macro_clean": clean, **leak})
    write_run(mri / "ft" / "rand-knn", {**ft_config("brain-mri", "resnet18", 1.0, 0), "eval": "knn"},
              {**metrics(0.5), "accuracy": 0.9, "accuracy_clean": 0.6, **leak})
    out = tmp_path / "results"
    tables.build_all("cpu", runs, out)
    main = (out / "cpu_brain_mri.md").read_text()
    header = next(ln for ln in main.splitlines() if ln.startswith("| Method"))
    assert "| 10% macro F1 ours | 10% macro F1 clean test | 10% micro F1 ours | 10% paper (F1) |" in header
    row = read_md_row(main, "Supervised (ResNet-18)")
    assert row[5:7] == ["0.8200 ± 0.0283 (n=2)", "0.7100 ± 0.0141 (n=2)"]
    assert "the 825 of the 1311 test images that have no copy" in main
    frozen = read_md_row((out / "cpu_frozen.md").read_text(), "Random init (ResNet-18)")
    assert frozen[1:3] == ["0.9000 (n=1)", "0.6000 (n=1)"]
    with open(out / "cpu_brain_mri.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["row"] == "Supervised (ResNet-18)" and r["column"] == "10%"]
    assert float(rows[0]["ours_clean_mean"]) == pytest.approx(0.71) and rows[0]["ours_clean_n"] == "2"


def test_cpu_data_tables_name_their_data_set(tmp_path):
    """The CPU studies of HAM10000 and PBC: the banner and every title name the data set (never brain MRI);
    HAM10000's headline is balanced accuracy with macro F1 beside it and the paper's Table 5 (ISIC 2019)
    labelled as another data set; PBC has no paper column."""
    runs = tmp_path / "runs" / "cpu-ham10000"
    ham = runs / "ham10000"
    for seed, (f1, bacc) in enumerate(((0.30, 0.40), (0.34, 0.44))):
        write_run(ham / "ft" / f"sup{seed}", ft_config("ham10000", "resnet18", 0.1, seed), metrics(f1, bacc))
    out = tmp_path / "ham"
    tables.build_all("cpu-ham10000", runs, out)
    md = (out / "tables.md").read_text()
    assert "HAM10000" in md.split("\n## ")[0] and "brain" not in md.lower()
    assert "ANOTHER DATA SET" in md.split("\n## ")[0]
    main = (out / "cpu_ham10000.md").read_text()
    header = next(ln for ln in main.splitlines() if ln.startswith("| Method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[4:7] == ["10% ours", "10% F1 (macro) ours", "10% paper on ISIC 2019, another data set (as printed)"]
    row = read_md_row(main, "Supervised (ResNet-18)")
    assert row[4:7] == ["0.4200 ± 0.0283 (n=2)", "0.3200 ± 0.0283 (n=2)", "0.3070 ± 0.0121"]
    assert "test balanced accuracy" in main.splitlines()[0] and "ISIC 2019" in main.splitlines()[0]
    assert "balanced accuracy" in (out / "cpu_ham10000_frozen.md").read_text().splitlines()[0]
    with open(out / "cpu_ham10000.csv", newline="") as f:
        rec = next(r for r in csv.DictReader(f) if r["row"] == "Supervised (ResNet-18)" and r["column"] == "10%")
    assert math.isclose(float(rec["ours_mean"]), 0.42) and math.isclose(float(rec["ours_f1_macro_mean"]), 0.32)
    for mode, name in (("cpu-pbc", "cpu_pbc"), ("cpu-pbc200", "cpu_pbc200")):
        out = tmp_path / mode
        tables.build_all(mode, tmp_path / "runs" / mode, out)
        md = (out / "tables.md").read_text()
        assert "Real data: PBC" in md and "no paper columns" in md and "brain" not in md.lower()
        assert ("200-image training subset" in md) == (mode == "cpu-pbc200")
        for table in (name, f"{name}_frozen", f"{name}_frozen_f1", f"{name}_time"):
            assert "PBC" in (out / f"{table}.md").read_text().splitlines()[0], table
        assert "paper" not in next(ln for ln in (out / f"{name}.md").read_text().splitlines()
                                   if ln.startswith("| Method"))


def test_claim_tables_mark_the_predictor_rows_and_name_the_claim(tmp_path):
    """A claim mode's tables.md says which claim it tests; CASS --predictor rows are marked beyond the paper; the
    paper columns say they are another data set (no runs needed: every cell is '—')."""
    out = tmp_path / "out"
    summary = tables.build_all("claim5-small-data", tmp_path / "none", out)
    text = (out / "tables.md").read_text()
    assert "claim 5, tested at CPU scale" in text and "results/claims.md" in text
    assert read_md_row(text, f"CASS --predictor, {S.BEYOND} (ResNet-18)")
    assert "paper on autoimmune (198 images), another data set" in text
    assert summary["claim5_small_data"] == (0, 8)  # DINO, CASS, CASS --predictor, supervised x 2 backbones
    summary = tables.build_all("claim6-ablations", tmp_path / "none", tmp_path / "out6")
    assert set(summary) == {"claim6_table9", "claim6_table10", "claim6_table11", "claim6_table18"}
    t10 = (tmp_path / "out6" / "claim6_table10.md").read_text()
    assert "SGD for the CNN arm" in t10 and "another data set" in t10
