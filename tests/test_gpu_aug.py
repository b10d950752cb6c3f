"""gpu_aug.py, run on CPU tensors: the device path draws its parameters from the same distributions
as the CPU path's torchvision transforms (recorded from the real chain), its pixel operations are
torchvision's tensor operations, it is the identity (resize + normalise) when every probability is
0, and the loader side yields uint8 images with per-image random numbers seeded by (epoch, row)."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy.stats import ks_2samp
from torchvision import transforms as T

import datasets as D
import gpu_aug as G

N = 2000


@pytest.fixture(scope="module")
def draws():
    cpu = G.record_cass_cpu_params(N, size=32, seed=0)
    u = torch.stack([G.uniforms(D.item_seed(7, i), G.CASS_UNIFORMS) for i in range(N)])
    dev = G.cass_params(u, 32, 32)
    return cpu, dev


def test_application_rates_match(draws):
    cpu, dev = draws
    # torchvision: RandomApply p=0.3 (x2), RandomPerspective p=0.5 inside the first, flips p=0.3
    nominal = {"apply1": 0.3, "persp": 0.15, "apply2": 0.3, "vflip": 0.3, "hflip": 0.3}
    for key, p in nominal.items():
        a, b = cpu[key].mean().item(), dev[key].float().mean().item()
        assert abs(a - p) < 0.04 and abs(b - p) < 0.04 and abs(a - b) < 0.05, (key, a, b)


def test_jitter_factors_and_order_match(draws):
    cpu, dev = draws
    for k in ("1", "2"):
        c = cpu["f" + k]  # only the applied draws were recorded
        d = dev["f" + k][dev["apply" + k]]
        for j in range(3):  # brightness, contrast, saturation: U(0.8, 1.2)
            for x in (c[:, j], d[:, j]):
                assert 0.8 <= x.min() < 0.82 and 1.18 < x.max() <= 1.2
            assert ks_2samp(c[:, j].numpy(), d[:, j].numpy()).pvalue > 1e-3
        # the order of the four operations is a uniform permutation: where brightness goes
        for order in (cpu["order" + k], dev["order" + k][dev["apply" + k]].double()):
            pos = (order == 0).double().argmax(1)
            freq = torch.bincount(pos.long(), minlength=4).double() / len(pos)
            assert torch.all((freq - 0.25).abs() < 0.06), freq


def test_rotation_angles_match(draws):
    cpu, dev = draws
    c, d = cpu["angle"], dev["angle"][dev["apply2"]]
    for x in (c, d):
        assert -10 <= x.min() < -9.5 and 9.5 < x.max() <= 10
        assert abs(x.mean()) < 0.6 and abs(x.std() - 20 / 12 ** 0.5) < 0.4
    assert ks_2samp(c.numpy(), d.numpy()).pvalue > 1e-3


def test_perspective_corners_match(draws):
    cpu, dev = draws
    c, d = cpu["endpoints"], dev["endpoints"][dev["persp"]]
    assert c.shape[1:] == d.shape[1:] == (4, 2)
    # each corner coordinate: the same integer range (torchvision's randint bounds) and mean
    assert torch.equal(c.amin(0), d.amin(0)) and torch.equal(c.amax(0), d.amax(0))
    assert torch.all((c.mean(0) - d.mean(0)).abs() < 0.35)


def test_pixel_operations_are_torchvision_tensor_ops():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24)
    S = 24
    sp = [[0, 0], [S - 1, 0], [S - 1, S - 1], [0, S - 1]]
    ep = [[2, 1], [S - 2, 2], [S - 3, S - 1], [1, S - 2]]
    coeffs = G.perspective_coeffs(torch.tensor([sp], dtype=torch.float64), torch.tensor([ep], dtype=torch.float64))
    ref = TF.perspective(x[:1], sp, ep, T.InterpolationMode.BILINEAR, fill=None)
    assert torch.allclose(G.perspective(x[:1], coeffs), ref, atol=1e-5)
    ref = TF.affine(x[:1], 7.5, [0, 0], 1.0, [0.0, 0.0], T.InterpolationMode.NEAREST, fill=None)
    assert torch.allclose(G.rotate(x[:1], torch.tensor([7.5])), ref, atol=1e-6)
    f = torch.tensor([0.7, 1.3])
    for name in ("brightness", "contrast", "saturation"):
        ref = torch.cat([getattr(TF, f"adjust_{name}")(x[i:i + 1], float(f[i])) for i in range(2)])
        assert torch.allclose(getattr(G, f"adjust_{name}")(x, f), ref, atol=1e-6), name
    h = torch.tensor([0.07, -0.05])
    ref = torch.cat([TF.adjust_hue(x[i:i + 1], float(h[i])) for i in range(2)])
    assert torch.allclose(G.adjust_hue(x, h), ref, atol=1e-5)
    ref = TF.gaussian_blur(x[:1], [7, 7], [1.3, 1.3])
    assert torch.allclose(G.gaussian_blur(x[:1], torch.tensor([1.3]), 7), ref, atol=1e-5)


def test_identity_when_every_probability_is_zero():
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    u = torch.rand(4, G.CASS_UNIFORMS, dtype=torch.float64)
    zero = dict(apply1=0, persp=0, apply2=0, vflip=0, hflip=0, blur=0, solar=0)
    out = G.CassGpuAugment(32, extra=("blur", "solarize"), probs=zero)(imgs, u)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    # exactly ToTensor + Normalize (ImageNet statistics) of the same images, as the CPU eval transform
    ref = torch.stack([D.eval_transform(32)(D.array_to_rgb(a)) for a in imgs.numpy()])
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(out, G.Normalize(32)(imgs))


def test_every_operation_applied_keeps_shape_range_and_normalisation():
    imgs = torch.full((3, 40, 40, 3), 128, dtype=torch.uint8)
    u = torch.rand(3, G.CASS_UNIFORMS, dtype=torch.float64)
    one = dict(apply1=1, persp=1, apply2=1, vflip=1, hflip=1, blur=1, solar=1)
    out = G.CassGpuAugment(32, extra=("blur", "solarize"), probs=one)(imgs, u)  # also resizes 40 -> 32
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()
    mean = torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    pix = out * std + mean  # back to [0, 1]
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5
    # grayscale input: also handled (channel repeated)
    gray = G.CassGpuAugment(16)(torch.zeros(2, 16, 16, dtype=torch.uint8), u[:2])
    assert gray.shape == (2, 3, 16, 16)


def test_dino_crops_match_random_resized_crop():
    H = W = 64
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, H, W), [0.05, 0.4], [3 / 4, 4 / 3])
                    for _ in range(N)], dtype=np.float64)
    u = torch.rand(N, 40, dtype=torch.float64)
    box = G.rrc_boxes(u, H, W, (0.05, 0.4)).numpy()
    for b in (ref, box):  # top, left, height, width inside the image
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 0] + b[:, 2] <= H).all() and (b[:, 1] + b[:, 3] <= W).all()
    area = lambda b: b[:, 2] * b[:, 3] / (H * W)  # noqa: E731
    ratio = lambda b: b[:, 3] / b[:, 2]  # noqa: E731
    assert ks_2samp(area(ref), area(box)).pvalue > 1e-3
    assert ks_2samp(ratio(ref), ratio(box)).pvalue > 1e-3
    assert ks_2samp(ref[:, 0], box[:, 0]).pvalue > 1e-3


def test_dino_multicrop_shapes_and_rates():
    aug = G.DinoGpuMultiCrop(32, 16, 3)
    imgs = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8)
    u = torch.stack([G.uniforms(i, aug.n_uniforms) for i in range(4)])
    crops = aug(imgs, u)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    p = G.dino_crop_params(torch.rand(N, G.DINO_UNIFORMS_PER_CROP, dtype=torch.float64), 48, 48, (0.4, 1.0),
                           torch.full((N,), 0.1, dtype=torch.float64), torch.full((N,), 0.2, dtype=torch.float64))
    for key, want in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solar", 0.2)):
        assert abs(p[key].double().mean().item() - want) < 0.035, key
    for key, lo, hi in (("b", 0.6, 1.4), ("c", 0.6, 1.4), ("s", 0.8, 1.2), ("h", -0.1, 0.1), ("radius", 0.1, 2.0)):
        assert lo <= p[key].min() and p[key].max() <= hi, key


def test_uint8_dataset_is_seeded_by_epoch_and_row():
    table = D.ImageTable("t", [str(i) for i in range(6)], np.arange(6) % 2, ["a", "b"], False,
                         array=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    ds = G.UInt8Dataset(table, [4, 5], G.CASS_UNIFORMS)
    (img, u), y, row = ds[(3, 0)]
    assert img.dtype == torch.uint8 and img.shape == (8, 8, 3) and row == 4 and int(y) == 0
    assert torch.equal(img, torch.from_numpy(table.array[4]))
    assert torch.equal(u, G.uniforms(D.item_seed(3, 4), G.CASS_UNIFORMS))
    assert torch.equal(ds[(3, 0)][0][1], u) and not torch.equal(ds[(4, 0)][0][1], u)


def test_finetune_runs_with_the_cache_and_device_augmentation(tmp_path):
    """The whole --gpu-aug path of a script on the CPU: image files decoded once into the cache,
    uint8 batches from it, the CASS augmentations and the evaluation normalisation on the device."""
    import json
    import os

    from PIL import Image

    from conftest import run_script
    rng = np.random.default_rng(0)
    for c in range(3):
        d = tmp_path / "data" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(12):
            a = rng.integers(0, 60, (30, 40, 3)).astype(np.int32)
            a[..., c] += 150
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i}.jpg")
    cache = tmp_path / "cache"
    proc = run_script("finetune.py", "--data", "folder", "--data-root", tmp_path / "data", "--arch", "test_resnet",
                      "--init", "random", "--img-size", "32", "--bs", "8", "--epochs", "1", "--workers", "0",
                      "--gpu-aug", "--cache-dir", cache, "--out", "run", cwd=tmp_path)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["n_test"] > 0 and "f1_macro" in m
    assert [p for p in os.listdir(cache / "decoded") if p.endswith(".npy")], proc.stderr


def test_training_vits_use_fused_attention():
    """timm's fused attention (PyTorch SDPA: flash / memory-efficient kernels on CUDA) is on in the
    models the scripts train (attention_maps.py turns it off only in its own process)."""
    import timm.layers

    from models import create_backbone
    vit = create_backbone("vit_tiny_patch16_224", "random", img_size=32)
    assert timm.layers.use_fused_attn() and all(b.attn.fused_attn for b in vit.blocks)
