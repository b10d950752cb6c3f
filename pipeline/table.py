"""The image table every layer reads (`ImageTable`: sample ids, where each image lies, labels, class
names), the junk rule, the class-per-folder reader, and the largest-remainder rounding behind every
split and class count. It sits below the layouts, the loaders and the synthetic data, which all
take these; datasets.py above puts them together."""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


@dataclass
class ImageTable:
    """One data set: row i is image ids[i] with label labels[i].

    Images come either from files (`paths`) or from a uint8 array (`array`, N x H x W [x C]).
    Labels are int64 class indices (single-label) or a float32 N x L 0/1 matrix (multi-label).
    `curator_split` maps 'train'/'test' (and maybe 'val') to row indices when the data set ships
    its own split. `groups` (one value per row, e.g. HAM10000's lesion_id or a --group-col) names
    images that must stay in one split part."""
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
    groups: list = None

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


def _need_dir(root, flag="--data-root") -> Path:
    if root is None:
        raise UserError(f"{flag} is required for this data set")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {root}: no such folder")
    return root


SYSTEM_FOLDERS = {"__MACOSX", "$RECYCLE.BIN", "System Volume Information"}


def is_junk(rel: Path) -> bool:
    """A hidden file, or any file inside a hidden or system folder (.ipynb_checkpoints/, __MACOSX/,
    .git/): never data, in any layout."""
    return any(part.startswith(".") or part in SYSTEM_FOLDERS for part in rel.parts)


def _images_under(folder: Path, exclude_masks=False):
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and not is_junk(p.relative_to(folder)))
    if exclude_masks:
        files = [p for p in files if "mask" not in p.name.lower()]
    return files


def _class_folders(root: Path, exclude_masks=False):
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not is_junk(Path(d.name)))
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
    "ham10000": "HAM10000_metadata.csv and <image_id>.jpg in HAM10000_images_part_1/, _part_2/ or one folder",
    "pbc": "one sub-folder per class (in PBC_dataset_normal_DIB/ or directly): <root>/<class>/<image>",
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


def largest_remainder(want, total: int, tiebreak=None) -> np.ndarray:
    """Integer counts summing to `total` (at least sum(floor(want))), as close to the real numbers
    `want` as possible: each is floor(want) or one more, the extra ones going to the largest fractional parts
    (ties: the first, or the lowest `tiebreak`). The split's allocation within each stratum
    (stratified_partition), the labelled subset's (finetune.py) and the synthetic data's class counts."""
    want = np.asarray(want, dtype=np.float64)
    counts = np.floor(want).astype(np.int64)
    remainder = -(want - counts)
    order = np.argsort(remainder, kind="stable") if tiebreak is None else np.lexsort((tiebreak, remainder))
    counts[order[: max(int(total - counts.sum()), 0)]] += 1
    return counts
