"""Embedded synthetic microscopy data set, the project's default data set.

Every image is one field of view of H&E-like stained tissue: a pink fibrous stroma background and
cells drawn as soft-edged shapes with a (pink) cytoplasm and a (purple) nucleus. Cells are drawn as
two density maps (haematoxylin and eosin) and turned into RGB with a Beer-Lambert stain model, so
the geometry and the colour are separate.

Single-label variant (6 classes, imbalanced like medical data, proportions SINGLE_LABEL_PROPORTIONS):
each image is dominated by one cell type, which differs from the others in shape, size, nuclear
texture and arrangement:

    lymphocyte_like          many small round dark nuclei with a thin rim, scattered
    neutrophil_like          medium cells with a pale cytoplasm and a nucleus of 3-5 linked lobes
    spindle_like             elongated spindle cells with cigar-shaped nuclei, aligned in one direction
    epithelial_cluster_like  medium round cells with pale vesicular nuclei and a nucleolus, in tight clusters
    giant_cell_like          one or two large irregular cells holding many nuclei
    signet_ring_like         cells filled by a clear vacuole that pushes a crescent nucleus to the rim

Multi-label variant (5 cell types, MULTI_LABEL_CLASSES): each image holds a random non-empty subset
of cell types, each present with its own probability (MULTI_LABEL_PRESENCE); the label is the
presence vector. The types:

    t_cell_like       small round dark nuclei (as lymphocyte_like)
    plasma_cell_like  oval cells with an eccentric "clock-face" nucleus and a pale halo beside it
    neutrophil_like   lobed nuclei (as above)
    macrophage_like   large irregular cells with a foamy cytoplasm and a kidney-shaped nucleus
    fibroblast_like   aligned spindle cells (as spindle_like)

A fifth of the single-label images also hold a few scattered cells of one other class, as real tissue
is mixed: the label is the dominant cell type and its arrangement, not the mere presence of a cell.

In both variants every image also holds generic distractor cells (medium round cells and red blood
cells) and all nuisances are drawn from the same distribution for every class, so no class can be
told by colour or brightness: stain colours and strengths, background tint, stroma amount, global
rotation, illumination gradient and vignetting, blur, noise and cell density.

Generation is deterministic: the same arguments give byte-identical arrays. A data set is written
once into `synthetic_dir(...)` (images.npy, labels.npy, meta.json) and reused afterwards.
"""

import json
import multiprocessing
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.synthetic_cells import render_image  # (the drawing of one image)
from pipeline.table import largest_remainder
from runtime.files import file_lock

SYNTHETIC_VERSION = 2

SINGLE_LABEL_CLASSES = ("lymphocyte_like", "neutrophil_like", "spindle_like", "epithelial_cluster_like",
                        "giant_cell_like", "signet_ring_like")
SINGLE_LABEL_PROPORTIONS = (0.34, 0.22, 0.15, 0.12, 0.10, 0.07)
MULTI_LABEL_CLASSES = ("t_cell_like", "plasma_cell_like", "neutrophil_like", "macrophage_like",
                       "fibroblast_like")
MULTI_LABEL_PRESENCE = (0.6, 0.4, 0.3, 0.2, 0.15)

MINOR_PROBABILITY = 0.2  # single-label images that also hold a few cells of one other class


# ---------------------------------------------------------------------------------------------
# Data set files.

def _exact_counts(n, proportions):
    """Integer counts summing to n, as close to n * proportions as possible (largest remainder)."""
    return largest_remainder(np.asarray(proportions) * n / np.sum(proportions), n)


def _draw_labels(rng, multilabel, n):
    if not multilabel:
        counts = _exact_counts(n, SINGLE_LABEL_PROPORTIONS)
        return rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)
    presence = np.asarray(MULTI_LABEL_PRESENCE)
    labels = (rng.random((n, len(presence))) < presence).astype(np.float32)
    for i in np.flatnonzero(labels.sum(1) == 0):
        labels[i, rng.choice(len(presence), p=presence / presence.sum())] = 1.0
    return labels


def synthetic_dir(cache_dir, multilabel: bool, n_images: int = 3000, size: int = 96, seed: int = 0) -> Path:
    """Folder that holds the synthetic data set with these parameters (nothing is generated)."""
    kind = "multilabel" if multilabel else "singlelabel"
    return Path(cache_dir).expanduser() / f"synthetic-v{SYNTHETIC_VERSION}-{kind}-n{n_images}-s{size}-seed{seed}"


def _render_one(i: int) -> np.ndarray:
    """Image i of the data set being generated (_JOB), from its own random stream."""
    children, labels, multilabel, size, class_names = _JOB
    rng = np.random.default_rng(children[i])
    if multilabel:
        return render_image(rng, size, [class_names[j] for j in np.flatnonzero(labels[i])])
    others = [name for j, name in enumerate(class_names) if j != labels[i]]
    minor = [others[rng.integers(len(others))]] if rng.random() < MINOR_PROBABILITY else []
    return render_image(rng, size, [class_names[labels[i]]], minor)


def _render_chunk(rows) -> np.ndarray:
    return np.stack([_render_one(i) for i in rows])


_JOB = None  # what _render_one needs, set before the worker processes fork
CHUNK = 50


def _generate_workers(n_images: int) -> int:
    """Processes to render with: the usable cores (at most 8), forked (Linux); one where fork is
    missing or this process may not have children (a daemonic worker), or for a small data set."""
    if (n_images < 4 * CHUNK or "fork" not in multiprocessing.get_all_start_methods()
            or multiprocessing.current_process().daemon):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


def _worker_signals():
    """In each forked worker: SIGTERM ends it, whatever handler this process had installed (Pool.terminate
    sends SIGTERM; a handler that only notes the signal, such as a training run's, would leave the
    worker waiting for work and the pool's join waiting for ever); Ctrl-C is left to this process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _generate(folder, multilabel, n_images, size, seed, progress):
    global _JOB
    class_names = MULTI_LABEL_CLASSES if multilabel else SINGLE_LABEL_CLASSES
    root = np.random.SeedSequence([seed, int(multilabel), n_images, size])
    labels = _draw_labels(np.random.default_rng(root), multilabel, n_images)
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n_images, size, size, 3))
    _JOB = (root.spawn(n_images), labels, multilabel, size, class_names)
    chunks = [range(a, min(a + CHUNK, n_images)) for a in range(0, n_images, CHUNK)]
    workers = _generate_workers(n_images)
    # each image has its own random stream: the same bytes in any process
    pool = multiprocessing.get_context("fork").Pool(workers, _worker_signals) if workers > 1 else None
    bar = tqdm(total=n_images, desc="generating synthetic images", disable=not progress)
    try:
        done = pool.imap(_render_chunk, chunks) if pool else map(_render_chunk, chunks)
        for rows, block in zip(chunks, done):
            images[rows.start:rows.stop] = block
            bar.update(len(rows))
        if pool is not None:
            pool.close()  # the workers finish and exit
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        _JOB = None
        if pool is not None:
            pool.join()
    images.flush()
    del images
    np.save(folder / "labels.npy", labels)
    counts = labels.sum(0).astype(int) if multilabel else np.bincount(labels, minlength=len(class_names))
    meta = {"version": SYNTHETIC_VERSION, "multilabel": multilabel, "class_names": list(class_names),
            "n_images": n_images, "size": size, "seed": seed, "class_counts": [int(c) for c in counts]}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def ensure_synthetic(cache_dir, multilabel: bool, n_images: int = 3000, size: int = 96, seed: int = 0,
                     progress: bool = True) -> Path:
    """Generate the data set into synthetic_dir(...) unless it is there already; return that folder.

    The files are written into a temporary sibling folder that is renamed into place when complete,
    so an interrupted run never leaves a folder that looks finished. Under a lock (common.file_lock):
    processes that need the same data set at once generate it once, the others wait for it."""
    if n_images < 1 or size < 32:
        raise ValueError(f"need n_images >= 1 and size >= 32, got n_images={n_images}, size={size}")
    final = synthetic_dir(cache_dir, multilabel, n_images, size, seed)
    if final.is_dir():
        return final
    with file_lock(final):
        if final.is_dir():  # another process generated it while this one waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _generate(tmp, multilabel, n_images, size, seed, progress)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
