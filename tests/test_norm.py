"""--norm paper|model: each backbone sees the augmented view normalised with its own weights'
mean/std (models.apply_norm), recorded in config.json and followed by finetune.py and
attention_maps.py for weights from such a run; --norm paper (the default) changes nothing."""

import json

import pytest
import torch

import attention_maps
from conftest import run_script
from evaluation.feature_monitors import pooled_features
from models import apply_norm, create_backbone, model_mean_std
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD


def imagenet_normalised(x01):
    return (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def n_hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_model_norm_feeds_the_vit_its_own_normalisation_through_every_entry_point():
    vit = create_backbone("vit_tiny_patch16_224", "random", num_classes=0, img_size=32).eval()
    assert model_mean_std(vit) == ((0.5,) * 3, (0.5,) * 3)  # timm's augreg weights
    x01 = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vit((x01 - 0.5) / 0.5)  # what the ViT's own pipeline would feed it
        assert (vit(imagenet_normalised(x01)) - want).abs().max() > 1e-2  # the paper's input is another
        assert apply_norm(vit, "model") == ((0.5,) * 3, (0.5,) * 3)
        for got in (vit(imagenet_normalised(x01)), pooled_features(vit, imagenet_normalised(x01))):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_paper_norm_and_imagenet_models_get_no_hook():
    x = torch.randn(2, 3, 32, 32)
    for arch, norm in (("vit_tiny_patch16_224", "paper"), ("resnet18", "paper"), ("resnet18", "model")):
        m = create_backbone(arch, "random", num_classes=0, img_size=32).eval()
        with torch.no_grad():
            before = m(x)
            apply_norm(m, norm)
            assert n_hooks(m) == 0 and torch.equal(m(x), before), (arch, norm)
    with pytest.raises(Exception, match="--norm"):
        apply_norm(m, "imagenet")


SMALL = ["--data", "synthetic", "--cnn", "resnet18", "--vit", "test_vit", "--img-size", "32",
         "--init", "random", "--workers", "0", "--bs", "16", "--epochs", "1", "--limit-train", "32", "--no-monitor"]


@pytest.mark.slow
def test_norm_model_is_recorded_and_followed_by_finetune_and_attention_maps(tmp_path):
    proc = run_script("pretrain_cass.py", *SMALL, "--norm", "model", "--out", "model", cwd=tmp_path)
    assert "normalisation per arm" in proc.stdout and "(0.5, 0.5, 0.5)" in proc.stdout
    assert json.loads((tmp_path / "model" / "config.json").read_text())["norm"] == "model"
    paper = run_script("pretrain_cass.py", *SMALL, "--out", "paper", cwd=tmp_path)
    assert "ImageNet normalisation" in paper.stdout
    ft = ["finetune.py", "--data", "synthetic", "--arch", "test_vit", "--img-size", "32", "--eval", "knn",
          "--workers", "0"]
    for run, flags, want in (("model", [], "model"), ("paper", [], "paper"), ("model", ["--norm", "paper"], "paper")):
        out = f"ft-{run}-{want}"
        proc = run_script(*ft, "--weights", tmp_path / run / "vit.safetensors", *flags, "--out", out, cwd=tmp_path)
        assert json.loads((tmp_path / out / "config.json").read_text())["norm"] == want
        assert f"(--norm {want})" in proc.stdout
    m = attention_maps.load_model("test_vit", tmp_path / "model" / "vit.safetensors", 32)
    assert n_hooks(m) == 1
    assert n_hooks(attention_maps.load_model("test_vit", tmp_path / "paper" / "vit.safetensors", 32)) == 0
    assert n_hooks(attention_maps.load_model("resnet18", tmp_path / "model" / "cnn.safetensors", 32)) == 0
