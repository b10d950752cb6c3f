"""The decoded-image cache (decoded_cache.cached_table) and the epoch-seeded loaders (make_loader):
exact for the CASS and evaluation transforms, rebuilt when a file changes, never half-written,
the same with worker processes, and the same augmented batches whatever the number of workers
or processes."""

import os
import pickle
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
from pipeline import decoded_cache as DC
from pipeline import loading as LD
from pipeline import transforms as TR
from pipeline.dino_crops import dino_cache_size


def make_files(root, n=6, sizes=((40, 30), (24, 24))):
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 3 == 2:
            Image.fromarray(a[..., 0], "L").save(d / f"{i}.png")  # grayscale: replicated to RGB
        else:
            Image.fromarray(a).save(d / f"{i}.jpg", quality=90)
    return D.load_table("folder", root)


def test_cache_holds_the_resized_images_and_cass_views_are_bit_identical(tmp_path):
    table = make_files(tmp_path / "data")
    ct = DC.cached_table(table, 16, tmp_path / "cache")
    assert table.array is None and isinstance(ct.array, DC.MappedArray)
    assert ct.array.shape == (6, 16, 16, 3) and ct.ids == table.ids
    for r in range(6):
        assert np.array_equal(ct.array[r], DC.decode_resized(table.paths[r], 16))
    for tf in (TR.cass_augment(16, ("blur", "solarize")), TR.eval_transform(16)):
        a = LD.ImageDataset(table, range(6), tf)
        b = LD.ImageDataset(ct, range(6), tf)
        for i in range(6):
            assert torch.equal(a[(11, i)][0], b[(11, i)][0])
    assert len(pickle.dumps(ct.array)) < 2000  # workers get the path, not the pixels


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path):
    table = make_files(tmp_path / "data")
    first = DC.cached_table(table, 16, tmp_path / "cache")
    stamp = os.stat(first.array.path).st_mtime_ns
    again = DC.cached_table(table, 16, tmp_path / "cache")
    assert again.array.path == first.array.path and os.stat(again.array.path).st_mtime_ns == stamp
    # a modified source file: new fingerprint, new cache with the new pixels
    Image.new("RGB", (40, 30), (255, 0, 0)).save(table.paths[0], quality=95)
    os.utime(table.paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = DC.cached_table(table, 16, tmp_path / "cache")
    assert changed.array.path != first.array.path
    assert changed.array[0][..., 0].min() > 200 and not np.array_equal(changed.array[0], first.array[0])
    # another size is another cache
    assert DC.cached_table(table, 8, tmp_path / "cache").array.shape == (6, 8, 8, 3)


def test_a_cache_without_its_completion_marker_is_rebuilt(tmp_path):
    table = make_files(tmp_path / "data")
    ct = DC.cached_table(table, 16, tmp_path / "cache")
    path = ct.array.path
    marker = path[: -len(".npy")] + ".done.json"
    os.unlink(marker)
    with open(path, "r+b") as f:  # a half-written file from a crash
        f.seek(-10, 2)
        f.write(b"\0" * 10)
    rebuilt = DC.cached_table(table, 16, tmp_path / "cache")
    assert os.path.exists(marker)
    assert np.array_equal(rebuilt.array[5], DC.decode_resized(table.paths[5], 16))
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]


def test_worker_processes_build_the_same_cache(tmp_path):
    table = make_files(tmp_path / "data", n=80)
    a = DC.cached_table(table, 12, tmp_path / "c0", workers=0)
    b = DC.cached_table(table, 12, tmp_path / "c2", workers=2)
    assert np.array_equal(np.load(a.array.path), np.load(b.array.path))


def test_a_cache_of_some_rows(tmp_path):
    table = make_files(tmp_path / "data")
    ct = DC.cached_table(table, 16, tmp_path / "cache", rows=[1, 4])
    assert ct.array.shape == (2, 16, 16, 3)
    assert np.array_equal(ct.array[4], DC.decode_resized(table.paths[4], 16))
    with pytest.raises(IndexError):
        ct.array[0]


def test_load_data_uses_the_cache_unless_no_cache(tmp_path, monkeypatch):
    make_files(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(data="folder", data_root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                           split_file=None, split_seed=77, img_size=16, workers=0, cache=True)
    table, split = D.load_data(args)
    assert isinstance(table.array, DC.MappedArray) and table.array.shape[1] == 16
    table, _ = D.load_data(args, cache_size=20, cache_part="train")
    assert table.array.shape == (len(split["train"]), 20, 20, 3)
    args.cache = False
    assert D.load_data(args)[0].array is None
    in_memory = D.ImageTable("t", ["0"], np.zeros(1, dtype=np.int64), ["a"], False,
                             array=np.zeros((1, 8, 8, 3), dtype=np.uint8))
    assert DC.cached_table(in_memory, 16, tmp_path / "cache") is in_memory  # arrays are never cached


def test_dino_cache_size():
    assert dino_cache_size(224, 96, (0.4, 1.0), (0.05, 0.4)) == 448
    assert dino_cache_size(64, 32, (0.4, 1.0), (0.05, 0.4)) == 160


def _batches(ds, workers, epoch_seed, bs=4, **kw):
    loader = LD.make_loader(ds, bs, shuffle=True, workers=workers, generator=torch.Generator().manual_seed(epoch_seed), **kw)
    return [(x, r) for x, _, r in loader]


def test_loader_batches_do_not_depend_on_workers_and_workers_persist():
    rng = np.random.default_rng(0)
    table = D.ImageTable("t", [str(i) for i in range(10)], np.zeros(10, dtype=np.int64), ["a"], False,
                         array=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    ds = LD.ImageDataset(table, range(10), TR.cass_augment(16))
    a = _batches(ds, 0, 5)
    b = _batches(ds, 2, 5)
    assert len(a) == len(b) == 3
    for (xa, ra), (xb, rb) in zip(a, b):
        assert torch.equal(ra, rb) and torch.equal(xa, xb)
    c = _batches(ds, 2, 6)  # another epoch: another order and other views
    assert not all(torch.equal(ra, rc) for (_, ra), (_, rc) in zip(a, c))
    l1 = LD.make_loader(ds, 4, shuffle=True, workers=2, generator=torch.Generator().manual_seed(1))
    l2 = LD.make_loader(ds, 4, shuffle=True, workers=2, generator=torch.Generator().manual_seed(2))
    assert l1 is l2 and l1.persistent_workers
    # the main process's random stream is not disturbed by seeding the items (workers=0)
    torch.manual_seed(0)
    _batches(ds, 0, 5)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_sharded_sampler_splits_every_global_batch():
    n, world, bs = 24, 2, 8
    single = LD.EpochSampler(n, True)
    single.set_epoch_seed(3)
    order = list(single)
    shards = []
    for rank in range(world):
        s = LD.EpochSampler(n, True)
        s.rank, s.world = rank, world
        s.set_epoch_seed(3)
        shards.append(list(s))
    for k in range(n // bs):  # batch k of every process together = batch k of one process
        together = sorted(x for sh in shards for x in sh[k * bs // world:(k + 1) * bs // world])
        assert together == sorted(order[k * bs:(k + 1) * bs])
