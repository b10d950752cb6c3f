"""Check a data set for copies before trusting its test scores.

Reads the data set and its split exactly as the training scripts do (same loaders, junk handling,
split file and seed) and reports what pipeline/copies.py finds, the same copies the scripts use for the
clean test:
- exact copies (identical bytes or identical decoded pixels) and near copies (re-encoded, resized,
  brightness/contrast changed), as groups;
- label conflicts: groups whose images carry different labels;
- leaks: images of validation with a copy in training, of test with a copy in training or validation;
- the test's class counts, full and clean (without those images).
It writes a contact sheet (--sheet) of cross-split pairs (from the closest to the farthest one still
called a copy) and of the label conflicts,
and with --json the counts (and the groups) as JSON.

    python check_data.py --data brain-mri --data-root /path/to/brain-mri --json leaks.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from datasets import get_split, load_table
from pipeline.copies import METHOD, NEAR_THRESHOLD, clean_test_rows, group_ids, leaks
from pipeline.images import array_to_rgb, load_rgb
from runtime.cli import add_data_args, run_cli
from runtime.files import atomic_save_figure, atomic_write_json


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p.add_argument_group("data (as the training scripts take it)"))
    p.add_argument("--json", default=None, help="write the counts and groups as JSON to this file")
    p.add_argument("--sheet", default=None,
                   help="contact sheet PNG of cross-split pairs (closest to farthest) and the label conflicts "
                        "(default: runs/check_data/<data>-copies.png)")
    p.add_argument("--pairs", type=int, default=24, help="how many pairs the contact sheet shows (default 24)")
    return p.parse_args(argv)


def label_text(table, r) -> str:
    y = table.labels[r]
    if table.multilabel:
        return "+".join(n for n, v in zip(table.class_names, y) if v > 0.5) or "(none)"
    return table.class_names[int(y)]


def label_conflicts(table, copies) -> list:
    """The near-copy groups (rows) whose images do not all carry the same label."""
    g = group_ids(table, copies, "near")
    out = []
    for gid in np.unique(g):
        rows = np.flatnonzero(g == gid)
        if len(rows) > 1 and len({label_text(table, r) for r in rows}) > 1:
            out.append(rows.tolist())
    return out


def cross_split_pairs(table, copies, split, cross=True) -> list:
    """(distance, row a, row b) of the near pairs whose two images lie in different split parts
    (cross=False: in the same part), closest first, exact copies (distance 0) included."""
    part = np.full(len(table), "", dtype=object)
    for k in ("train", "val", "test"):
        part[np.asarray(split[k], dtype=np.int64)] = k
    index = {i: r for r, i in enumerate(table.ids)}
    pairs = {}
    for a, b, d in copies["near_pairs"]:
        ra, rb = index[a], index[b]
        if (part[ra] != part[rb]) == cross:
            pairs[(ra, rb)] = d
    for grp in copies["exact_groups"]:
        rows = [index[i] for i in grp]
        for ra in rows:
            for rb in rows:
                if ra < rb and (part[ra] != part[rb]) == cross:
                    pairs[(ra, rb)] = 0.0
    return sorted((d, a, b) for (a, b), d in pairs.items())


def _thumb(table, r, size=96):
    from PIL import Image
    im = array_to_rgb(np.asarray(table.array[r])) if table.array is not None else load_rgb(table.paths[r])
    return np.asarray(im.resize((size, size), Image.BILINEAR))


def contact_sheet(path, table, split, pairs, conflicts, n_pairs, same_part=()):
    """The two images of each pair side by side, titled with split part, label and distance: `n_pairs`
    cross-split pairs spread from the closest to the farthest one still called a copy, then the label
    conflicts, then (to fill the sheet) the closest pairs within a part."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    part = {}
    for k in ("train", "val", "test"):
        part.update({int(r): k for r in split[k]})
    if len(pairs) > n_pairs:  # from the closest to the farthest pair still called a copy, evenly spaced
        pairs = [pairs[int(round(k))] for k in np.linspace(0, len(pairs) - 1, n_pairs)]
    rows = [("cross-split", d, a, b) for d, a, b in pairs]
    rows += [("label conflict", None, g[0], g[1]) for g in conflicts[:max(4, n_pairs // 3)]]
    rows += [("same part", d, a, b) for d, a, b in same_part[:max(0, n_pairs - len(rows))]]
    if not rows:
        return False
    cols = 4  # two pairs per line
    lines = (len(rows) + 1) // 2
    fig, axes = plt.subplots(lines, cols, figsize=(cols * 1.9, lines * 2.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (kind, d, a, b) in enumerate(rows):
        for m, r in enumerate((a, b)):
            ax = axes[k // 2, (k % 2) * 2 + m]
            ax.imshow(_thumb(table, r))
            head = f"{kind}, d={d:.4f}" if d is not None else kind
            ax.set_title(f"{head if m == 0 else ''}\n{part.get(r, '?')}: {label_text(table, r)}\n"
                         f"{Path(table.ids[r]).name[:26]}", fontsize=6)
    fig.suptitle(f"{table.name}: cross-split copies (closest to farthest) and label conflicts\n({METHOD})", fontsize=7)
    fig.tight_layout()
    atomic_save_figure(path, fig)
    plt.close(fig)
    return True


def main(argv=None):
    args = get_args(argv)
    table = load_table(args.data, args.data_root, args.cache_dir, args.group_col)
    split = get_split(table, args.split_file, args.split_seed, args.train_size, args.resplit)
    copies = table.extra["copies"]
    found = leaks(split, table, copies)
    clean = clean_test_rows(split, table, copies)
    conflicts = label_conflicts(table, copies)
    pairs = cross_split_pairs(table, copies, split)
    counts = {k: table.class_counts(split[k]).tolist() for k in ("train", "val", "test")}
    report = {
        "data": args.data, "data_root": str(args.data_root), "n_images": len(table),
        "exact_groups": len(copies["exact_groups"]), "near_groups": len(copies["near_groups"]),
        "label_conflicts": len(conflicts), "leaks": found,
        "images_in_exact_groups": sum(len(g) for g in copies["exact_groups"]),
        "images_in_near_groups": sum(len(g) for g in copies["near_groups"]),
        "split": {k: len(split[k]) for k in ("train", "val", "test")}, "n_test_clean": len(clean),
        "class_names": table.class_names, "class_counts": counts, "class_counts_test_clean": table.class_counts(clean).tolist(),
        "method": METHOD, "threshold": NEAR_THRESHOLD, "unreadable": copies["unreadable"],
        "label_conflict_groups": [[table.ids[r] for r in g] for g in conflicts],
        "cross_split_pairs": [[table.ids[a], table.ids[b], d] for d, a, b in pairs],
        "exact_group_ids": copies["exact_groups"], "near_group_ids": copies["near_groups"],
    }
    print(f"{args.data}: {len(table)} images; split train {len(split['train'])}, val {len(split['val'])}, "
          f"test {len(split['test'])}")
    print(f"copies: {report['exact_groups']} exact groups ({report['images_in_exact_groups']} images), "
          f"{report['near_groups']} groups of exact or near copies ({report['images_in_near_groups']} images); "
          f"{len(conflicts)} groups with conflicting labels")
    print(f"leaks: validation {found['val']['near']} of {len(split['val'])} have a copy in training "
          f"({found['val']['exact']} exact); test {found['test']['near']} of {len(split['test'])} have a copy in "
          f"training or validation ({found['test']['exact']} exact)")
    names = table.class_names
    print("test per class:       " + ", ".join(f"{n} {c}" for n, c in zip(names, counts["test"])))
    print("clean test per class: " + ", ".join(f"{n} {c}" for n, c in zip(names, report["class_counts_test_clean"])))
    if copies["unreadable"]:
        print(f"{len(copies['unreadable'])} image(s) could not be read and were not compared (first: "
              f"{copies['unreadable'][0]})")
    sheet = Path(args.sheet or Path("runs") / "check_data" / f"{args.data}-copies.png")
    if contact_sheet(sheet, table, split, pairs, conflicts, args.pairs, cross_split_pairs(table, copies, split, False)):
        print(f"contact sheet: {sheet}")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"counts and groups: {args.json}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
