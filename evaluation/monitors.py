"""Label-free health checks of a pretraining run, once per epoch, the collapse warning, and their plot.

A self-supervised loss going down says nothing about whether the network learns: a constant output
for every image gives CASS's loss its minimum of 0. These monitors tell a collapsed run from a
learning one without fine-tuning anything:

- spread: the per-dimension standard deviation of L2-normalised vectors, averaged over dimensions.
  Vectors spread evenly over the unit sphere in d dimensions have a spread of about 1/sqrt(d);
  identical vectors have 0. Reported raw and as a fraction of 1/sqrt(d) (`*_frac`), for the
  outputs the loss compares (measured on the training batches) and for the pooled backbone features
  (measured on a fixed sample of training images).
- effective rank (RankMe) and online k-NN accuracy of those pooled features (evaluation/feature_monitors.py,
  imported only with --monitor).

    python -m evaluation.monitors runs/cass/brain-mri-...   # (re)draw monitors.png of finished or running runs
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

# Below this fraction of an even spread, in any arm, a run is reported as collapsed. Measured on
# brain MRI at 64 px (README, "Monitoring a run"): the logits of random-init ResNet-18 and ViT-Ti/16
# start at 0.07-0.37 of an even spread, and the paper's recipe takes them to 0.001-0.008 by its
# second and third epochs; 0.02 is 3.5x below the lowest healthy start and 2.5x above collapse.
COLLAPSE_FRAC = 0.02
COLLAPSE_HINT = ("the arms emit nearly the same vector for every image; try ImageNet weights (--init imagenet), "
                 "a lower --lr, or a shorter run; see README 'Monitoring a run'")


def spread(z: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension std (population) of the rows of z, L2-normalised."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    return z.std(0, unbiased=False).mean().item()


def spread_from_moments(s: torch.Tensor, n: float) -> float:
    """spread() from running sums: s[0] = sum of normalised rows, s[1] = sum of their squares."""
    mean, sq = s[0].double() / n, s[1].double() / n
    return (sq - mean * mean).clamp_min(0).sqrt().mean().item()


def even_spread(d: int) -> float:
    return 1 / math.sqrt(d)


def add_monitor_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("monitors (label-free health checks every epoch; README 'Monitoring a run')")
    g.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the pooled features' spread, effective rank and k-NN accuracy after every "
                        "epoch (a few percent of an epoch), warn once on collapse, plot monitors.png at the end")
    g.add_argument("--monitor-bank", type=int, default=512,
                   help="training images (seeded sample) whose features form the k-NN bank and rank sample")
    g.add_argument("--monitor-val", type=int, default=256, help="validation images that query the k-NN bank")


def output_moments(moments: dict, name: str, z: torch.Tensor):
    """Add a batch of outputs z to the running sums of their L2-normalised rows and squares."""
    z = torch.nn.functional.normalize(z.detach().float(), dim=-1)
    s = moments.setdefault(name, torch.zeros(2, z.shape[1], device=z.device))
    s[0] += z.sum(0)
    s[1] += (z * z).sum(0)


def output_spreads(moments: dict, n: float) -> dict:
    """{name}_std and {name}_std_frac for each arm's running sums."""
    row = {}
    for name, s in moments.items():
        row[f"{name}_std"] = std = spread_from_moments(s, n)
        row[f"{name}_std_frac"] = std / even_spread(s.shape[1])
    return row


def arms_of(columns, suffix: str) -> list:
    """The arms that have a `<arm><suffix>` column (outputs: '_std_frac'; features: '_feat_std_frac',
    '_rank'), sorted."""
    arms = {k[: -len(suffix)] for k in columns if k.endswith(suffix)}
    return sorted(a for a in arms if not (suffix == "_std_frac" and a.endswith("_feat")))


def collapsed_arms(row: dict, threshold: float = COLLAPSE_FRAC) -> list:
    """Arms whose output spread (or, without one, pooled-feature spread) is below threshold x even."""
    arms = arms_of(row, "_std_frac") or arms_of(row, "_feat_std_frac")
    out = []
    for a in arms:
        v = row.get(f"{a}_std_frac", row.get(f"{a}_feat_std_frac"))
        if v is not None and v != "" and float(v) < threshold:
            out.append(a)
    return out


class CollapseWarning:
    """Prints one warning line the first epoch a run's spread falls below COLLAPSE_FRAC and records
    it in the row (`collapse` = the arms, on that epoch's row only); a resumed run that already warned
    (its log holds such a row) stays quiet."""

    def __init__(self, log_rows):
        self.warned = any(r.get("collapse") for r in log_rows)

    def check(self, row: dict, epoch: int, write=print):
        arms = collapsed_arms(row)
        if arms and not self.warned:
            self.warned = True
            row["collapse"] = "+".join(arms)
            fr = ", ".join(f"{a} {float(row.get(f'{a}_std_frac', row.get(f'{a}_feat_std_frac'))):.4f}" for a in arms)
            write(f"warning: collapse at epoch {epoch + 1}: output spread below {COLLAPSE_FRAC:g} of an even "
                  f"spread ({fr}); {COLLAPSE_HINT}")
        else:
            row["collapse"] = ""
        return arms


def monitor_line(row: dict) -> str:
    """The monitors of a log row for the progress line: spread fraction, rank and k-NN per arm."""
    arms = arms_of(row, "_rank")
    parts = []
    for a in arms:
        out = f"out {float(row[f'{a}_std_frac']):.3f} " if f"{a}_std_frac" in row else ""
        parts.append(f"{a}: {out}feat {float(row[f'{a}_feat_std_frac']):.3f} rank {float(row[f'{a}_rank']):.1f} "
                     f"knn {float(row[f'{a}_knn']):.3f}")
    return " | ".join(parts)


# ---------------------------------------------------------------- the plot

def plot_run(run_dir, out_png=None) -> Path:
    """monitors.png in run_dir from its log.csv: loss, spread (fraction of even; outputs solid,
    pooled features dashed), effective rank and k-NN accuracy against epoch, every arm on each panel;
    the feature monitors start at epoch 0 (the initial weights, monitors_init.json) when measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime.files import atomic_save_figure
    from runtime.runs import read_csv_log
    run_dir = Path(run_dir)
    rows = read_csv_log(run_dir / "log.csv")
    if not rows:
        raise ValueError(f"{run_dir / 'log.csv'} has no rows")
    init_file = run_dir / "monitors_init.json"  # the monitors before the first step, drawn at epoch 0
    init = json.loads(init_file.read_text()) if init_file.is_file() else None
    ep = [int(r["epoch"]) + 1 for r in rows]

    def col(k):
        return [float(r[k]) if r.get(k, "") not in ("", None) else float("nan") for r in rows]

    def feat(k):  # a feature monitor's curve, from epoch 0 when the start was measured
        return ([0] + ep, [float(init[k])] + col(k)) if init and k in init else (ep, col(k))

    arms = arms_of(rows[0], "_rank")
    out_arms = arms_of(rows[0], "_std_frac")
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    ax[0].plot(ep, col("loss"), "k-o", ms=3)
    ax[0].set_yscale("log")
    ax[0].set_title("loss")
    colours = dict(zip(sorted(set(arms) | set(out_arms)), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for a in out_arms:
        ax[1].plot(ep, col(f"{a}_std_frac"), "-o", ms=3, color=colours[a], label=f"{a} outputs")
    for a in arms:
        ax[1].plot(*feat(f"{a}_feat_std_frac"), "--s", ms=3, color=colours[a], label=f"{a} pooled features")
        ax[2].plot(*feat(f"{a}_rank"), "-o", ms=3, color=colours[a], label=a)
        ax[3].plot(*feat(f"{a}_knn"), "-o", ms=3, color=colours[a], label=a)
    ax[1].axhline(COLLAPSE_FRAC, color="r", lw=0.8, ls=":", label=f"collapse ({COLLAPSE_FRAC:g})")
    ax[1].set_yscale("log")
    ax[1].set_title("spread / even spread (1/sqrt(d))")
    ax[2].set_title("effective rank (RankMe) of pooled features")
    ax[3].set_title("online 20-NN accuracy (validation sample)")
    for a in ax:
        a.set_xlabel("epoch")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    collapse = [(e, r["collapse"]) for e, r in zip(ep, rows) if r.get("collapse")]
    for e, arms_ in collapse:
        ax[1].annotate(f"collapse: {arms_}", (e, COLLAPSE_FRAC), fontsize=7, color="r")
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png) if out_png else run_dir / "monitors.png"
    atomic_save_figure(out_png, fig)
    plt.close(fig)
    return out_png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding a log.csv of pretrain_cass.py or pretrain_dino.py")
    args = p.parse_args(argv)
    rc = 0
    for r in args.runs:
        if not (Path(r) / "log.csv").is_file():
            print(f"error: {r}: no log.csv (not a pretraining run folder)", file=sys.stderr)
            rc = 2
            continue
        print(plot_run(r))
    return rc


if __name__ == "__main__":
    sys.exit(main())
