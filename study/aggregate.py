"""Mean and standard deviation of test metrics over runs (the paper reports mean +- std over five
seeds), read from the metrics.json files that finetune.py writes last in each finished run folder.

    python -m study.aggregate "runs/finetune/synthetic-resnet18-*"            # a table, one row per group
    python -m study.aggregate "runs/finetune/*" --metrics f1_macro balanced_accuracy --json

Run folders are grouped by their name without the trailing -seed<N>, so the five seeds of one
setting form one row. Folders without metrics.json (unfinished runs) are skipped and counted.

The standard deviation is the sample standard deviation (ddof=1: the spread of the seeds as an
estimate of the spread between training runs); it is NaN for a single run.
"""

import argparse
import glob
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

DDOF = 1
DEFAULT_METRICS = ("f1_macro", "f1_micro", "f1_weighted", "balanced_accuracy", "accuracy", "auroc_macro")


def read_metrics(run_dir) -> dict:
    """metrics.json of a finished run folder, or None when the run has not finished."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def aggregate(run_dirs, metrics=None) -> dict:
    """{metric: (mean, std, n)} over the finished runs among `run_dirs`, for every top-level numeric
    metric (or those named in `metrics`). A run whose value is null (e.g. AUROC with a class absent
    from the test set) does not count for that metric; n says how many did. std uses ddof=1."""
    values = {}
    for d in run_dirs:
        m = read_metrics(d)
        if m is None:
            continue
        for k, v in m.items():
            if metrics is not None and k not in metrics:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, vs in values.items():
        a = np.asarray(vs)
        std = float(a.std(ddof=DDOF)) if len(a) > DDOF else float("nan")
        out[k] = (float(a.mean()), std, len(a))
    return out


def group_name(run_dir) -> str:
    """The run folder's path without the trailing -seed<N> (the seeds of one setting share it)."""
    p = Path(run_dir)
    return str(p.parent / re.sub(r"-seed\d+$", "", p.name))


def group_runs(run_dirs) -> dict:
    groups = {}
    for d in sorted(run_dirs):
        groups.setdefault(group_name(d), []).append(d)
    return groups


def format_cell(stat, digits=4) -> str:
    mean, std, n = stat
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patterns", nargs="+", help="glob patterns of run folders (quote them)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metrics to show")
    p.add_argument("--json", action="store_true",
                   help="print JSON {group: {metric: [mean, std, n]}} (std null for a single run)")
    p.add_argument("--digits", type=int, default=4)
    args = p.parse_args(argv)

    dirs = sorted({d for pat in args.patterns for d in glob.glob(pat) if Path(d).is_dir()})
    if not dirs:
        print(f"error: no folder matches {' '.join(args.patterns)}", file=sys.stderr)
        sys.exit(2)
    groups = group_runs(dirs)
    table = {}
    unfinished = 0
    for g, ds in groups.items():
        done = [d for d in ds if (Path(d) / "metrics.json").is_file()]
        unfinished += len(ds) - len(done)
        if done:
            table[g] = aggregate(done, args.metrics)
    if args.json:
        nan_to_null = lambda v: [v[0], None if math.isnan(v[1]) else v[1], v[2]]  # noqa: E731 (strict JSON)
        print(json.dumps({g: {k: nan_to_null(v) for k, v in s.items()} for g, s in table.items()}, indent=2))
        return
    header = ["run (seeds)", "n"] + args.metrics
    rows = []
    for g, stats in table.items():
        n = max((v[2] for v in stats.values()), default=0)
        rows.append([g, str(n)] + [format_cell(stats[m], args.digits) if m in stats else "-"
                                   for m in args.metrics])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if unfinished:
        print(f"({unfinished} unfinished run folder(s) without metrics.json skipped)")
    print(f"mean ± sample std (ddof={DDOF}) over the runs of each row")


if __name__ == "__main__":
    main()
