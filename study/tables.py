"""The paper's tables and Figure 2 from the run folders, ours beside the paper's numbers.

    python -m study.tables --mode quick            # runs/quick  -> results/quick
    python -m study.tables --mode paper            # runs/paper  -> results/paper

Every run folder under --runs is read (config.json, metrics.json, log.csv; study/run_index.py), and each
finished fine-tuning run is matched to the table cells of study.study() by what it is: data set, backbone,
label fraction and where its weights came from (supervised from an init, or the pretraining run
whose config.json sits beside the --weights file: CASS with its arm, pair, batch size, epochs,
init (and arm 1's own), augmentations, CNN optimiser, head activation and options, or DINO with its architecture, batch size,
epochs and init). The folder names do not matter. A cell shows the mean ± sample standard deviation
(ddof=1, study/aggregate.py) over the seeds found, with n; "—" marks a cell with no finished run.

The metric is the paper's for each data set (Appendix D.1): F1 (macro) for autoimmune, Dermofit and
brain MRI, balanced accuracy for ISIC 2019; F1 (macro) for the synthetic miniature.
Table 2 sums the per-epoch 'seconds' of log.csv: CASS = one run (both arms), DINO = its CNN run +
its Transformer run, each the mean over the finished pretraining seeds.

Outputs (written atomically) in --out: <table>.md and <table>.csv for each table, tables.md with
all of them, and figures/fig2.png.
"""

import argparse
import csv
import io
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from evaluation.monitors import COLLAPSE_FRAC, arms_of
from runtime.files import atomic_save_figure, atomic_write_text
from study import cells as S
from study import paper_results as PR
from study import profiles as P
from study.aggregate import read_metrics
from study.run_index import Runs, read_json, read_log

DASH = "—"


# ---------------------------------------------------------------- formatting

def fmt_stat(stat, unfinished=0, digits=4) -> str:
    if stat is None:
        return f"{DASH} (no run)" if not unfinished else f"{DASH} ({unfinished} unfinished)"
    mean, std, n = stat
    s = f"{mean:.{digits}f}" + ("" if std is None or math.isnan(std) else f" ± {std:.{digits}f}")
    return s + f" (n={n})"


def fmt_paper(p, quick: bool) -> str:
    if quick:
        return "n/a"
    if p is None:
        return DASH
    mean, spread = p
    return f"{_printed(mean)} ± {spread:g}"


def _printed(x: float) -> str:
    """A paper value with at least 4 decimals (0.865 -> 0.8650) but every printed digit kept (0.84252)."""
    s = repr(float(x))
    decimals = len(s.split(".")[1]) if "." in s and "e" not in s else 0
    return s if decimals >= 4 else f"{x:.4f}"


def fmt_seconds(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return DASH
    s = float(s)
    if s >= 3600:
        return f"{int(s // 3600)} h {int(round(s % 3600 / 60))} min"
    if s >= 60:
        return f"{int(s // 60)} min {int(round(s % 60))} s"
    return f"{s:.1f} s"


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def to_csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _num(x):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.10g}"


# ---------------------------------------------------------------- building tables

def all_positive_f1(runs: Runs, td):
    """Macro F1 of a predictor that marks every label present, on the test split of a multi-label table's
    runs (their predictions.csv holds one true_<label> column per label); None for single-label data."""
    for c in td.cells:
        for d in runs.finetune.get(c.ft.key(), []):
            try:
                with open(d / "predictions.csv", newline="") as f:
                    rows = list(csv.DictReader(f))
            except OSError:
                continue
            cols = [k for k in (rows[0] if rows else {}) if k.startswith("true_")]
            if not cols:
                return None
            y = np.array([[float(r[k]) for k in cols] for r in rows])
            return float(f1_score(y, np.ones_like(y), average="macro", zero_division=0))
    return None


def test_leak(runs: Runs, td):
    """(n_test, n_test_clean) of the first finished run of the table whose test split has copies in
    training or validation (finetune.py's metrics.json), or None when no run's test leaks."""
    for c in td.cells:
        for d in runs.finetune.get(c.ft.key(), []):
            m = read_metrics(d)
            if m and m.get("n_test_clean") is not None and m["n_test_clean"] < m.get("n_test", 0):
                return m["n_test"], m["n_test_clean"]
    return None


def build_cells_table(td, runs: Runs, quick: bool):
    """Main, ablation and supervised tables: rows x columns of (ours, paper); where the test split leaks,
    the metric on the clean test (<metric>_clean) beside it. Returns (markdown, csv, filled, total)."""
    rows, cols = [], []
    for c in td.cells:
        if c.row not in rows:
            rows.append(c.row)
        if c.col not in cols:
            cols.append(c.col)
    grid = {(c.row, c.col): c for c in td.cells}
    header = ["Method (backbone)" if td.kind == "main" else "Setting"]
    with_paper = quick or any(c.paper is not None for c in td.cells)  # (the paper has no such table: ours only)
    micro = td.metric == "f1_macro"  # macro F1 is the headline; micro F1 (the authors' code's) beside it
    beside = "" if micro else td.beside  # another metric beside the headline (balanced accuracy: macro F1)
    clean = test_leak(runs, td) is not None
    for col in cols:
        header += ([f"{col} macro F1 ours"] if micro else [f"{col} ours"]) + \
            ([f"{col} {'macro F1 ' if micro else ''}clean test"] if clean else []) + \
            ([f"{col} micro F1 ours"] if micro else []) + \
            ([f"{col} {PR.METRIC_LABEL.get(beside, beside)} ours"] if beside else []) + \
            ([f"{col} {td.paper_label or 'paper'} ({'F1' if micro else 'as printed'})"] if with_paper else [])
    width = 1 + clean + micro + bool(beside) + with_paper
    md_rows, csv_rows, filled = [], [], 0
    for r in rows:
        line = [r]
        for col in cols:
            c = grid.get((r, col))
            if c is None:
                line += [""] * width
                continue
            stat, unfinished = runs.cell(c.ft, td.metric)
            micro_stat = runs.cell(c.ft, "f1_micro")[0] if micro else None
            clean_stat = runs.cell(c.ft, f"{td.metric}_clean")[0]
            beside_stat = runs.cell(c.ft, beside)[0] if beside else None
            filled += stat is not None
            line += [fmt_stat(stat, unfinished)] + ([fmt_stat(clean_stat, unfinished)] if clean else []) + \
                ([fmt_stat(micro_stat, unfinished)] if micro else []) + \
                ([fmt_stat(beside_stat, unfinished)] if beside else []) + \
                ([fmt_paper(c.paper, quick)] if with_paper else [])
            mean, std, n = stat if stat else (None, None, 0)
            micro_mean, micro_std, _ = micro_stat if micro_stat else (None, None, 0)
            clean_mean, clean_std, clean_n = clean_stat if clean_stat else (None, None, 0)
            csv_rows.append([td.name, td.data, td.metric, r, col, c.ft.method, c.ft.arch, c.ft.frac,
                             _num(mean), _num(std), n, unfinished, _num(micro_mean), _num(micro_std),
                             "" if quick or c.paper is None else _num(c.paper[0]),
                             "" if quick or c.paper is None else _num(c.paper[1]),
                             _num(clean_mean), _num(clean_std), clean_n] +
                            ([_num(beside_stat[0] if beside_stat else None),
                              _num(beside_stat[1] if beside_stat else None)] if beside else []))
        md_rows.append(line)
    csv_header = ["table", "data", "metric", "row", "column", "method", "arch", "label_frac", "ours_mean",
                  "ours_std", "ours_n", "ours_unfinished", "ours_f1_micro_mean", "ours_f1_micro_std", "paper_mean",
                  "paper_spread", "ours_clean_mean", "ours_clean_std", "ours_clean_n"] + \
        ([f"ours_{beside}_mean", f"ours_{beside}_std"] if beside else [])
    return markdown_table(header, md_rows), to_csv(csv_header, csv_rows), filled, len(td.cells)


def build_time_table(td, runs: Runs, quick: bool):
    header = ["Data set", "CASS ours", "DINO ours (CNN + Transformer)", "CASS time saved ours",
              "CASS paper", "DINO paper", "CASS time saved paper"]
    md_rows, csv_rows, filled = [], [], 0
    for data, cass, dcnn, dvit, paper in td.sources:
        c, a, b = runs.pretrain_seconds(cass), runs.pretrain_seconds(dcnn), runs.pretrain_seconds(dvit)
        dino = (a[0] + b[0]) if a and b else None
        saved = f"{(1 - c[0] / dino) * 100:.0f}%" if c and dino else DASH
        filled += c is not None and dino is not None
        n = lambda s: f" (n={s[2]})" if s else ""  # noqa: E731
        dino_txt = (f"{fmt_seconds(dino)} ({fmt_seconds(a[0])} + {fmt_seconds(b[0])})" if dino else
                    (f"{DASH} (CNN {fmt_seconds(a[0]) if a else 'no run'}, "
                     f"Transformer {fmt_seconds(b[0]) if b else 'no run'})"))
        p_cass, p_dino = (paper["cass"], paper["dino"]) if paper else (None, None)
        md_rows.append([data, (fmt_seconds(c[0]) + n(c)) if c else f"{DASH} (no run)", dino_txt + n(a if a else b),
                        saved, "n/a" if quick else fmt_seconds(p_cass), "n/a" if quick else fmt_seconds(p_dino),
                        "n/a" if quick else (f"{(1 - p_cass / p_dino) * 100:.0f}%" if paper else DASH)])
        csv_rows.append([td.name, data, _num(c[0] if c else None), c[2] if c else 0, _num(a[0] if a else None),
                         _num(b[0] if b else None), _num(dino), "" if quick else _num(p_cass),
                         "" if quick else _num(p_dino)])
    csv_header = ["table", "data", "cass_seconds", "cass_n", "dino_cnn_seconds", "dino_vit_seconds",
                  "dino_seconds", "paper_cass_seconds", "paper_dino_seconds"]
    return markdown_table(header, md_rows), to_csv(csv_header, csv_rows), filled, len(td.sources)


def figure2_data(td, runs: Runs):
    """{sweep: {series: [(x, mean, std, n)]}} for sweep 'epochs' / 'bs', series 'CASS cnn' etc."""
    out = {}
    for c in td.cells:
        sweep, x = c.row.split("=")
        stat, _ = runs.cell(c.ft, td.metric)
        if stat is not None:
            out.setdefault(sweep, {}).setdefault(c.col, []).append((int(x), *stat))
    return out


def mean_variance(series: dict, method: str):
    """The paper's 'mean variance': the variance over the settings of each backbone's mean
    performance, averaged over the backbones (those with at least two settings)."""
    v = [np.var([p[1] for p in pts]) for name, pts in series.items() if name.startswith(method) and len(pts) > 1]
    return float(np.mean(v)) if v else None


def build_figure2(td, runs: Runs, out_png: Path, quick: bool, arch_names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = figure2_data(td, runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"CASS cnn": ("tab:red", "o", "-"), "CASS vit": ("tab:red", "s", "--"),
              "DINO cnn": ("tab:blue", "o", "-"), "DINO vit": ("tab:blue", "s", "--")}
    md_rows, csv_rows = [], []
    for ax, (sweep, xlabel) in zip(axes, (("epochs", "pretraining epochs"), ("bs", "pretraining batch size"))):
        series = data.get(sweep, {})
        for name in styles:
            pts = sorted(series.get(name, []))
            if not pts:
                continue
            color, marker, ls = styles[name]
            method, arm = name.split()
            x, m, s = [p[0] for p in pts], [p[1] for p in pts], [0 if math.isnan(p[2]) else p[2] for p in pts]
            ax.errorbar(x, m, yerr=s, color=color, marker=marker, linestyle=ls, capsize=3,
                        label=f"{method} {arch_names[arm]}")
            for p in pts:
                md_rows.append([sweep, p[0], f"{method} {arch_names[arm]}", fmt_stat(p[1:])])
                csv_rows.append([sweep, p[0], method, arm, _num(p[1]), _num(p[2]), p[3]])
        ax.set_xlabel(xlabel)
        xs = sorted({p[0] for pts in series.values() for p in pts})
        if xs:
            ax.set_xticks(xs)
        ax.set_ylabel(PR.METRIC_LABEL.get(td.metric, td.metric) + " (100% labels)")
        if series:
            ax.legend(fontsize=8)
            mv = {m: mean_variance(series, m) for m in ("CASS", "DINO")}
            txt = "mean variance ours: " + ", ".join(f"{m} {v:.3g}" if v is not None else f"{m} {DASH}"
                                                       for m, v in mv.items())
            if not quick:
                pv = PR.FIGURE2_MEAN_VARIANCE["epochs" if sweep == "epochs" else "batch_size"]
                txt += f"\npaper: CASS {pv['cass']:.3g}, DINO {pv['dino']:.3g}"
            ax.text(0.02, 0.02, txt, transform=ax.transAxes, fontsize=7, va="bottom")
        else:
            ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    title = f"Figure 2: {td.title} — {td.data}"
    if td.note:
        title += "\n" + td.note
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(out_png, fig)
    plt.close(fig)
    md = markdown_table(["sweep", "value", "method (backbone)", "ours"], md_rows) if md_rows else \
        "_No finished runs for this figure yet._"
    return md, to_csv(["sweep", "value", "method", "arm", "mean", "std", "n"], csv_rows), len(md_rows), len(td.cells)


# ---------------------------------------------------------------- main

def _f(x, digits=3):
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return DASH


def study_sources(tables: dict) -> set:
    """Keys of the pretraining settings a mode's tables use (their cells' sources, the timed runs)."""
    keys = set()
    for td in tables.values():
        keys |= {c.ft.source.key() for c in td.cells if c.ft.source is not None}
        keys |= {s.key() for src in td.sources for s in src if hasattr(s, "key")}
    return keys


def build_monitor_table(runs: Runs, out_dir: Path, keys=None):
    """The label-free monitors (evaluation/monitors.py) of every pretraining run found (of the settings `keys`
    only, when given): first and last epoch per arm, the epoch of the collapse warning, and each run's
    monitors.png copied to figures/monitors/. Returns (markdown, csv, number of runs)."""
    header = ["Run", "Arm", "Epochs", "Loss (epoch 1 → last)", "Output spread / even (epoch 1 → last)",
              "Feature spread / even (init → last)", "Effective rank (init → epoch 1 → last)",
              "Online 20-NN accuracy (init → epoch 1 → last)", "Collapse warning"]
    md_rows, csv_rows, figures = [], [], []
    for key, dirs in sorted(runs.pretrain.items(), key=lambda kv: str(kv[0])):
        if keys is not None and key not in keys:
            continue
        for d in dirs:
            rows = read_log(d / "log.csv")
            if not rows or not any(k.endswith("_rank") for k in rows[0]):
                continue
            first, last = rows[0], rows[-1]
            init = read_json(d / "monitors_init.json") or {}  # the initial weights (newer runs measure them)

            def start(k, digits):
                return f"{_f(init[k], digits)} → " if k in init else ""
            warned = next((f"epoch {int(r['epoch']) + 1} ({r['collapse']})" for r in rows if r.get("collapse")), "none")
            arms = arms_of(first, "_rank")
            name = f"{key[0]} {d.name}"
            for a in arms:
                md_rows.append([name, a, len(rows), f"{float(first['loss']):.3g} → {float(last['loss']):.3g}",
                                f"{_f(first.get(f'{a}_std_frac'), 4)} → {_f(last.get(f'{a}_std_frac'), 4)}",
                                start(f"{a}_feat_std_frac", 3) + _f(last.get(f"{a}_feat_std_frac")),
                                start(f"{a}_rank", 1) + f"{_f(first[f'{a}_rank'], 1)} → {_f(last[f'{a}_rank'], 1)}",
                                start(f"{a}_knn", 3) + f"{_f(first[f'{a}_knn'])} → {_f(last[f'{a}_knn'])}", warned])
                csv_rows.append([key[0], d.name, a, len(rows), init.get(f"{a}_feat_std_frac", ""),
                                 init.get(f"{a}_rank", ""), init.get(f"{a}_knn", ""), first["loss"], last["loss"],
                                 first.get(f"{a}_std_frac", ""), last.get(f"{a}_std_frac", ""),
                                 last.get(f"{a}_feat_std_frac", ""), first[f"{a}_rank"], last[f"{a}_rank"],
                                 first[f"{a}_knn"], last[f"{a}_knn"], warned])
            png = d / "monitors.png"
            if png.is_file():
                dest = out_dir / "figures" / "monitors" / f"{key[0]}-{d.name}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".tmp")
                shutil.copyfile(png, tmp)
                os.replace(tmp, dest)
                figures.append((name, dest.relative_to(out_dir)))
    md = markdown_table(header, md_rows)
    md += "".join(f"\n\n![{n}]({p.as_posix()})" for n, p in figures)
    csv_header = ["method", "run", "arm", "epochs", "feat_std_frac_init", "rank_init", "knn_init", "loss_first",
                  "loss_last", "out_std_frac_first",
                  "out_std_frac_last", "feat_std_frac_last", "rank_first", "rank_last", "knn_first", "knn_last",
                  "collapse_warning"]
    return md, to_csv(csv_header, csv_rows), len({r[0] for r in md_rows})


def build_options_table(td, runs: Runs):
    """The options against collapse: one row per option and arm with the last epoch's monitors, the
    frozen probes (test accuracy), 1% / 10% fine-tuning (test F1 macro) and the pretraining seconds per
    epoch. Returns (markdown, csv, filled cells, total cells)."""
    grid = {(c.row, c.col): c for c in td.cells}
    cols = (("knn", "accuracy"), ("linear", "accuracy"), ("1%", "f1_macro"), ("10%", "f1_macro"))
    names = ["Frozen 20-NN accuracy", "Linear probe accuracy", "1% F1 (macro)", "10% F1 (macro)"]
    if test_leak(runs, td):  # the same four on the clean test, beside them
        cols += tuple((f"{c} clean", f"{m}_clean") for c, m in cols)
        names += [f"{n}, clean test" for n in names]
    header = ["Option", "Arm", "Output spread / even (last epoch)", "Effective rank", "Online 20-NN", *names,
              "Pretraining s / epoch", "Collapse warning"]
    md_rows, csv_rows, filled = [], [], 0
    for row, cass in td.sources:
        dirs = [d for d in runs.pretrain.get(cass.key(), []) if (d / "log.csv").is_file()]
        log = read_log(dirs[0] / "log.csv") if dirs else None
        last = log[-1] if log else {}
        per_epoch = np.mean([float(r["seconds"]) for r in log]) if log else None
        warned = next((f"epoch {int(r['epoch']) + 1}" for r in log if r.get("collapse")), "none") if log else DASH
        for arm in ("cnn", "vit"):
            stats = {}
            for col, metric in cols:
                stat, unfinished = runs.cell(grid[(row, f"{arm} {col.replace(' clean', '')}")].ft, metric)
                filled += stat is not None and not col.endswith("clean")
                stats[col] = (stat, unfinished)
            keys = [c for c, _ in cols]
            md_rows.append([row, P.label(cass.arch(arm)), _f(last.get(f"{arm}_std_frac"), 4),
                            _f(last.get(f"{arm}_rank"), 1), _f(last.get(f"{arm}_knn")),
                            *(fmt_stat(*stats[c]) for c in keys), fmt_seconds(per_epoch), warned])
            csv_rows.append([td.name, row, arm, last.get(f"{arm}_std_frac", ""), last.get(f"{arm}_rank", ""),
                             last.get(f"{arm}_knn", ""),
                             *(_num(stats[c][0][0]) if stats[c][0] else "" for c in keys),
                             *(_num(stats[c][0][1]) if stats[c][0] else "" for c in keys),
                             *(stats[c][0][2] if stats[c][0] else 0 for c in keys),
                             _num(per_epoch), warned])
    base = ["knn_acc", "linear_acc", "f1_1pct", "f1_10pct"]
    base += [f"{b}_clean" for b in base][:len(cols) - 4]
    csv_header = ["table", "option", "arm", "out_std_frac_last", "rank_last", "online_knn_last",
                  *(f"{b}_mean" for b in base), *(f"{b}_std" for b in base), *(f"{b}_n" for b in base),
                  "pretrain_seconds_per_epoch", "collapse_warning"]
    return markdown_table(header, md_rows), to_csv(csv_header, csv_rows), filled, len(td.cells)


def titled(td) -> str:
    """A table's title with the name of its metric: 'F1' alone always reads 'F1 (macro)'."""
    label = PR.METRIC_LABEL.get(td.metric)
    if not label or label in td.title or td.kind in ("time", "figure2", "options"):
        return td.title
    if "test F1" in td.title and label.startswith("F1"):
        return td.title.replace("test F1", f"test {label}")
    return td.title if "accuracy" in td.title and "accuracy" in label else f"{td.title}: test {label}"


def cpu_data_banner(prof) -> str:
    """The head of tables.md for the CPU study of a data set other than brain MRI (study/profiles.py)."""
    paper = (f"The paper columns are its {prof.paper_table.replace('table', 'Table ')} on "
             f"{PR.MAIN[prof.paper_table]['title'].split(' (')[0]}, ANOTHER DATA SET (and ResNet-50 / ViT-B/16, "
             "384 px, ImageNet init, 100 epochs, an RTX 8000): the nearest the paper has, shown for orientation, "
             "not as a target these runs should reach." if prof.paper_table else
             "The paper has no results on this data set: no paper columns.")
    return (f"**Real data: {prof.title or prof.data}, CPU scale.** {P.label(prof.cnn)} and {P.label(prof.vit)} "
            f"at {S.CPU_IMG} px from random init, {prof.epochs} pretraining epoch{'s' if prof.epochs != 1 else ''} "
            f"and short fine-tuning on a 2-core CPU (docs/run_all.md, mode {prof.name}). {paper}\n\n")


def claim_banner(prof) -> str:
    """The head of tables.md for a mode of the claims ledger (study/profiles.py, CLAIM_MODES)."""
    return (f"**The paper's claim {prof.claim.split('-')[0]}, tested at CPU scale** ({prof.title}): "
            f"{P.label(prof.cnn)} and {P.label(prof.vit)} at {S.CPU_IMG} px from random init on a 2-core CPU "
            f"(docs/run_all.md, \"The claim modes\", mode {prof.name}; the verdicts are in results/claims.md). Rows "
            f"marked \"{S.BEYOND}\" are not the paper's CASS. Paper columns, where there are any, are on another "
            "data set or scale, shown for the size of the paper's gaps, not as a target.\n\n")


def build_all(mode: str, runs_dir, out_dir, prof=None):
    """Write every table of `mode` into out_dir; returns {name: (filled, total)}."""
    prof = prof or P.PROFILES[mode]
    quick = mode == "quick"
    out_dir = Path(out_dir)
    runs = Runs(runs_dir)
    arch_names = {"cnn": P.label(prof.cnn), "vit": P.label(prof.vit)}
    sections, summary = [], {}
    study = S.study(prof)
    for name, td in study.items():
        if td.kind == "maps":
            continue
        if td.kind == "time":
            md, cs, filled, total = build_time_table(td, runs, quick)
        elif td.kind == "options":
            md, cs, filled, total = build_options_table(td, runs)
        elif td.kind == "figure2":
            md, cs, filled, total = build_figure2(td, runs, out_dir / "figures" / f"{name}.png", quick, arch_names)
            md += f"\n\n![{name}](figures/{name}.png)"
        else:
            md, cs, filled, total = build_cells_table(td, runs, quick)
        summary[name] = (filled, total)
        head = f"## {name}: {titled(td)}\n\n"
        if td.kind == "options":
            head += ("Per option and arm: the monitors of the last pretraining epoch (evaluation/monitors.py), frozen pooled "
                     "features with 100% of the labels (test accuracy: cosine 20-NN vote, logistic regression), "
                     "end-to-end fine-tuning with 1% and 10% of the labels (test F1 macro, mean ± sample std over "
                     "seeds, n = finished runs), and the mean pretraining seconds per epoch.\n\n")
        elif td.kind not in ("time", "figure2"):
            head += (f"Metric: {PR.METRIC_LABEL.get(td.metric, td.metric)} on the test split, mean ± sample std "
                     f"(ddof=1) over seeds, n = finished runs. ")
            if td.metric == "f1_macro":
                head += ("Micro F1 (what the authors' code computed) beside it; the paper says only \"F1\". Macro F1 "
                         "weighs every class alike, so a model that ignores a rare class scores low; micro F1 equals "
                         "accuracy on single-label data and follows the frequent classes. ")
            if td.beside and td.metric != "f1_macro":
                head += f"{PR.METRIC_LABEL.get(td.beside, td.beside)} beside it. "
            head += ("Paper column: n/a (the paper has no synthetic data).\n\n" if quick else
                     "Paper column: as printed in the paper (its ± is described as a variance, Appendix C.5.1)"
                     + (f"; {td.paper_label}" if td.paper_label else "") + ".\n\n"
                     if any(c.paper is not None for c in td.cells) else "The paper reports no such evaluation.\n\n")
        elif td.kind == "time":
            head += ("Sum of the per-epoch `seconds` in log.csv (mean over finished pretraining seeds); DINO = its "
                     "CNN run + its Transformer run, as the paper's Table 2. " +
                     ("Paper: n/a.\n\n" if quick else
                      "Paper: none on this data set (its columns are —).\n\n" if all(src[4] is None for src in td.sources)
                      else f"Paper: {PR.TABLE2_NOTE}; ours: whatever hardware ran them.\n\n"))
        if td.note:
            head += td.note + "\n\n"
        leak = test_leak(runs, td) if td.kind not in ("time", "figure2", "options") else None
        if leak:
            head += (f"Clean test: the {leak[1]} of the {leak[0]} test images that have no copy (exact or near) in "
                     "training or validation (`python check_data.py` lists the others); the full test counts "
                     "those copies, which a model can get right by memory.\n\n")
        ref = all_positive_f1(runs, td) if td.kind == "main" else None
        if ref is not None:
            head += (f"For reference, a predictor that marks every label present scores a macro F1 of {ref:.3f} on "
                     "this test split.\n\n")
        section = head + md + "\n"
        atomic_write_text(out_dir / f"{name}.md", "#" + section.lstrip("#"))
        atomic_write_text(out_dir / f"{name}.csv", cs)
        sections.append(section)
    md, cs, n_mon = build_monitor_table(runs, out_dir, study_sources(study))
    if n_mon:
        section = ("## monitors: label-free monitors of the pretraining runs\n\n"
                   "Per epoch in each run's log.csv (evaluation/monitors.py): the spread of the L2-normalised outputs the loss "
                   "compares (training batches) and of the pooled backbone features (a fixed sample of training "
                   "images), as a fraction of an even spread 1/sqrt(d) (0 = every image gives the same vector); the "
                   "effective rank (RankMe) of those features; and a cosine 20-NN accuracy of a fixed validation "
                   f"sample against them. A run warns once when an output spread falls below "
                   f"{COLLAPSE_FRAC:g} of an even spread.\n\n" + md + "\n")
        atomic_write_text(out_dir / "monitors.md", "#" + section.lstrip("#"))
        atomic_write_text(out_dir / "monitors.csv", cs)
        sections.append(section)
        summary["monitors"] = (n_mon, n_mon)
    banner = (f"# Results ({mode} mode)\n\n" + (
        "**Synthetic-data miniature.** timm's tiny test_resnet and test_vit at 64 px, random init, a few epochs on "
        "a CPU, on the embedded synthetic microscopy data (study/run_all.py, the QUICK profile). They show what each "
        "method learns at this scale; they do NOT reproduce the paper's numbers, and the paper has no synthetic "
        "data (its columns are n/a).\n\n"
        if quick else
        "**Real brain-MRI data, CPU scale.** ResNet-18 and ViT-Ti/16 at 64 px from random init, 3 pretraining "
        "epochs and short fine-tuning on a 2-core CPU (README, 'The real-data CPU study'). The paper columns are "
        "its Table 4 and Table 2 (ResNet-50 / ViT-B/16, 384 px, ImageNet init, 100 epochs, an RTX 8000): another "
        "scale and init, shown for orientation, not as a target these runs should reach.\n\n"
        if mode.startswith("cpu") and not prof.data else
        claim_banner(prof) if prof.claim else
        cpu_data_banner(prof) if prof.data else
        "Our runs on the paper's data sets beside the numbers the paper prints. \"—\" marks cells with no finished "
        "run.\n\n") + f"Generated by `python -m study.tables --mode {mode}` from `{runs_dir}`.\n\n")
    atomic_write_text(out_dir / "tables.md", banner + "\n".join(sections))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(P.PROFILES), default="quick")
    p.add_argument("--runs", default=None, help="folder of run folders (default runs/<mode>)")
    p.add_argument("--out", default=None, help="output folder (default results/<mode>)")
    args = p.parse_args(argv)
    runs_dir = args.runs or str(P.PROFILES[args.mode].runs)
    out = Path(args.out or P.PROFILES[args.mode].results)
    if not Path(runs_dir).is_dir():
        print(f"note: {runs_dir} does not exist yet; every cell is marked '{DASH} (no run)'", file=sys.stderr)
    summary = build_all(args.mode, runs_dir, out)
    for name, (filled, total) in summary.items():
        print(f"  {name:28s} {filled}/{total} cells with runs")
    print(f"tables written to {out}/ (all in {out / 'tables.md'})")


if __name__ == "__main__":
    main()
