"""Data sets and their splits, shared by every script.

`load_table(name, root)` reads a data set in the layout its curators ship (or generates the
embedded synthetic one) into an `ImageTable`: sample ids, where each image lies, labels, class
names; the class-per-folder trees (folder, dermofit) are read here, the other layouts in
pipeline/layouts.py (imported only for them). `get_split` makes or reuses the saved train/val/test split,
so CASS, DINO, supervised training and every fine-tuning seed see the same images. `load_data` does both for the shared
flags, with the decoded-image cache and the bad-image checks of pipeline/decoded_cache.py (imported only for
image files). The table type, the junk rule and the class-per-folder reader are in pipeline/table.py;
from a table to batches: pipeline/loading.py; the transforms: pipeline/transforms.py.
"""

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.table import ImageTable, largest_remainder, load_folder
from runtime.cli import default_cache_dir
from runtime.distributed import is_main
from runtime.errors import UserError
from runtime.files import atomic_write_json, atomic_write_text, file_lock

DATA_NAMES = ("synthetic", "synthetic-multilabel", "isic2019", "ham10000", "brain-mri", "dermofit", "autoimmune",
              "pbc", "folder", "csv", "medmnist")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test, Section 4.1


# ---------------------------------------------------------------- loaders

def load_dermofit(root) -> ImageTable:
    """Dermofit: root/<class>/<lesion>/<image>, where the lesion folder also holds a *mask* image."""
    return load_folder(root, "dermofit", exclude_masks=True)


def load_synthetic(cache_dir, multilabel) -> ImageTable:
    from pipeline.synthetic import ensure_synthetic  # (the generator, only for the synthetic data sets)
    folder = ensure_synthetic(Path(cache_dir).expanduser(), multilabel=multilabel)
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    name = "synthetic-multilabel" if multilabel else "synthetic"
    ids = [f"{i:05d}" for i in range(len(images))]
    return ImageTable(name, ids, labels, meta["class_names"], multilabel, array=images, root=str(folder))


def _layouts():
    from pipeline import layouts  # (the CSV, brain MRI, ISIC 2019 and MedMNIST layouts: only for those data sets)
    return layouts


def load_table(name: str, root=None, cache_dir=None, group_col=None) -> ImageTable:
    """The data set called `name` (see DATA_NAMES), read from `root`; generated data lives in
    `cache_dir` (default: common.default_cache_dir(), $CASS_CACHE or ~/.cache/cass). `group_col`
    (csv, autoimmune): the CSV column whose images stay in one split part."""
    cache_dir = cache_dir or default_cache_dir()
    if group_col is not None and name not in ("csv", "autoimmune"):
        raise UserError(f"--group-col is for --data csv or autoimmune, not {name}")
    loaders = {
        "synthetic": lambda: load_synthetic(cache_dir, False),
        "synthetic-multilabel": lambda: load_synthetic(cache_dir, True),
        "isic2019": lambda: _layouts().load_isic2019(root),
        "ham10000": lambda: _layouts().load_ham10000(root),
        "pbc": lambda: _layouts().load_pbc(root),
        "brain-mri": lambda: _layouts().load_brain_mri(root),
        "dermofit": lambda: load_dermofit(root),
        "autoimmune": lambda: _layouts().load_autoimmune(root, group_col),
        "folder": lambda: load_folder(root),
        "csv": lambda: _layouts().load_csv(root, group_col=group_col),
        "medmnist": lambda: _layouts().load_medmnist(root),
    }
    if name not in loaders:
        raise UserError(f"--data {name}: unknown data set (choose from {', '.join(DATA_NAMES)})")
    return loaders[name]()


# ---------------------------------------------------------------- splits

def _strata(table: ImageTable, rows: np.ndarray) -> np.ndarray:
    """Stratification key per row: the class, or for multi-label the label combination
    (combinations seen fewer than 5 times share one stratum)."""
    if not table.multilabel:
        return table.labels[rows]
    keys = ["".join(str(int(v)) for v in table.labels[r]) for r in rows]
    uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inv = inv.copy()
    inv[counts[inv] < 5] = -1
    return inv


def stratified_partition(strata: np.ndarray, fractions, seed: int, groups=None):
    """Split positions 0..n-1 into len(fractions) parts, each stratum divided in the given
    proportions (largest remainder rounding), shuffled by `seed`.

    With `groups` (a group id per position), whole groups are dealt out instead of positions: a
    group's stratum is its most common one (ties: the lowest), and the proportions count groups.
    Positions that are each a group alone give exactly the partition without `groups`.

    Written by hand rather than with scikit-learn's stratified splitters because those refuse
    classes with a single member, which small medical data sets do have."""
    strata = np.asarray(strata)
    if groups is None:
        groups = np.arange(len(strata))
    uniq, first, unit_of = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # units in the order of their first position
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq))
    unit_of = rank[unit_of.reshape(-1)]
    pairs, counts = np.unique(np.stack([unit_of, strata.astype(np.int64)], 1), axis=0, return_counts=True)
    best = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per unit: most common stratum, then the lowest
    keep = best[np.r_[True, np.diff(pairs[best, 0]) != 0]]
    unit_strata = np.empty(len(uniq), dtype=np.int64)
    unit_strata[pairs[keep, 0]] = pairs[keep, 1]
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    fractions = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    for s in np.unique(unit_strata):
        members = rng.permutation(np.flatnonzero(unit_strata == s))
        take = largest_remainder(fractions * len(members), len(members))
        start = 0
        for j, k in enumerate(take):
            parts[j] += members[start:start + k].tolist()
            start += k
    return [np.sort(np.flatnonzero(np.isin(unit_of, p))) if p else np.zeros(0, dtype=np.int64) for p in parts]


def make_split(table: ImageTable, seed: int, groups=None, resplit: bool = False) -> dict:
    """Row indices of train/val/test: stratified 70/10/20, or the curator's split where the data set
    has one (validation then carved from the curator's training part, 1/8 of it to keep 70:10).
    `groups` (a group id per row: copies.split_groups) keeps each group in one part wherever the
    split is ours; the curator's own train/test boundary is kept as it is, unless `resplit` (all images
    pooled and split by us)."""
    cur = None if resplit else table.curator_split
    if cur and "val" in cur:
        return {k: np.asarray(cur[k]) for k in ("train", "val", "test")}
    if cur:
        train_rows = np.asarray(cur["train"])
        g = None if groups is None else np.asarray(groups)[train_rows]
        tr, va = stratified_partition(_strata(table, train_rows), (7, 1), seed, g)
        return {"train": train_rows[tr], "val": train_rows[va], "test": np.asarray(cur["test"])}
    rows = np.arange(len(table))
    tr, va, te = stratified_partition(_strata(table, rows), SPLIT_FRACTIONS, seed, groups)
    return {"train": tr, "val": va, "test": te}


def default_split_file(table: ImageTable, seed: int, resplit: bool = False) -> Path:
    return Path("runs") / "splits" / f"{table.name}-{table.fingerprint()}-seed{seed}{'-resplit' if resplit else ''}.json"


SUBSET_FLAGS = {"train": ("--train-size", "training"), "val": ("--val-size", "validation")}


def stratified_subset(table: ImageTable, rows: np.ndarray, n: int, seed: int, part: str = "train") -> np.ndarray:
    """A stratified subset of `n` of the split part's `rows`: each stratum (class, or label combination)
    gets its share by largest remainder, at least one image, drawn at random from `seed`. `part`
    ('train' or 'val') names the flag (--train-size / --val-size) in errors."""
    flag, name = SUBSET_FLAGS[part]
    if n > len(rows):
        raise UserError(f"{flag} {n} is larger than the {name} split ({len(rows)} images)")
    strata = _strata(table, rows)
    kinds, counts = np.unique(strata, return_counts=True)
    if n < len(kinds):
        raise UserError(f"{flag} {n} is smaller than the number of classes in the {name} split "
                        f"({len(kinds)}): the subset needs an image of each")
    take = np.ones(len(kinds), dtype=np.int64)
    take += largest_remainder((n - len(kinds)) * (counts - 1) / max(counts.sum() - len(kinds), 1), n - len(kinds))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(rows[strata == s])[:k] for s, k in zip(kinds, np.minimum(take, counts))]
    return np.sort(np.concatenate(picked))


def get_split(table: ImageTable, split_file=None, seed: int = 77, train_size: int = None,
              resplit: bool = False, val_size: int = None) -> dict:
    """The saved split (made first if needed, see _full_split); with `train_size`, its training part replaced by a
    stratified subset of that many images, drawn once and saved beside the split file as <split>-train<N>.json;
    with `val_size`, its validation part likewise (<split>-val<N>.json). The test part always stays whole.
    `resplit`: ignore the curator's split and split all images ourselves (its own default file,
    <...>-resplit.json)."""
    if resplit and not table.curator_split:
        raise UserError(f"--resplit: --data {table.name} has no curator's split to set aside (our splits already "
                        "keep copies together)")
    path = Path(split_file) if split_file else default_split_file(table, seed, resplit)
    split = _full_split(table, path, seed, resplit)
    for part, n in (("train", train_size), ("val", val_size)):
        if n is not None:
            split = {**split, part: _saved_subset(table, split, path, part, n, seed)}
    return split


def _saved_subset(table: ImageTable, split: dict, path: Path, part: str, n: int, seed: int) -> np.ndarray:
    """Rows of the stratified subset of `n` images of split[part], read from <split>-<part><n>.json, drawn
    and saved there (under a lock, atomically) the first time."""
    sub = path.with_name(f"{path.stem}-{part}{n}.json")
    if not sub.exists():
        with file_lock(sub):
            if not sub.exists():
                rows = stratified_subset(table, split[part], n, seed, part)
                atomic_write_json(sub, {"data": table.name, "split_file": str(path), f"{part}_size": n,
                                        "split_seed": seed, "fingerprint": table.fingerprint(),
                                        part: [table.ids[r] for r in rows]})
                return rows
    name = SUBSET_FLAGS[part][1]
    try:
        rows = _rows_of(table, json.loads(sub.read_text())[part])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{sub} is not a {name}-subset file (JSON with a {part} id list): delete it to draw a new one")
    if not np.isin(rows, split[part]).all():
        raise UserError(f"{sub} lists images outside the {name} split of {path}: delete it to draw a new one")
    return rows


def _rows_of(table: ImageTable, ids) -> np.ndarray:
    index = {i: r for r, i in enumerate(table.ids)}
    return np.asarray([index[i] for i in ids], dtype=np.int64)


def _full_split(table: ImageTable, path: Path, seed: int, resplit: bool) -> dict:
    """Load the split saved at `path`, or make and save it. Returns {'train'|'val'|'test': row indices}.

    The copies in the data set (pipeline/copies.py) are found first and saved beside the split file
    (`<split>.copies.json`); a split we make keeps every group of copies, and every group of
    `table.groups`, in one part. table.extra["copies"] holds them for load_data's clean test.

    Both files are made under one lock (file_lock) and renamed into place when complete: processes
    that need the same split at once (run_all --jobs N) make them once, and never read a half-written
    one. A split file saved before copies were looked for is used as it is; its copies are found
    and saved beside it."""
    from pipeline.copies import copies_file, ensure_copies, load_copies, split_groups
    cpath = copies_file(path)
    copies = load_copies(cpath, table) if path.exists() else None
    if copies is None:
        with file_lock(path):  # another process making the same split: wait, then read its files
            copies = ensure_copies(cpath, table, progress=is_main())
            if not path.exists():
                split = make_split(table, seed, split_groups(table, copies), resplit)
                atomic_write_json(path, {"data": table.name, "root": table.root, "split_seed": seed,
                                         "fingerprint": table.fingerprint(),
                                         **{k: [table.ids[r] for r in v] for k, v in split.items()}})
                table.extra["copies"] = copies
                return split
    table.extra["copies"] = copies
    try:
        saved = json.loads(path.read_text())
        parts = {k: saved[k] for k in ("train", "val", "test")}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--split-file {path} is not a split file (JSON with train/val/test id lists)")
    known = set(table.ids)
    missing = [i for ids in parts.values() for i in ids if i not in known]
    if missing:
        raise UserError(f"--split-file {path} lists {len(missing)} ids not in the data set (first: "
                        f"{missing[0]}); it belongs to other data: delete it to make a new split")
    return {k: _rows_of(table, ids) for k, ids in parts.items()}


def note_leaks(args, table: ImageTable, split: dict):
    """table.extra["clean_test"] (the test rows with no copy in training or validation) and
    ["leaks"] (copies.leaks); one warning line when the test leaks."""
    from pipeline.copies import clean_test_rows, leaks
    copies = table.extra["copies"]
    table.extra["clean_test"] = clean_test_rows(split, table, copies)
    table.extra["leaks"] = found = leaks(split, table, copies)
    n_test, n_clean = len(split["test"]), len(table.extra["clean_test"])
    if n_clean < n_test and is_main():
        print(f"warning: {n_test - n_clean} of the {n_test} test images have a copy in training or validation "
              f"({found['test']['exact']} exact, {found['test']['near']} exact or near; validation: "
              f"{found['val']['near']} of {len(split['val'])} in training); test metrics are also reported on "
              f"the {n_clean} clean ones (<metric>_clean); see them: python check_data.py --data {args.data}"
              + (f" --data-root {args.data_root}" if args.data_root else ""), file=sys.stderr)


# ---------------------------------------------------------------- the shared data flags

def load_data(args, cache_size=None, cache_part=None):
    """The table and the split for the shared --data/--data-root/--split-file flags.

    Data sets read from image files are decoded once into the decoded-image cache (`cached_table`,
    unless --no-cache) at `cache_size` px (default --img-size), covering every row of the table, or
    only the rows of split part `cache_part` (e.g. 'train' for DINO, whose cache size is its own).

    Unreadable image files (corrupt, truncated, not an image) are found before training: while the
    cache is built (its marker remembers them), or with --no-cache --skip-bad-images by decoding every
    file of those rows once. Without --skip-bad-images they are a UserError; with it their rows are
    left out of every split part (the split file itself is unchanged, so the other images keep their
    part), a warning lists them, and table.extra["skipped_images"] holds their (path, reason) pairs
    (see write_skipped). With --no-cache and no --skip-bad-images, a bad file stops the run when the
    loader meets it."""
    table = load_table(args.data, args.data_root, args.cache_dir, getattr(args, "group_col", None))
    split = get_split(table, args.split_file, args.split_seed, getattr(args, "train_size", None),
                      getattr(args, "resplit", False), getattr(args, "val_size", None))
    skip = bool(getattr(args, "skip_bad_images", False))
    bad = []
    if table.array is None:
        from pipeline.decoded_cache import cached_table, check_images  # (only for data sets of image files)
        rows = split[cache_part] if cache_part else np.arange(len(table))
        workers = getattr(args, "workers", 0)
        if getattr(args, "cache", True):
            table = cached_table(table, cache_size or args.img_size, args.cache_dir, rows=rows, workers=workers,
                                 skip_bad=skip)
            bad = table.extra["bad_images"]
        elif skip:
            bad = check_images(table, rows, workers)
        if bad and len(bad) == len(rows):
            raise UserError(f"--data-root {args.data_root}: none of the {len(rows)} images can be read (first: "
                            f"{bad[0][1]}: {bad[0][2]})")
        if bad:
            gone = np.asarray([r for r, _, _ in bad], dtype=np.int64)
            split = {k: v[~np.isin(v, gone)] for k, v in split.items()}
            if is_main():
                lines = [f"warning: --skip-bad-images: left out {len(bad)} of {len(rows)} images that cannot be "
                         "read:"] + [f"  {p}: {why}" for _, p, why in bad[:20]]
                if len(bad) > 20:
                    lines.append(f"  ... and {len(bad) - 20} more")
                print("\n".join(lines), file=sys.stderr)
    table.extra = {**table.extra, "skipped_images": [(p, why) for _, p, why in bad]}
    note_leaks(args, table, split)
    return table, split


def write_skipped(out_dir, table: ImageTable):
    """<out_dir>/skipped_images.txt, one "path<TAB>reason" line per image left out by
    --skip-bad-images (table.extra["skipped_images"] of load_data); nothing when none was."""
    skipped = table.extra.get("skipped_images") or []
    if skipped:
        atomic_write_text(Path(out_dir) / "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in skipped))
