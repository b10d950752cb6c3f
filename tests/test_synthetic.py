import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import ROOT
from pipeline import synthetic
from pipeline.synthetic import ensure_synthetic, synthetic_dir

SMALL = dict(n_images=120, size=48)


def load(folder):
    meta = json.loads((folder / "meta.json").read_text())
    return np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"), meta


def test_same_arguments_give_identical_files_and_other_seed_differs(tmp_path):
    a = ensure_synthetic(tmp_path / "a", False, seed=3, progress=False, **SMALL)
    b = ensure_synthetic(tmp_path / "b", False, seed=3, progress=False, **SMALL)
    c = ensure_synthetic(tmp_path / "c", False, seed=4, progress=False, **SMALL)
    for name in ("images.npy", "labels.npy", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert not np.array_equal(load(a)[0], load(c)[0])


@pytest.mark.parametrize("multilabel", [False, True])
def test_forked_workers_write_the_bytes_of_one_process(tmp_path, monkeypatch, multilabel):
    """The images are rendered in chunks by forked processes (each image has its own random stream):
    the files equal those of a one-process generation."""
    kw = dict(n_images=4 * synthetic.CHUNK, size=32, seed=5, progress=False)
    assert synthetic._generate_workers(10) == 1  # a small data set: no processes to start
    monkeypatch.setattr(synthetic, "_generate_workers", lambda n: 1)
    one = ensure_synthetic(tmp_path / "one", multilabel, **kw)
    monkeypatch.setattr(synthetic, "_generate_workers", lambda n: 3)
    three = ensure_synthetic(tmp_path / "three", multilabel, **kw)
    for name in ("images.npy", "labels.npy", "meta.json"):
        assert (one / name).read_bytes() == (three / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("fail", [False, True])
def test_the_workers_end_under_a_sigterm_handler_that_only_notes_the_signal(tmp_path, fail):
    """As in a process whose training run has installed its SIGTERM handler: the pool's workers end,
    after a generation that ends well or one that fails in a worker. (The first chunk fails while the
    other worker renders the second: Pool.terminate's SIGTERM reached a worker in the middle of its
    chunk, which then waited for work for ever, and the generation with it.)"""
    code = ("import signal, sys; from pipeline import synthetic; signal.signal(signal.SIGTERM, lambda *a: print('noted')); "
            "synthetic._generate_workers = lambda n: 2; render = synthetic._render_one; "
            "synthetic._render_one = lambda i: 1 / 0 if sys.argv[2] == 'True' and 10 <= i < 50 else render(i); "
            f"synthetic.ensure_synthetic(sys.argv[1], False, n_images={4 * synthetic.CHUNK}, size=32, progress=False); "
            "print('done')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(fail)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    if fail:
        assert out.returncode == 1 and "ZeroDivisionError" in out.stderr, out.stderr[-2000:]
        assert list(tmp_path.rglob("images.npy")) == []  # (no half-written data set)
    else:
        assert out.returncode == 0 and out.stdout.split() == ["done"], out.stderr[-2000:]


def test_second_call_reuses_the_folder(tmp_path, monkeypatch):
    first = ensure_synthetic(tmp_path, True, progress=False, **SMALL)
    mtime = (first / "images.npy").stat().st_mtime_ns

    def must_not_render(*args, **kwargs):
        raise AssertionError("regenerated an existing data set")

    monkeypatch.setattr(synthetic, "render_image", must_not_render)
    assert ensure_synthetic(tmp_path, True, progress=False, **SMALL) == first
    assert (first / "images.npy").stat().st_mtime_ns == mtime


def test_single_label_files(tmp_path):
    folder = ensure_synthetic(tmp_path, False, seed=1, progress=False, **SMALL)
    assert folder == synthetic_dir(tmp_path, False, seed=1, **SMALL)
    images, labels, meta = load(folder)
    assert images.dtype == np.uint8 and images.shape == (120, 48, 48, 3)
    assert labels.dtype == np.int64 and labels.shape == (120,)
    assert meta == {"version": synthetic.SYNTHETIC_VERSION, "multilabel": False,
                    "class_names": list(synthetic.SINGLE_LABEL_CLASSES), "n_images": 120, "size": 48,
                    "seed": 1, "class_counts": meta["class_counts"]}
    counts = np.bincount(labels, minlength=len(meta["class_names"]))
    assert counts.tolist() == meta["class_counts"]
    assert len(counts) >= 6 and counts.sum() == 120
    expected = 120 * np.asarray(synthetic.SINGLE_LABEL_PROPORTIONS)
    assert np.all(np.abs(counts - expected) < 1)
    assert counts.min() > 0 and counts.max() >= 3 * counts.min()
    assert images.std() > 10  # not blank


def test_multi_label_files(tmp_path):
    images, labels, meta = load(ensure_synthetic(tmp_path, True, progress=False, **SMALL))
    assert images.dtype == np.uint8 and images.shape == (120, 48, 48, 3)
    assert labels.dtype == np.float32 and labels.shape == (120, 5)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert meta["multilabel"] is True and meta["class_names"] == list(synthetic.MULTI_LABEL_CLASSES)
    assert labels.sum(1).min() >= 1
    assert labels.sum(0).min() >= 1
    assert labels.sum(0).astype(int).tolist() == meta["class_counts"]


def test_interrupted_generation_leaves_no_folder(tmp_path, monkeypatch):
    real = synthetic.render_image
    calls = []

    def fail_after_five(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_image", fail_after_five)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_synthetic(tmp_path, False, progress=False, **SMALL)
    assert not synthetic_dir(tmp_path, False, **SMALL).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{synthetic_dir(tmp_path, False, **SMALL).name}.lock"]
    # (the temporary folder is gone too; the lock file stays, empty, as the split's and the cache's)

    monkeypatch.setattr(synthetic, "render_image", real)
    images, labels, meta = load(ensure_synthetic(tmp_path, False, progress=False, **SMALL))
    assert images.shape == (120, 48, 48, 3) and labels.shape == (120,) and meta["n_images"] == 120


def balanced_accuracy(features, labels):
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_score(model, features, labels, cv=folds, scoring="balanced_accuracy").mean()


def shape_features(images):
    """Colour-free features: the rotation-averaged power spectrum of the standardised grey image
    (sizes and spacings of structures) and the structure-tensor coherence (aligned structures)."""
    n, size = images.shape[:2]
    grey = images.astype(np.float64).mean(3)
    grey = (grey - grey.mean((1, 2), keepdims=True)) / (grey.std((1, 2), keepdims=True) + 1e-6)
    power = np.abs(np.fft.fft2(grey)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    ring = np.digitize(np.hypot(fx, fy), np.linspace(0, 0.5, 13))
    spectrum = np.log(np.stack([power[:, ring == j].mean(1) for j in range(1, 13)], 1))
    gy, gx = np.gradient(grey, axis=(1, 2))
    jxx, jyy, jxy = (gx * gx).mean((1, 2)), (gy * gy).mean((1, 2)), (gx * gy).mean((1, 2))
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy)
    return np.column_stack([spectrum, coherence])


def test_colour_alone_does_not_give_the_label_but_shape_does(tmp_path):
    images, labels, _ = load(ensure_synthetic(tmp_path, False, n_images=600, size=48, progress=False))
    images = np.asarray(images)
    colour = balanced_accuracy(images.reshape(len(images), -1, 3).mean(1), labels)
    shape = balanced_accuracy(shape_features(images), labels)
    # Chance is 1/6 ~ 0.17 and mean RGB gets about 0.2: stain, stroma and illumination vary the
    # same way in every class. 0.35 (twice chance) fails as soon as a class gets its own colour or
    # brightness, while leaving room for the small cue that cell coverage tints the mean.
    assert colour < 0.35
    # A crude colour-free feature (about 0.85 here) must do far better: the classes are learnable
    # from the shapes, sizes and arrangement of the cells.
    assert shape > 0.6 and shape > colour + 0.3
