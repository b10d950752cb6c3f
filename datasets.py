"""Data sets, splits and transforms shared by every script.

`load_table(name, root)` reads a data set in the layout its curators ship (or generates the
embedded synthetic one) into an `ImageTable`: sample ids, where each image lies, labels, class
names. `get_split` makes or reuses the saved train/val/test split, so CASS, DINO, supervised
training and every fine-tuning seed see the same images. `ImageDataset` turns rows of a table into
tensors through a torchvision transform; `cass_augment` and `eval_transform` are the paper's.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torchvision import transforms as T

from common import UserError, atomic_write_json

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
    16-bit and float images are stretched from their own min..max to 0..255."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


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


def _from_files(name, root, paths, labels, classes, multilabel=False, curator=None) -> ImageTable:
    if not paths:
        raise UserError(f"--data-root {root}: no images found for --data {name}")
    ids = [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else str(p) for p in paths]
    labels = np.asarray(labels, dtype=np.float32 if multilabel else np.int64)
    return ImageTable(name, ids, labels, list(classes), multilabel, paths=[str(p) for p in paths],
                      curator_split=curator, root=str(root))


def load_folder(root, name="folder", exclude_masks=False) -> ImageTable:
    """A class-per-folder tree: root/<class>/**/<image>."""
    root = _need_dir(root)
    classes, paths, labels = _class_folders(root, exclude_masks)
    if not classes:
        raise UserError(f"--data-root {root}: expected one sub-folder per class, found none")
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
    from synthetic import ensure_synthetic
    folder = ensure_synthetic(Path(cache_dir).expanduser(), multilabel=multilabel)
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    name = "synthetic-multilabel" if multilabel else "synthetic"
    ids = [f"{i:05d}" for i in range(len(images))]
    return ImageTable(name, ids, labels, meta["class_names"], multilabel, array=images, root=str(folder))


def load_table(name: str, root=None, cache_dir=None) -> ImageTable:
    """The data set called `name` (see DATA_NAMES), read from `root`; generated data lives in
    `cache_dir` (default: $CASS_CACHE or ~/.cache/cass)."""
    cache_dir = cache_dir or os.environ.get("CASS_CACHE") or "~/.cache/cass"
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
        want = fractions * len(members)
        take = np.floor(want).astype(int)
        for j in np.argsort(-(want - take), kind="stable")[: len(members) - take.sum()]:
            take[j] += 1
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
    """Load the saved split, or make and save it. Returns {'train'|'val'|'test': row indices}."""
    path = Path(split_file) if split_file else default_split_file(table, seed)
    index = {i: r for r, i in enumerate(table.ids)}
    if path.exists():
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
    split = make_split(table, seed)
    atomic_write_json(path, {"data": table.name, "root": table.root, "split_seed": seed,
                             "fingerprint": table.fingerprint(),
                             **{k: [table.ids[r] for r in v] for k, v in split.items()}})
    return split


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
        t = self.table
        return array_to_rgb(np.asarray(t.array[row])) if t.array is not None else load_rgb(t.paths[row])

    def __getitem__(self, i):
        row = int(self.rows[i])
        label = torch.as_tensor(self.table.labels[row])
        return self.transform(self.image(row)), label, row


def make_loader(dataset, bs, *, shuffle, workers, drop_last=False, generator=None, device=None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=bs, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
        generator=generator, pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False)


def load_data(args, parts=("train", "val", "test")):
    """The table and the split for the shared --data/--data-root/--split-file flags."""
    table = load_table(args.data, args.data_root, args.cache_dir)
    split = get_split(table, args.split_file, args.split_seed)
    return table, split


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded


# ---------------------------------------------------------------- DINO multi-crop (the baseline)

import random  # noqa: E402  (kept with the section that uses it)

from PIL import ImageFilter, ImageOps  # noqa: E402


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


class DinoMultiCrop:
    """The multi-crop augmentation of official DINO (facebookresearch/dino, DataAugmentationDINO).

    Returns a list of 2 + n_local tensors: two global crops of `global_size` px (RandomResizedCrop,
    scale `global_scale`, bicubic), then `n_local` local crops of `local_size` px (scale
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
        bicubic = T.InterpolationMode.BICUBIC
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.global1 = T.Compose([
            T.RandomResizedCrop(global_size, scale=tuple(global_scale), interpolation=bicubic),
            flip_and_color_jitter, PILGaussianBlur(1.0), normalize])
        self.global2 = T.Compose([
            T.RandomResizedCrop(global_size, scale=tuple(global_scale), interpolation=bicubic),
            flip_and_color_jitter, PILGaussianBlur(0.1), PILSolarize(0.2), normalize])
        self.local = T.Compose([
            T.RandomResizedCrop(local_size, scale=tuple(local_scale), interpolation=bicubic),
            flip_and_color_jitter, PILGaussianBlur(0.5), normalize])
        self.n_local = n_local

    def __call__(self, img):
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]
