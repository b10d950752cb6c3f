"""Data sets, splits and transforms shared by every script.

`load_table(name, root)` reads a data set in the layout its curators ship (or generates the
embedded synthetic one) into an `ImageTable`: sample ids, where each image lies, labels, class
names. `get_split` makes or reuses the saved train/val/test split, so CASS, DINO, supervised
training and every fine-tuning seed see the same images. `ImageDataset` turns rows of a table into
tensors through a torchvision transform; `cass_augment` and `eval_transform` are the paper's.
"""

import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from common import UserError, atomic_write_json, atomic_write_text, default_cache_dir, is_main, rank, world_size
from synthetic import ensure_synthetic, largest_remainder

DATA_NAMES = ("synthetic", "synthetic-multilabel", "isic2019", "brain-mri", "dermofit", "autoimmune",
              "folder", "csv", "medmnist")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test, Section 4.1


@dataclass
class ImageTable:
    """One data set: row i is image ids[i] with label labels[i].

    Images come either from files (`paths`) or from a uint8 array (`array`, N x H x W [x C]).
    Labels are int64 class indices (single-label) or a float32 N x L 0/1 matrix (multi-label).
    `curator_split` maps 'train'/'test' (and maybe 'val') to row indices when the data set ships
    its own split."""
    name: str
    ids: list
    labels: np.ndarray
    class_names: list
    multilabel: bool
    paths: list = None
    array: np.ndarray = None
    curator_split: dict = None
    root: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.ids)

    def fingerprint(self) -> str:
        h = hashlib.sha1(self.name.encode())
        for i in self.ids:
            h.update(i.encode() + b"\n")
        return h.hexdigest()[:10]

    def class_counts(self, rows=None) -> np.ndarray:
        y = self.labels if rows is None else self.labels[rows]
        if self.multilabel:
            return y.sum(0).astype(np.int64)
        return np.bincount(y, minlength=len(self.class_names))


# ---------------------------------------------------------------- reading images

def load_rgb(path) -> Image.Image:
    """Any image file as 8-bit RGB: grayscale is replicated, alpha is composited on black,
    16-bit and float images are stretched from their own min..max to 0..255.

    An unreadable file (corrupt, truncated, not an image) raises a one-line UserError that names it;
    the error's `path` and `reason` attributes hold the file and the reason alone."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = _read_error_reason(e)
        err = UserError(f"cannot read image {path}: {reason} (--skip-bad-images leaves unreadable images out)")
        err.path, err.reason = str(path), reason
        raise err from None


def _read_error_reason(e: Exception) -> str:
    """Why PIL could not read a file, in one line and without repeating the path."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image (unknown or damaged format)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    return text or type(e).__name__


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGB",):
        return im.copy()
    if im.mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    # 16-bit integer ("I;16", "I;16B", "I") and float ("F") single-channel images
    a = np.asarray(im, dtype=np.float64)
    if a.ndim == 3:
        a = a[..., :3]
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    a = a.round().astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a, "RGB")


def array_to_rgb(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.shape[-1] == 1:
        return Image.fromarray(a[..., 0], "L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB")


# ---------------------------------------------------------------- loaders

def _need_dir(root, flag="--data-root") -> Path:
    if root is None:
        raise UserError(f"{flag} is required for this data set")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder")
    return root


def _images_under(folder: Path, exclude_masks=False):
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and not p.name.startswith("."))
    if exclude_masks:
        files = [p for p in files if "mask" not in p.name.lower()]
    return files


def _class_folders(root: Path, exclude_masks=False):
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = _images_under(root / name, exclude_masks)
        paths += files
        labels += [c] * len(files)
    return classes, paths, labels


LAYOUTS = {  # what each file-based loader expects under --data-root, for the "no images" errors
    "folder": "one sub-folder per class holding the images: <root>/<class>/**/<image>",
    "dermofit": "one sub-folder per class, one per lesion in it: <root>/<class>/<lesion>/<image>",
    "brain-mri": "<root>/Training/<class>/<image> and <root>/Testing/<class>/<image>",
    "isic2019": "ISIC_2019_Training_GroundTruth.csv and ISIC_2019_Training_Input/<image>.jpg",
    "csv": "a CSV of image paths (relative to its folder) with a 'label' column or one 0/1 column per label",
    "autoimmune": "a CSV of image paths (relative to its folder) with one 0/1 column per cell type",
}


def _no_images(name, root, where=""):
    return UserError(f"--data-root {root}: no images found{where} (expected {LAYOUTS.get(name, 'image files')}; "
                     f"image files end in {', '.join(sorted(IMAGE_EXTS))})")


def _from_files(name, root, paths, labels, classes, multilabel=False, curator=None) -> ImageTable:
    if not paths:
        raise _no_images(name, root, f" for --data {name}")
    ids = [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in paths]
    labels = np.asarray(labels, dtype=np.float32 if multilabel else np.int64)
    return ImageTable(name, ids, labels, list(classes), multilabel, paths=[str(p) for p in paths],
                      curator_split=curator, root=str(root))


def load_folder(root, name="folder", exclude_masks=False) -> ImageTable:
    """A class-per-folder tree: root/<class>/**/<image>."""
    root = _need_dir(root)
    classes, paths, labels = _class_folders(root, exclude_masks)
    if not classes:
        loose = len(_images_under(root))
        raise _no_images(name, root, f" in class sub-folders, {loose} lie directly in it" if loose else "")
    return _from_files(name, root, paths, labels, classes)


def load_dermofit(root) -> ImageTable:
    """Dermofit: root/<class>/<lesion>/<image>, where the lesion folder also holds a *mask* image."""
    return load_folder(root, "dermofit", exclude_masks=True)


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
    import csv
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


def load_csv(root, name="csv", multilabel=None) -> ImageTable:
    """A CSV of image paths (relative to the CSV's folder) with either a `label` column
    (single-label, any class names) or one 0/1 column per label (multi-label)."""
    csv_path = _find_csv(root, name)
    columns, rows = _read_csv(csv_path)
    pcol = _path_column(csv_path, columns)
    others = [c for c in columns if c != pcol]
    base = csv_path.parent
    paths = [_resolve_image(base, r[pcol], csv_path) for r in rows]
    if "label" in others and multilabel is not True:
        names = sorted({r["label"] for r in rows})
        if "" in names:
            raise UserError(f"CSV {csv_path}: empty value in column 'label'")
        labels = [names.index(r["label"]) for r in rows]
        return _from_files(name, base, paths, labels, names)
    if not others:
        raise UserError(f"CSV {csv_path} has no label columns: add a 'label' column or one 0/1 column per label")
    if multilabel is False:
        raise UserError(f"CSV {csv_path} has no 'label' column")
    y = np.stack([_zero_one(csv_path, rows, c) for c in others], 1)
    return _from_files(name, base, paths, y, others, multilabel=True)


def load_autoimmune(root) -> ImageTable:
    """The autoimmune biopsy data: a CSV of path + one 0/1 column per cell type (multi-label)."""
    return load_csv(root, "autoimmune", multilabel=True)


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


def load_synthetic(cache_dir, multilabel) -> ImageTable:
    folder = ensure_synthetic(Path(cache_dir).expanduser(), multilabel=multilabel)
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    name = "synthetic-multilabel" if multilabel else "synthetic"
    ids = [f"{i:05d}" for i in range(len(images))]
    return ImageTable(name, ids, labels, meta["class_names"], multilabel, array=images, root=str(folder))


def load_table(name: str, root=None, cache_dir=None) -> ImageTable:
    """The data set called `name` (see DATA_NAMES), read from `root`; generated data lives in
    `cache_dir` (default: common.default_cache_dir(), $CASS_CACHE or ~/.cache/cass)."""
    cache_dir = cache_dir or default_cache_dir()
    loaders = {
        "synthetic": lambda: load_synthetic(cache_dir, False),
        "synthetic-multilabel": lambda: load_synthetic(cache_dir, True),
        "isic2019": lambda: load_isic2019(root),
        "brain-mri": lambda: load_brain_mri(root),
        "dermofit": lambda: load_dermofit(root),
        "autoimmune": lambda: load_autoimmune(root),
        "folder": lambda: load_folder(root),
        "csv": lambda: load_csv(root),
        "medmnist": lambda: load_medmnist(root),
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


def stratified_partition(strata: np.ndarray, fractions, seed: int):
    """Split positions 0..n-1 into len(fractions) parts, each stratum divided in the given
    proportions (largest remainder rounding), shuffled by `seed`.

    Written by hand rather than with scikit-learn's stratified splitters because those refuse
    classes with a single member, which small medical data sets do have."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    fractions = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    for s in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == s))
        take = largest_remainder(fractions * len(members), len(members))
        start = 0
        for j, k in enumerate(take):
            parts[j] += members[start:start + k].tolist()
            start += k
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def make_split(table: ImageTable, seed: int) -> dict:
    """Row indices of train/val/test: stratified 70/10/20, or the curator's split where the data set
    has one (validation then carved from the curator's training part, 1/8 of it to keep 70:10)."""
    cur = table.curator_split
    if cur and "val" in cur:
        return {k: np.asarray(cur[k]) for k in ("train", "val", "test")}
    if cur:
        train_rows = np.asarray(cur["train"])
        tr, va = stratified_partition(_strata(table, train_rows), (7, 1), seed)
        return {"train": train_rows[tr], "val": train_rows[va], "test": np.asarray(cur["test"])}
    rows = np.arange(len(table))
    tr, va, te = stratified_partition(_strata(table, rows), SPLIT_FRACTIONS, seed)
    return {"train": tr, "val": va, "test": te}


def default_split_file(table: ImageTable, seed: int) -> Path:
    return Path("runs") / "splits" / f"{table.name}-{table.fingerprint()}-seed{seed}.json"


def get_split(table: ImageTable, split_file=None, seed: int = 77) -> dict:
    """Load the saved split, or make and save it. Returns {'train'|'val'|'test': row indices}.

    The file is made under a lock (file_lock) and renamed into place when complete: processes that
    need the same split at once (run_all --jobs N) make it once, and never read a half-written one."""
    path = Path(split_file) if split_file else default_split_file(table, seed)
    if not path.exists():
        with file_lock(path):  # another process making the same split: wait, then read its file
            if not path.exists():
                split = make_split(table, seed)
                atomic_write_json(path, {"data": table.name, "root": table.root, "split_seed": seed,
                                         "fingerprint": table.fingerprint(),
                                         **{k: [table.ids[r] for r in v] for k, v in split.items()}})
                return split
    index = {i: r for r, i in enumerate(table.ids)}
    try:
        saved = json.loads(path.read_text())
        parts = {k: saved[k] for k in ("train", "val", "test")}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--split-file {path} is not a split file (JSON with train/val/test id lists)")
    missing = [i for ids in parts.values() for i in ids if i not in index]
    if missing:
        raise UserError(f"--split-file {path} lists {len(missing)} ids not in the data set (first: "
                        f"{missing[0]}); it belongs to other data: delete it to make a new split")
    return {k: np.asarray([index[i] for i in ids], dtype=np.int64) for k, ids in parts.items()}


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (the hidden file .<name>.lock beside it) for the block; other
    processes asking for it wait. Used around "is it there? else make it and rename it into place"."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------- transforms

def cass_augment(img_size: int, extra=(), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The single view CASS feeds to both arms (Appendix C.5.2, as in the authors' code).

    Note RandomPerspective keeps torchvision's own p=0.5 inside its RandomApply(p=0.3), as in
    the authors' chain. `extra` adds the Table 9 ablations: 'blur' (Gaussian blur, p=0.5,
    sigma 0.1-2, BYOL's kernel of 10% of the image) and 'solarize' (threshold 0.5, p=0.2)."""
    unknown = set(extra) - {"blur", "solarize"}
    if unknown:
        raise UserError(f"--extra-aug: unknown augmentation(s) {sorted(unknown)} (choose blur, solarize)")
    ops = [
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2), T.RandomPerspective(0.2)], p=0.3),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.2), T.RandomAffine(10)], p=0.3),
        T.RandomVerticalFlip(0.3),
        T.RandomHorizontalFlip(0.3),
    ]
    if "blur" in extra:
        k = max(3, int(0.1 * img_size) // 2 * 2 + 1)
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    if "solarize" in extra:
        ops.append(T.RandomSolarize(128, p=0.2))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return T.Compose([
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(), T.Normalize(mean, std)])


# ---------------------------------------------------------------- torch side

class ImageDataset(torch.utils.data.Dataset):
    """Rows `rows` of `table` as (transform(image), label, row).

    The transform may return a tensor or a list of tensors (multi-crop)."""

    def __init__(self, table: ImageTable, rows, transform):
        self.table, self.rows, self.transform = table, np.asarray(rows, dtype=np.int64), transform

    def __len__(self):
        return len(self.rows)

    def image(self, row: int) -> Image.Image:
        """The row's image; from the decoded cache, with info["source_size"] = the (height, width) of
        the file it was resized from."""
        t = self.table
        if t.array is None:
            return load_rgb(t.paths[row])
        img = array_to_rgb(np.asarray(t.array[row]))
        if "source_sizes" in t.extra:
            img.info["source_size"] = tuple(int(v) for v in t.extra["source_sizes"][row])
        return img

    def __getitem__(self, key):
        """key: a position i, or (epoch_seed, i) from EpochSampler: the transform's random draws then
        come from item_seed(epoch_seed, row) alone (see seeded_rngs)."""
        epoch_seed, i = key if isinstance(key, tuple) else (None, key)
        row = int(self.rows[i])
        label = torch.as_tensor(self.table.labels[row])
        if epoch_seed is None:
            return self.transform(self.image(row)), label, row
        with seeded_rngs(item_seed(epoch_seed, row)):
            return self.transform(self.image(row)), label, row


def item_seed(epoch_seed: int, row: int) -> int:
    """The seed of one image's augmentation in one epoch (a splitmix64 mix of the two numbers).

    It depends on the image's row, not on its position in the batch, the data loader worker or the
    process that loads it: the same epoch gives the same views with 0 or 8 workers, 1 or 4 processes,
    on the CPU path or (its own random numbers) the GPU one."""
    z = (int(epoch_seed) * 0x9E3779B97F4A7C15 + int(row) + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # 63 bits: a valid torch seed


class seeded_rngs:
    """Seed the CPU random generators the transforms use (torch's default CPU generator, `random`,
    numpy's global one) for one item. In the main process (workers=0) their previous states are
    restored afterwards, so the training loop's own random stream is not disturbed; CUDA generators
    are never touched."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = None
        if torch.utils.data.get_worker_info() is None:
            self.saved = (torch.default_generator.get_state(), random.getstate(), np.random.get_state())
        torch.default_generator.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc):
        if self.saved is not None:
            torch.default_generator.set_state(self.saved[0])
            random.setstate(self.saved[1])
            np.random.set_state(self.saved[2])
        return False


class EpochSampler(torch.utils.data.Sampler):
    """The order of one epoch: a permutation of 0..n-1 drawn from the epoch seed (shuffle), or 0..n-1.

    shard=True under torch.distributed: process `rank` takes every world-th item of that order,
    padded by wrapping around so every process gets ceil(n / world) items (as DistributedSampler),
    or, with drop_multiple=B (a loader dropping its last incomplete batch, B the global batch),
    first cut to a multiple of B; the processes' batches k together are then exactly the
    single-process batch k of the global batch size, and every process has as many batches. With an epoch seed it yields (epoch_seed, i) pairs, so ImageDataset seeds each
    item's augmentation from (epoch seed, row); without, plain positions."""

    def __init__(self, n: int, shuffle: bool, shard: bool = False, drop_multiple: int = None):
        self.n, self.shuffle, self.epoch_seed, self.drop_multiple, self.start = n, shuffle, None, drop_multiple, 0
        self.rank, self.world = (rank(), world_size()) if shard else (0, 1)

    def set_epoch_seed(self, seed, start: int = 0):
        """Seed of the coming epoch; start > 0 leaves out the first `start` items of this process's
        order (an epoch resumed in the middle: the remaining items are the same as without the stop)."""
        self.epoch_seed = None if seed is None else int(seed)
        self.start = int(start)

    def _total(self):
        if self.world > 1 and self.drop_multiple:
            return self.n - self.n % self.drop_multiple
        return self.n

    def _per_process(self):
        return -(-self._total() // self.world)

    def __len__(self):
        return max(0, self._per_process() - self.start)

    def __iter__(self):
        s = self.epoch_seed
        if self.shuffle:
            if s is None:  # no generator given: a fresh seed from torch's global generator, as DataLoader
                s = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(s))
        else:
            order = torch.arange(self.n)
        if self.world > 1:
            order = order[:self._total()]
            pad = self._per_process() * self.world - len(order)
            order = torch.cat([order, order[:pad]])[self.rank::self.world]
        order = order[self.start:]
        if s is None:
            yield from order.tolist()
        else:
            for i in order.tolist():
                yield (s, i)


_LOADERS = {}  # persistent data loaders (workers > 0), reused by every epoch's make_loader call


def _ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT / SIGTERM to the main process, which saves a checkpoint and then
    shuts them down (a terminal's Ctrl-C, and a scheduler's SIGTERM, reach every process of the job;
    a worker that died of it would make the main process fail before its checkpoint is written)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _close_loaders():
    """Stop every loader's worker processes at exit. Registered (below) after multiprocessing's own
    exit handler, so it runs first: that one ends workers with SIGTERM, which ours ignore."""
    for loader in list(_WORKER_LOADERS):
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # asks each worker to finish, waits, then terminates
            for w in getattr(it, "_workers", []):
                if w.is_alive():
                    w.kill()
    _LOADERS.clear()


_WORKER_LOADERS = weakref.WeakSet()  # every loader with worker processes, for _close_loaders
atexit.register(_close_loaders)


def make_loader(dataset, bs, *, shuffle, workers, drop_last=False, generator=None, device=None, shard=False,
                skip_batches=0):
    """A DataLoader over `dataset` for one epoch.

    generator: the epoch's generator (common.seed_epoch); its seed fixes the order and every item's
    augmentation (EpochSampler, item_seed). shard=True: under torch.distributed this process loads
    its share only, and `bs` is the GLOBAL batch (each of the world processes gets bs // world).
    With workers > 0 the loader and its worker processes persist: a later call with the same
    dataset and settings returns the same loader, only re-seeded. Memory is pinned on CUDA.
    skip_batches: leave out the epoch's first batches (resuming in the middle of an epoch)."""
    world = world_size() if shard else 1
    if bs % world:
        raise UserError(f"--bs {bs} is the global batch: it must be divisible by the number of "
                        f"processes ({world})")
    pin = device is not None and device.type == "cuda"
    key = (id(dataset), bs, shuffle, workers, drop_last, pin, shard)
    cached = _LOADERS.get(key) if workers > 0 else None
    if cached is not None and cached[0] is dataset:
        loader = cached[1]
    else:
        sampler = EpochSampler(len(dataset), shuffle, shard, bs if drop_last else None)
        loader = torch.utils.data.DataLoader(  # its own generator: the global random stream is not drawn from
            dataset, batch_size=bs // world, sampler=sampler, num_workers=workers, drop_last=drop_last,
            pin_memory=pin, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
            worker_init_fn=_ignore_stop_signals if workers > 0 else None)
        if workers > 0:
            _LOADERS[key] = (dataset, loader)
            _WORKER_LOADERS.add(loader)
    loader.sampler.set_epoch_seed(generator.initial_seed() if generator is not None else None,
                                  start=skip_batches * (bs // world))
    return loader


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
    table = load_table(args.data, args.data_root, args.cache_dir)
    split = get_split(table, args.split_file, args.split_seed)
    skip = bool(getattr(args, "skip_bad_images", False))
    bad = []
    if table.array is None:
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
    return table, split


def write_skipped(out_dir, table: ImageTable):
    """<out_dir>/skipped_images.txt, one "path<TAB>reason" line per image left out by
    --skip-bad-images (table.extra["skipped_images"] of load_data); nothing when none was."""
    skipped = table.extra.get("skipped_images") or []
    if skipped:
        atomic_write_text(Path(out_dir) / "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in skipped))


def bad_images_error(bad, n_checked) -> UserError:
    """The one-line error for unreadable images found before training: bad = [(row, path, reason)]."""
    _, path, why = bad[0]
    what = "1 image" if len(bad) == 1 else f"{len(bad)} images"
    return UserError(f"{what} of {n_checked} cannot be read (first: {path}: {why}); "
                     "pass --skip-bad-images to leave them out")


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded


# ---------------------------------------------------------------- DINO multi-crop (the baseline)

from PIL import ImageFilter, ImageOps  # noqa: E402  (kept with the section that uses it)


class PILGaussianBlur:
    """Official DINO's blur: with probability p, a PIL Gaussian blur of radius uniform in [0.1, 2] px."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.p:  # official: `do_it = random.random() <= p`
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class PILSolarize:
    """Official DINO's solarisation: with probability p, invert the pixels of value >= 128."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class SourceCrop:
    """torchvision's RandomResizedCrop drawn in the geometry of the image's source file.

    The decoded cache stretches every image to a square; a crop drawn on that square would have
    another aspect ratio than the same crop drawn on the file (a 600 x 450 image: 4:3 squeezed to
    1:1). SourceCrop draws (top, left, height, width) with RandomResizedCrop.get_params on the source
    size (img.info["source_size"], else the image's own size), maps that box onto the image (to
    whole pixels: at most half a pixel off) and resizes it to size x size. On an image that is its own
    source this is torchvision's RandomResizedCrop: the same random draws and the same pixels."""

    def __init__(self, size: int, scale, interpolation=T.InterpolationMode.BICUBIC):
        self.size, self.scale, self.interpolation = size, tuple(scale), interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        h0, w0 = img.info.get("source_size", (img.height, img.width))
        shape_only = torch.empty(1, 1, 1).expand(1, h0, w0)  # get_params reads only the size
        top, left, h, w = T.RandomResizedCrop.get_params(shape_only, self.scale, (3 / 4, 4 / 3))
        sy, sx = img.height / h0, img.width / w0
        y0, x0 = round(top * sy), round(left * sx)
        y1, x1 = max(y0 + 1, round((top + h) * sy)), max(x0 + 1, round((left + w) * sx))
        return TF.resized_crop(img, y0, x0, y1 - y0, x1 - x0, [self.size, self.size], self.interpolation,
                               antialias=True)


class DinoMultiCrop:
    """The multi-crop augmentation of official DINO (facebookresearch/dino, DataAugmentationDINO).

    Returns a list of 2 + n_local tensors: two global crops of `global_size` px (RandomResizedCrop,
    scale `global_scale`, bicubic; as SourceCrop, so crops of a cached image keep the file's aspect
    ratio), then `n_local` local crops of `local_size` px (scale
    `local_scale`). Every crop: horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
    grayscale p=0.2. Gaussian blur p=1.0 on global crop 1; blur p=0.1 and solarise p=0.2 on global
    crop 2; blur p=0.5 on the local crops. Then ToTensor and normalisation (ImageNet by default)."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        for name, (lo, hi) in (("global", global_scale), ("local", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise UserError(f"--{name}-scale {lo} {hi}: expected 0 < min <= max <= 1")
        if global_size < 1 or local_size < 1 or n_local < 0:
            raise UserError("crop sizes must be positive and the number of local crops >= 0")
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.global1 = T.Compose([
            SourceCrop(global_size, global_scale), flip_and_color_jitter, PILGaussianBlur(1.0), normalize])
        self.global2 = T.Compose([
            SourceCrop(global_size, global_scale), flip_and_color_jitter, PILGaussianBlur(0.1), PILSolarize(0.2),
            normalize])
        self.local = T.Compose([
            SourceCrop(local_size, local_scale), flip_and_color_jitter, PILGaussianBlur(0.5), normalize])
        self.n_local = n_local

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


# ---------------------------------------------------------------- decoded-image cache

# bump when the decoding below changes: old caches are then never reused. 2: unreadable files no longer stop
# the build; their rows stay zero and the marker lists them ("bad"), so code of version 1, which would take
# those zeros for black images, must not find these files. 3: the marker holds each source image's size
# ("sizes"), from which DINO's crops keep the original aspect ratio.
CACHE_VERSION = 3


class MappedArray:
    """A read-only (N, S, S, 3) uint8 array in a .npy file, memory-mapped on first use.

    `index` maps a table row to its position in the file (-1: not cached). Pickles as its path
    (never its contents), so data loader workers under any start method map the file themselves."""

    def __init__(self, path, index=None):
        self.path, self.index, self._a = str(path), index, None
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read(f)
        self.ndim = len(self.shape)

    def _arr(self):
        if self._a is None:
            self._a = np.load(self.path, mmap_mode="r")
        return self._a

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, row):
        if self.index is not None:
            pos = int(self.index[row])
            if pos < 0:
                raise IndexError(f"row {row} is not in the decoded-image cache {self.path}")
            row = pos
        return self._arr()[row]

    def __getstate__(self):
        return {"path": self.path, "index": self.index, "shape": self.shape, "dtype": self.dtype,
                "ndim": self.ndim, "_a": None}


def decode_resized(path, size: int, source_size: list = None) -> np.ndarray:
    """One image file as uint8 (size, size, 3): load_rgb, then exactly the Resize((size, size))
    that cass_augment and eval_transform begin with (PIL bilinear, antialiased), so those transforms
    give bit-identical results on the cached image (their Resize is then the identity). The decoded
    image's (height, width) is appended to `source_size` when given."""
    img = load_rgb(path)
    if source_size is not None:
        source_size.append((img.height, img.width))
    img = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)(img)
    return np.asarray(img, dtype=np.uint8)


def cache_fingerprint(table: ImageTable, size: int, rows) -> str:
    """Hash of what the cached array depends on: the decoder version, the size and, for every
    cached row, its file's path, byte size and modification time (changed files: a new cache)."""
    h = hashlib.sha1(f"v{CACHE_VERSION} {table.name} {size}\n".encode())
    for r in rows:
        p = table.paths[r]
        try:
            st = os.stat(p)
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e.strerror}") from None
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode_chunk(job, on_item=None):
    """Worker of _decode_all: fully decode each (key, path) of a chunk. With `tmp` (the cache's
    temporary .npy file) the resized image goes to position `key` of it; without, the file is only
    read (check_images). on_item() is called after each file. Returns (number done, [(key, path,
    reason)] of the files that cannot be read: their positions stay zero, {key: (height, width)} of
    the source images read into the cache)."""
    tmp, items, size = job
    out = np.load(tmp, mmap_mode="r+") if tmp else None
    bad, sizes = [], {}
    for key, p in items:
        try:
            if out is None:
                load_rgb(p)
            else:
                hw = []
                out[key] = decode_resized(p, size, hw)
                sizes[key] = hw[0]
        except UserError as e:
            bad.append((key, str(p), getattr(e, "reason", str(e))))
        if on_item is not None:
            on_item()
    if out is not None:
        out.flush()
    return len(items), bad, sizes


def _decode_all(tmp, items, size, workers, desc, progress) -> list:
    """_decode_chunk over every (key, path) of `items`, in `workers` forked processes (in this one
    for few items or workers=0), with a progress bar; returns (the sorted [(key, path, reason)] of
    the files that cannot be read, {key: (height, width)} of the source images read into `tmp`)."""
    from tqdm import tqdm
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress or None, dynamic_ncols=True)
    if workers > 0 and len(items) > 64:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        chunk = max(16, min(256, len(items) // (workers * 8) or 1))
        jobs = [(tmp, items[a:a + chunk], size) for a in range(0, len(items), chunk)]
        bad, sizes = [], {}
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            for k, b, hw in ex.map(_decode_chunk, jobs):
                bad += b
                sizes.update(hw)
                bar.update(k)
    else:
        _, bad, sizes = _decode_chunk((tmp, items, size), on_item=lambda: bar.update(1))
    bar.close()
    return sorted(bad), sizes


def check_images(table: ImageTable, rows=None, workers: int = 0, progress: bool = True) -> list:
    """Decode every image file of `rows` (default all) once, as the loader would (load_rgb), with
    `workers` processes; returns [(row, path, reason)] of those that cannot be read, in row order.
    Used by --no-cache --skip-bad-images (the cache build finds them itself). Arrays: nothing to check."""
    if table.array is not None or not table.paths:
        return []
    rows = np.arange(len(table)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    return _decode_all(None, [(int(r), table.paths[r]) for r in rows], None, workers, "checking images", progress)[0]


def cached_table(table: ImageTable, size: int, cache_dir=None, rows=None, workers: int = 0,
                 progress: bool = True, skip_bad: bool = False) -> ImageTable:
    """`table` with `array` set to its images decoded and resized to (size, size) once, kept in
    <cache_dir>/decoded/<name>-<size>px-<n>-<fingerprint>.npy (memory-mapped, uint8 N x S x S x 3).

    rows: the table rows to cache (default all). The file is built under a lock (a second process
    waits for the first), written to a temporary file, fsynced, renamed into place, then marked
    complete by <...>.done.json: a crash never leaves a file that looks finished. A source file
    that changes (size or modification time) changes the fingerprint, so the cache is rebuilt.
    Tables already held in arrays (synthetic, medmnist) are returned unchanged.

    Files that cannot be read (corrupt, truncated, not an image) do not stop the build: their rows are
    listed in the marker, so a later run knows them without decoding again. Then, unless skip_bad,
    a one-line UserError names the first; with skip_bad the table is returned with those rows out of
    the cache (reading one raises IndexError, never a black image) and listed as (row, path, reason)
    in extra["bad_images"] (empty when every file was read), for the caller to leave them out.
    extra["source_sizes"] holds each cached row's source image (height, width), which the cached
    square stretches: DinoMultiCrop cuts its crops in the source's geometry (see SourceCrop)."""
    if table.array is not None or not table.paths:
        return table
    import fcntl
    rows = np.arange(len(table)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    cache_dir = Path(cache_dir or default_cache_dir()).expanduser()
    folder = cache_dir / "decoded"
    fp = cache_fingerprint(table, size, rows)
    stem = f"{table.name}-{size}px-{len(rows)}-{fp}"
    path, done = folder / f"{stem}.npy", folder / f"{stem}.done.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker = _read_marker(path, done, fp)
        if marker is None:
            with open(folder / f".{stem}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same cache: wait for it
                marker = _read_marker(path, done, fp)
                if marker is None:
                    marker = _build_cache(table, rows, size, path, done, fp, workers, progress)
    except OSError as e:
        raise UserError(f"decoded-image cache {folder}: {e} (choose another --cache-dir, or --no-cache)") from None
    bad = sorted((int(rows[b["pos"]]), b["path"], b["reason"]) for b in marker.get("bad", []))
    if bad and not skip_bad:
        raise bad_images_error(bad, len(rows))
    source_sizes = np.zeros((len(table), 2), dtype=np.int64)  # (height, width) of each cached row's file
    source_sizes[rows] = np.asarray(marker["sizes"], dtype=np.int64).reshape(-1, 2)
    index = None
    if bad or len(rows) != len(table) or not np.array_equal(rows, np.arange(len(table))):
        index = np.full(len(table), -1, dtype=np.int64)
        index[rows] = np.arange(len(rows))
        index[[r for r, _, _ in bad]] = -1  # zeros in the file: never read as an image
    return dataclasses.replace(table, array=MappedArray(path, index),
                               extra={**table.extra, "decoded_cache": str(path), "cache_size": size,
                                      "bad_images": bad, "source_sizes": source_sizes})


def _read_marker(path: Path, done: Path, fp: str):
    """The completion marker of a finished cache of fingerprint `fp`, or None (no such finished cache)."""
    try:
        marker = json.loads(done.read_text())
        if path.is_file() and isinstance(marker, dict) and marker.get("fingerprint") == fp:
            return marker
    except (OSError, json.JSONDecodeError):
        pass
    return None


def _build_cache(table, rows, size, path, done, fp, workers, progress) -> dict:
    """Decode `rows` into the cache file and write its marker (returned). Unreadable files leave zeros
    and are listed in the marker's "bad" as {pos (in the file), row (in the table), path, reason}."""
    import shutil
    n = len(rows)
    nbytes = n * size * size * 3
    free = shutil.disk_usage(path.parent).free
    if free < nbytes * 1.05 + (64 << 20):
        raise UserError(f"decoded-image cache: {nbytes / 2**30:.1f} GiB needed in {path.parent}, only "
                        f"{free / 2**30:.1f} GiB free (use --cache-dir elsewhere, or --no-cache)")
    print(f"decoding {n} images of {table.name} once into {path} ({nbytes / 2**30:.2f} GiB, {size}x{size})",
          file=sys.stderr)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    _readable(tmp)
    t0 = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        out.flush()
        del out  # the decoding writes through its own memory maps (in worker processes or here)
        bad, sizes = _decode_all(tmp, [(pos, table.paths[r]) for pos, r in enumerate(rows)], size, workers,
                                 "decoding", progress)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    marker = {"fingerprint": fp, "data": table.name, "root": table.root, "size": size, "n": n,
              "version": CACHE_VERSION, "seconds": round(time.perf_counter() - t0, 2),
              "bad": [{"pos": int(pos), "row": int(rows[pos]), "path": p, "reason": why} for pos, p, why in bad],
              "sizes": [list(sizes.get(pos, (0, 0))) for pos in range(n)]}  # source (height, width); 0: unreadable
    _write_marker(done, marker)
    return marker


def _write_marker(path: Path, obj):
    """The completion marker, written atomically by whichever process built the cache (not only
    rank 0 of a distributed run, unlike common's atomic writers)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    _readable(tmp)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _readable(path):
    """mkstemp makes files private (0600); a cache is as readable as the umask allows (usually 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def dino_cache_size(global_size: int, local_size: int, global_scale, local_scale) -> int:
    """Cache size for DINO, whose RandomResizedCrop works on the cached image: large enough that
    the smallest crops of either kind are not enlarged, i.e. max(global / sqrt(min global scale),
    local / sqrt(min local scale)), rounded up to a multiple of 32 (448 px at the official
    224 / 96 px, scales 0.4 / 0.05). The cached image is square: like CASS's Resize((s, s)), a
    600 x 450 image is stretched to a square first, which shifts the crops' aspect ratios."""
    need = max(global_size / math.sqrt(global_scale[0]), local_size / math.sqrt(local_scale[0]))
    return int(math.ceil(need / 32) * 32)
