"""The decoded-image cache and the bad-image checks: a data set's image files decoded once into a
memory-mapped uint8 array at the input size (`cached_table`), and every file of a table checked for
readability before training (`check_images`). Imported only when used (datasets.load_data: image
files and no --no-cache, or --skip-bad-images).

Tables are datasets.ImageTable; a table whose images are already in an array (synthetic, medmnist)
is never cached."""

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from torchvision import transforms as T
from tqdm import tqdm

from pipeline.images import load_rgb
from runtime.cli import default_cache_dir
from runtime.errors import UserError
from runtime.files import atomic_write, atomic_write_json, file_lock


def bad_images_error(bad, n_checked) -> UserError:
    """The one-line error for unreadable images found before training: bad = [(row, path, reason)]."""
    _, path, why = bad[0]
    what = "1 image" if len(bad) == 1 else f"{len(bad)} images"
    return UserError(f"{what} of {n_checked} cannot be read (first: {path}: {why}); "
                     "pass --skip-bad-images to leave them out")


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


def cache_fingerprint(table, size: int, rows) -> str:
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
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress or None, dynamic_ncols=True)
    if workers > 0 and len(items) > 64:
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


def check_images(table, rows=None, workers: int = 0, progress: bool = True) -> list:
    """Decode every image file of `rows` (default all) once, as the loader would (load_rgb), with
    `workers` processes; returns [(row, path, reason)] of those that cannot be read, in row order.
    Used by --no-cache --skip-bad-images (the cache build finds them itself). Arrays: nothing to check."""
    if table.array is not None or not table.paths:
        return []
    rows = np.arange(len(table)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    return _decode_all(None, [(int(r), table.paths[r]) for r in rows], None, workers, "checking images", progress)[0]


def cached_table(table, size: int, cache_dir=None, rows=None, workers: int = 0,
                 progress: bool = True, skip_bad: bool = False):
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
            with file_lock(folder / stem):  # another process building the same cache: wait for it
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
    n = len(rows)
    nbytes = n * size * size * 3
    free = shutil.disk_usage(path.parent).free
    if free < nbytes * 1.05 + (64 << 20):
        raise UserError(f"decoded-image cache: {nbytes / 2**30:.1f} GiB needed in {path.parent}, only "
                        f"{free / 2**30:.1f} GiB free (use --cache-dir elsewhere, or --no-cache)")
    print(f"decoding {n} images of {table.name} once into {path} ({nbytes / 2**30:.2f} GiB, {size}x{size})",
          file=sys.stderr)
    t0 = time.perf_counter()
    found = {}

    def write(tmp):
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        out.flush()
        del out  # the decoding writes through its own memory maps (in worker processes or here)
        found["bad"], found["sizes"] = _decode_all(tmp, [(pos, table.paths[r]) for pos, r in enumerate(rows)],
                                                   size, workers, "decoding", progress)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    atomic_write(path, write, every_process=True)  # whichever process builds the cache (not only rank 0)
    bad, sizes = found["bad"], found["sizes"]
    marker = {"fingerprint": fp, "data": table.name, "root": table.root, "size": size, "n": n,
              "version": CACHE_VERSION, "seconds": round(time.perf_counter() - t0, 2),
              "bad": [{"pos": int(pos), "row": int(rows[pos]), "path": p, "reason": why} for pos, p, why in bad],
              "sizes": [list(sizes.get(pos, (0, 0))) for pos in range(n)]}  # source (height, width); 0: unreadable
    atomic_write_json(done, marker, every_process=True)  # the completion marker, written last
    return marker
