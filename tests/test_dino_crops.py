"""DINO compared like for like with CASS: its global crops default to the fine-tuning size, and its
crops keep each image's aspect ratio also when they are cut from the square decoded cache
(dino_crops.SourceCrop on the CPU, the same mapping in gpu_aug.DinoGpuMultiCrop)."""

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

import finetune
import pretrain_cass
import pretrain_dino
from pipeline.decoded_cache import cached_table
from pipeline.dino_crops import SourceCrop
from pipeline.gpu_aug import DinoGpuMultiCrop, UInt8Dataset, rrc_boxes
from pipeline.loading import ImageDataset
from pipeline.table import ImageTable
from study import profiles as P


def smooth_image(w, h):
    """A wide or tall image with large, smooth, asymmetric structure (interpolation errors stay small)."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([255 * xx / w, 255 * yy / h, 128 + 60 * np.sin(xx / w * 6.0) * np.cos(yy / h * 4.0)], -1)
    im = Image.fromarray(a.astype(np.uint8))
    ImageDraw.Draw(im).ellipse((w * 0.1, h * 0.2, w * 0.45, h * 0.7), fill=(250, 250, 40))
    return im


def file_table(tmp_path, sizes):
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = tmp_path / f"img{i}.png"
        smooth_image(w, h).save(p)
        paths.append(str(p))
    n = len(paths)
    return ImageTable("crops", [f"i{i}" for i in range(n)], np.zeros(n, dtype=np.int64), ["a"], False, paths=paths)


def test_source_crop_is_torchvision_on_an_image_that_is_its_own_source():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    rrc = T.RandomResizedCrop(32, (0.05, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    for seed in range(25):
        torch.manual_seed(seed)
        a = np.asarray(SourceCrop(32, (0.05, 1.0))(img))
        torch.manual_seed(seed)
        assert np.array_equal(a, np.asarray(rrc(img))), seed


def test_the_cache_records_source_sizes_and_crops_of_it_keep_the_aspect_ratio(tmp_path):
    table = file_table(tmp_path, [(200, 100), (90, 180)])  # (width, height)
    cached = cached_table(table, 96, cache_dir=tmp_path / "cache", progress=False)
    assert cached.extra["source_sizes"].tolist() == [[100, 200], [180, 90]]  # (height, width)
    ds = ImageDataset(cached, [0, 1], lambda im: im)
    for row in (0, 1):
        square, original = ds.image(row), Image.open(table.paths[row]).convert("RGB")
        assert square.size == (96, 96) and square.info["source_size"] == original.size[::-1]
        crop = SourceCrop(48, (0.3, 1.0))
        new_err, old_err = [], []
        for seed in range(30):
            torch.manual_seed(seed)
            want = np.asarray(crop(original), dtype=float)  # the crop torchvision cuts from the file
            torch.manual_seed(seed)
            new_err.append(np.abs(np.asarray(crop(square), dtype=float) - want).mean())
            torch.manual_seed(seed)  # before: RandomResizedCrop drawn on the stretched square
            old = T.RandomResizedCrop(48, (0.3, 1.0), interpolation=T.InterpolationMode.BICUBIC)(square)
            old_err.append(np.abs(np.asarray(old, dtype=float) - want).mean())
        assert np.mean(new_err) < 4.0, np.mean(new_err)  # grey levels of 255: interpolation error only
        assert np.mean(old_err) > 3 * np.mean(new_err), (np.mean(old_err), np.mean(new_err))


def test_rrc_boxes_with_per_crop_sizes_equal_one_size_at_a_time():
    u = torch.rand(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u[3] = 0.999  # every attempt invalid: the central fallback
    hs, ws = torch.tensor([50., 50, 120, 30, 64, 200], dtype=torch.float64), torch.tensor([100., 100, 40, 90, 64, 20],
                                                                                         dtype=torch.float64)
    both = rrc_boxes(u, hs, ws, (0.05, 1.0))
    for i in range(6):
        assert torch.equal(both[i], rrc_boxes(u[i:i + 1], int(hs[i]), int(ws[i]), (0.05, 1.0))[0]), i


def test_device_crops_of_the_cache_match_device_crops_of_the_file(tmp_path):
    table = file_table(tmp_path, [(200, 100)])
    cached = cached_table(table, 96, cache_dir=tmp_path / "cache", progress=False)
    original = np.asarray(Image.open(table.paths[0]).convert("RGB"))[None]
    as_file = ImageTable("file", ["i0"], np.zeros(1, dtype=np.int64), ["a"], False, array=original)
    aug = DinoGpuMultiCrop(48, 24, 2, (0.3, 1.0), (0.1, 0.4))
    errs, olds = [], []
    for epoch_seed in range(20):
        (img_c, u_c), _, _ = UInt8Dataset(cached, [0], aug)[(epoch_seed, 0)]
        (img_f, u_f), _, _ = UInt8Dataset(as_file, [0], aug)[(epoch_seed, 0)]
        assert u_c.shape[0] == aug.n_uniforms + 2 and u_f.shape[0] == aug.n_uniforms  # + the source size
        assert torch.equal(u_c[:aug.n_uniforms], u_f)
        crops_c = aug(img_c[None], u_c[None])
        crops_f = aug(img_f[None], u_f[None])
        crops_old = aug(img_c[None], u_c[None, :aug.n_uniforms])  # before: boxes drawn on the square
        errs += [(a - b).abs().mean().item() for a, b in zip(crops_c, crops_f)]
        olds += [(a - b).abs().mean().item() for a, b in zip(crops_old, crops_f)]
    assert np.mean(errs) < 0.08, np.mean(errs)  # normalised units (1 = 0.23 of the grey range)
    assert np.mean(olds) > 3 * np.mean(errs), (np.mean(olds), np.mean(errs))


def test_dino_pretrains_at_the_size_cass_pretrains_and_finetune_fine_tunes():
    dino, cass, ft = pretrain_dino.get_args([]), pretrain_cass.get_args([]), finetune.get_args([])
    assert dino.img_size == cass.img_size == ft.img_size == 384
    for prof in (P.PAPER, P.QUICK, P.CPU):  # run_all's profiles: the same size for every method
        sizes = {script: getattr(script.get_args(list(args)), "img_size")
                 for script, args in ((pretrain_dino, prof.dino_args), (pretrain_cass, prof.cass_args),
                                      (finetune, prof.ft_args))}
        assert len(set(sizes.values())) == 1, (prof.name, sizes)
