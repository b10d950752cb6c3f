"""The data sets' own layouts beyond a class-per-folder tree, imported by datasets.load_table only
for them: brain MRI (the curator's Training/ and Testing/ folders), a CSV of image paths and labels
(`--data csv`, the autoimmune biopsy data), ISIC 2019 (its ground-truth CSV), HAM10000 (its metadata
CSV, images in one folder or the two official part folders), PBC (class folders) and MedMNIST (.npz)."""

import csv
from pathlib import Path

import numpy as np

from pipeline.table import IMAGE_EXTS, ImageTable, _class_folders, _from_files, _need_dir, is_junk, load_folder
from runtime.errors import UserError


def load_brain_mri(root) -> ImageTable:
    """Brain tumour MRI: root/Training/<class>/*.jpg and root/Testing/<class>/*.jpg (the curator's split)."""
    root = _need_dir(root)
    parts = {}
    for part in ("Training", "Testing"):
        d = root / part
        if not d.is_dir():
            raise UserError(f"--data-root {root}: missing folder {part}/ (expected Training/ and Testing/ "
                            "with one sub-folder per class)")
        parts[part] = _class_folders(d)
    classes = parts["Training"][0]
    if parts["Testing"][0] != classes:
        raise UserError(f"--data-root {root}: Training/ and Testing/ have different class folders "
                        f"({classes} vs {parts['Testing'][0]})")
    paths = parts["Training"][1] + parts["Testing"][1]
    labels = parts["Training"][2] + parts["Testing"][2]
    n_train = len(parts["Training"][1])
    curator = {"train": np.arange(n_train), "test": np.arange(n_train, len(paths))}
    return _from_files("brain-mri", root, paths, labels, classes, curator=curator)


def _read_csv(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read CSV {path}: {e}") from None
    if not rows:
        raise UserError(f"CSV {path} has no rows")
    return [c.strip() for c in rows[0].keys()], [{k.strip(): (v or "").strip() for k, v in r.items()
                                                  if k is not None} for r in rows]


PATH_COLUMNS = ("path", "image", "file", "filename", "image_path", "img", "id")


def _path_column(csv_path, columns):
    for c in columns:
        if c.lower() in PATH_COLUMNS:
            return c
    raise UserError(f"CSV {csv_path} has no image path column (one of: {', '.join(PATH_COLUMNS)}); "
                    f"its columns are {columns}")


def _resolve_image(base: Path, value: str, csv_path, image_dir: Path = None):
    candidates = [Path(value)] if Path(value).is_absolute() else [base / value]
    if image_dir is not None:
        candidates.append(image_dir / value)
    if not Path(value).suffix:
        candidates += [c.with_name(c.name + ext) for c in list(candidates) for ext in (".jpg", ".png", ".tif")]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"CSV {csv_path}: image '{value}' not found (looked for {candidates[0]})")


def _zero_one(csv_path, rows, col):
    vals = []
    for i, r in enumerate(rows):
        try:
            v = float(r[col])
        except ValueError:
            v = None
        if v not in (0.0, 1.0):
            raise UserError(f"CSV {csv_path}: column '{col}' row {i + 2} is '{r[col]}', expected 0 or 1")
        vals.append(v)
    return vals


def _find_csv(root, name):
    root = Path(root).expanduser() if root else None
    if root is None:
        raise UserError("--data-root is required for this data set (a CSV file or a folder holding one)")
    if root.is_file():
        return root
    if root.is_dir():
        csvs = sorted(root.glob("*.csv"))
        if len(csvs) == 1:
            return csvs[0]
        raise UserError(f"--data-root {root}: expected exactly one .csv file, found {len(csvs)}; "
                        "pass the CSV file itself")
    raise UserError(f"--data-root {root}: no such file or folder")


def _group_values(csv_path, columns, rows, group_col):
    if group_col is None:
        return None
    if group_col not in columns:
        raise UserError(f"--group-col {group_col}: CSV {csv_path} has no such column; its columns are {columns}")
    empty = [i for i, r in enumerate(rows) if not r[group_col]]
    if empty:
        raise UserError(f"--group-col {group_col}: CSV {csv_path} row {empty[0] + 2} has no value in it")
    return [r[group_col] for r in rows]


def load_csv(root, name="csv", multilabel=None, group_col=None) -> ImageTable:
    """A CSV of image paths (relative to the CSV's folder) with either a `label` column
    (single-label, any class names) or one 0/1 column per label (multi-label). `group_col` names a
    column (e.g. a patient id) whose images must stay in one split part; it is not a label."""
    csv_path = _find_csv(root, name)
    columns, rows = _read_csv(csv_path)
    pcol = _path_column(csv_path, columns)
    groups = _group_values(csv_path, columns, rows, group_col)
    others = [c for c in columns if c not in (pcol, group_col)]
    base = csv_path.parent
    paths = [_resolve_image(base, r[pcol], csv_path) for r in rows]
    if "label" in others and multilabel is not True:
        names = sorted({r["label"] for r in rows})
        if "" in names:
            raise UserError(f"CSV {csv_path}: empty value in column 'label'")
        labels = [names.index(r["label"]) for r in rows]
        table = _from_files(name, base, paths, labels, names)
    else:
        if not others:
            raise UserError(f"CSV {csv_path} has no label columns: add a 'label' column or one 0/1 column per label")
        if multilabel is False:
            raise UserError(f"CSV {csv_path} has no 'label' column")
        y = np.stack([_zero_one(csv_path, rows, c) for c in others], 1)
        table = _from_files(name, base, paths, y, others, multilabel=True)
    table.groups = groups
    return table


def load_autoimmune(root, group_col=None) -> ImageTable:
    """The autoimmune biopsy data: a CSV of path + one 0/1 column per cell type (multi-label)."""
    return load_csv(root, "autoimmune", multilabel=True, group_col=group_col)


HAM_COLUMNS = ("lesion_id", "image_id", "dx")


def load_ham10000(root) -> ImageTable:
    """HAM10000: HAM10000_metadata.csv (lesion_id, image_id, dx, ...) and <image_id>.jpg anywhere under
    the root (the official HAM10000_images_part_1/ and _part_2/, or one folder). Labels from dx
    (sorted names); table.groups = lesion_id, so a lesion's images stay in one split part."""
    root = _need_dir(root)
    metas = sorted(p for p in root.glob("*.csv") if "metadata" in p.name.lower())
    if not metas:
        raise UserError(f"--data-root {root}: no HAM10000_metadata.csv found (expected the metadata CSV with "
                        "columns lesion_id, image_id, dx beside the image folders)")
    csv_path = metas[0]
    columns, rows = _read_csv(csv_path)
    missing = [c for c in HAM_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"CSV {csv_path} has no column {', '.join(repr(c) for c in missing)}; its columns are "
                        f"{columns}")
    files = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and not is_junk(p.relative_to(root)) and p.is_file():
            files.setdefault(p.stem, p)
    paths = []
    for i, r in enumerate(rows):
        if not r["image_id"] or not r["dx"] or not r["lesion_id"]:
            raise UserError(f"CSV {csv_path} row {i + 2}: empty lesion_id, image_id or dx")
        if r["image_id"] not in files:
            raise UserError(f"CSV {csv_path} row {i + 2}: image_id {r['image_id']} has no image file under {root} "
                            "(looked for <image_id>.jpg in every sub-folder)")
        paths.append(files[r["image_id"]])
    names = sorted({r["dx"] for r in rows})
    table = _from_files("ham10000", root, paths, [names.index(r["dx"]) for r in rows], names)
    table.groups = [r["lesion_id"] for r in rows]
    return table


def load_pbc(root) -> ImageTable:
    """PBC (peripheral blood cells): one folder per class, either directly under the root or in the
    download's PBC_dataset_normal_DIB/ folder. Junk (hidden files such as neutrophil/.DS_169665.jpg)
    is skipped like in every layout."""
    root = _need_dir(root)
    inner = root / "PBC_dataset_normal_DIB"
    return load_folder(inner if inner.is_dir() else root, "pbc")


def load_isic2019(root) -> ImageTable:
    """ISIC 2019: ISIC_2019_Training_GroundTruth.csv (image + one-hot class columns) and
    ISIC_2019_Training_Input/<image>.jpg. The UNK column, empty in training, is dropped."""
    root = _need_dir(root)
    gts = sorted(root.glob("*GroundTruth*.csv"))
    if not gts:
        raise UserError(f"--data-root {root}: no ISIC_2019_Training_GroundTruth.csv found")
    csv_path = gts[0]
    columns, rows = _read_csv(csv_path)
    if "image" not in columns:
        raise UserError(f"CSV {csv_path} has no 'image' column; its columns are {columns}")
    classes = [c for c in columns if c != "image"]
    y = np.stack([_zero_one(csv_path, rows, c) for c in classes], 1)
    keep = [j for j, c in enumerate(classes) if not (c == "UNK" and y[:, j].sum() == 0)]
    classes, y = [classes[j] for j in keep], y[:, keep]
    bad = np.flatnonzero(y.sum(1) != 1)
    if len(bad):
        raise UserError(f"CSV {csv_path}: row {bad[0] + 2} ({rows[bad[0]]['image']}) does not have exactly "
                        "one class set")
    image_dir = next((d for d in (root / "ISIC_2019_Training_Input",) if d.is_dir()), root)
    paths = [_resolve_image(image_dir, r["image"] if r["image"].lower().endswith(".jpg") else r["image"] + ".jpg",
                            csv_path) for r in rows]
    return _from_files("isic2019", root, paths, y.argmax(1), classes)


def load_medmnist(root) -> ImageTable:
    """A MedMNIST .npz: {train,val,test}_{images,labels}; labels (N, 1) single-label or (N, L) multi-label."""
    if root is None:
        raise UserError("--data-root is required for medmnist (the .npz file)")
    path = Path(root).expanduser()
    if not path.is_file():
        raise UserError(f"--data-root {path}: no such .npz file")
    try:
        z = np.load(path)
        parts = {p: (z[f"{p}_images"], z[f"{p}_labels"]) for p in ("train", "val", "test")}
    except KeyError as e:
        raise UserError(f"{path}: missing array {e} (expected train/val/test _images and _labels)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    images = np.concatenate([parts[p][0] for p in parts])
    labels = np.concatenate([parts[p][1] for p in parts])
    multilabel = labels.ndim == 2 and labels.shape[1] > 1
    if multilabel:
        labels = labels.astype(np.float32)
        classes = [str(i) for i in range(labels.shape[1])]
    else:
        labels = labels.reshape(-1).astype(np.int64)
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    ids, curator, start = [], {}, 0
    for p, (im, _) in parts.items():
        ids += [f"{p}/{i:06d}" for i in range(len(im))]
        curator[p] = np.arange(start, start + len(im))
        start += len(im)
    return ImageTable("medmnist", ids, labels, classes, multilabel, array=images, curator_split=curator,
                      root=str(path))
