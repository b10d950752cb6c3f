"""Copies of one image inside a data set, found once and saved next to the split file.

Two kinds:
- exact: identical file bytes, or identical decoded pixels (the same picture saved again losslessly);
- near: the same picture re-encoded (JPEG quality, PNG), resized or with its brightness/contrast
  changed. Each image becomes a 16 x 16 grayscale thumbnail (box filter, so resizing barely moves
  it), centred and scaled to unit length; two images are near copies when the cosine distance of
  their thumbnails (1 - Pearson correlation of the 256 pixels) is below NEAR_THRESHOLD.
  The threshold was chosen on the brain-MRI images (docs/datasets.md, "Copies and leaks"): planted
  re-encodings and resizings land below 0.001, while crops of 2% or more, shifts of 3% and flips
  land far above it (they are not caught).

Groups are the connected components of the copy pairs: `near` groups hold every group (exact ones
included), `exact` groups only images linked by identical bytes or pixels. A group straddling splits
is a leak; `leaks` counts them, `clean_test_rows` drops them from the test, datasets.make_split
keeps a group whole.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.images import array_to_rgb, load_rgb
from runtime.errors import UserError
from runtime.files import atomic_write_json

THUMB = 16
NEAR_THRESHOLD = 0.005
METHOD = (f"exact: same file bytes (SHA-1) or same decoded RGB pixels; near: cosine distance < {NEAR_THRESHOLD} "
          f"between mean-centred {THUMB}x{THUMB} grayscale box-filtered thumbnails")
FORMAT = 1


def thumbnail(im: Image.Image) -> np.ndarray:
    """The image's near-copy signature: THUMB x THUMB grayscale, box-filtered, centred, unit length
    (all zeros for a flat image, which then matches nothing)."""
    v = np.asarray(im.convert("L").resize((THUMB, THUMB), Image.BOX), dtype=np.float32).ravel()
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-3 else np.zeros_like(v)


def _pixel_hash(a: np.ndarray) -> str:
    return hashlib.sha1(str(a.shape).encode() + np.ascontiguousarray(a).tobytes()).hexdigest()


def fingerprints(table, progress=True):
    """Per row: the file bytes' hash, the decoded pixels' hash and the thumbnail. Rows whose file
    cannot be read get None hashes and a zero thumbnail (load_data reports them)."""
    n = len(table)
    byte_h, pix_h = [None] * n, [None] * n
    thumbs = np.zeros((n, THUMB * THUMB), dtype=np.float32)
    bar = tqdm(range(n), desc="copies: reading images", unit="img", disable=not progress or None,
               dynamic_ncols=True, leave=False)
    for r in bar:
        if table.array is not None:
            a = np.asarray(table.array[r])
            im = array_to_rgb(a)
            byte_h[r] = pix_h[r] = _pixel_hash(a)
        else:
            try:
                byte_h[r] = hashlib.sha1(Path(table.paths[r]).read_bytes()).hexdigest()
                im = load_rgb(table.paths[r])
            except (OSError, UserError):
                byte_h[r] = None
                continue
            pix_h[r] = _pixel_hash(np.asarray(im))
        thumbs[r] = thumbnail(im)
    return byte_h, pix_h, thumbs


def near_pairs(thumbs: np.ndarray, threshold: float = NEAR_THRESHOLD):
    """(i, j, distance) with i < j for every pair of thumbnails closer than `threshold`."""
    live = np.flatnonzero(np.abs(thumbs).sum(1) > 0)
    if len(live) < 2:
        return []
    x = thumbs[live]
    pairs = []
    chunk = 2048
    for s in range(0, len(x), chunk):
        d = 1.0 - x[s:s + chunk] @ x.T  # unit vectors: cosine distance
        ii, jj = np.nonzero(d < threshold)
        for i, j in zip(ii + s, jj):
            if i < j:
                pairs.append((int(live[i]), int(live[j]), float(max(d[i - s, j], 0.0))))
    return pairs


def _components(n: int, edges) -> np.ndarray:
    """Component id per node; isolated nodes get their own. Ids are numbered by each component's
    lowest node, so with no edges node i is component i."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    if not len(edges):
        return np.arange(n)
    e = np.asarray(edges, dtype=np.int64)
    g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    first = {}
    for i, c in enumerate(lab):
        first.setdefault(c, i)
    order = {c: k for k, c in enumerate(sorted(first, key=first.get))}
    return np.asarray([order[c] for c in lab], dtype=np.int64)


def _exact_edges(hashes):
    seen, edges = {}, []
    for r, h in enumerate(hashes):
        if h is None:
            continue
        if h in seen:
            edges.append((seen[h], r))
        else:
            seen[h] = r
    return edges


def find_copies(table, progress=True, threshold: float = NEAR_THRESHOLD) -> dict:
    """Every group of copies in `table`, as lists of ids, with the near pairs' distances."""
    byte_h, pix_h, thumbs = fingerprints(table, progress)
    exact_edges = _exact_edges(byte_h) + _exact_edges(pix_h)
    pairs = near_pairs(thumbs, threshold)
    exact = _components(len(table), exact_edges)
    near = _components(len(table), exact_edges + [(i, j) for i, j, _ in pairs])
    ids = table.ids

    def groups(lab):
        members = {}
        for r, c in enumerate(lab):
            members.setdefault(int(c), []).append(r)
        return [[ids[r] for r in m] for m in members.values() if len(m) > 1]

    return {"format": FORMAT, "data": table.name, "fingerprint": table.fingerprint(), "n_images": len(table),
            "method": METHOD, "threshold": threshold,
            "unreadable": [ids[r] for r in range(len(table)) if byte_h[r] is None],
            "exact_groups": groups(exact), "near_groups": groups(near),
            "near_pairs": [[ids[i], ids[j], round(d, 6)] for i, j, d in pairs]}


def copies_file(split_path) -> Path:
    p = Path(split_path)
    return p.with_name(p.stem + ".copies.json")


def load_copies(path: Path, table):
    """The saved copies of `table`, or None when the file is missing or made for other data."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("format") != FORMAT or saved.get("fingerprint") != table.fingerprint():
        return None
    return saved


def ensure_copies(path: Path, table, progress=True) -> dict:
    """Load the copies saved at `path`, or find them and save them there (call under the split's lock)."""
    saved = load_copies(path, table)
    if saved is None:
        saved = find_copies(table, progress)
        atomic_write_json(path, saved)
    return saved


def group_ids(table, copies: dict, kind: str = "near") -> np.ndarray:
    """Group id per row of `table` (kind 'near' or 'exact'); a row without a copy is a group alone."""
    index = {i: r for r, i in enumerate(table.ids)}
    edges = []
    for g in copies[f"{kind}_groups"]:
        rows = [index[i] for i in g if i in index]
        edges += [(rows[0], r) for r in rows[1:]]
    return _components(len(table), edges)


def split_groups(table, copies: dict) -> np.ndarray:
    """What must stay in one split part: near-copy groups joined with the table's own groups
    (HAM10000's lesion_id, --group-col)."""
    edges = []
    near = group_ids(table, copies, "near")
    edges += _same_value_edges(near)
    if table.groups is not None:
        edges += _same_value_edges(table.groups)
    return _components(len(table), edges)


def _same_value_edges(values):
    first, edges = {}, []
    for r, v in enumerate(values):
        if v in first:
            edges.append((first[v], r))
        else:
            first[v] = r
    return edges


def leaks(split: dict, table, copies: dict) -> dict:
    """For val and test: how many of its images have a copy in an earlier part (val: train; test:
    train or val), counting exact copies and near ones (near includes exact)."""
    out = {}
    for kind in ("exact", "near"):
        g = group_ids(table, copies, kind)
        earlier = set()
        for part in ("train", "val", "test"):
            rows = np.asarray(split[part], dtype=np.int64)
            if part != "train":
                out.setdefault(part, {})[kind] = int(np.isin(g[rows], list(earlier)).sum())
            earlier.update(g[rows].tolist())
    return out


def clean_test_rows(split: dict, table, copies: dict) -> np.ndarray:
    """The test rows with no copy (exact or near) in training or validation."""
    g = group_ids(table, copies, "near")
    seen = set(g[np.concatenate([split["train"], split["val"]]).astype(np.int64)].tolist())
    test = np.asarray(split["test"], dtype=np.int64)
    return test[~np.isin(g[test], list(seen))]
