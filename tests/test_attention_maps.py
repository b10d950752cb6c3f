"""Attention extraction on a tiny ViT (random init, 32 px) and feature-map extraction on a ResNet-18:
shapes, softmax rows, dependence on the input, fused attention (timm's default) handled; then the
CLI end to end on the synthetic data with weight files saved here."""

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import attention_maps as AM
from conftest import run_script
from models import create_backbone, save_weights


def tiny_vit(num_classes=6):
    torch.manual_seed(0)
    return create_backbone("test_vit", "random", num_classes=num_classes, img_size=32).eval()


def test_fused_attention_is_the_default_and_hides_attention_from_hooks():
    """The trap the module avoids: with fused attention on, a hook on attn_drop never fires."""
    model = tiny_vit()
    attn = model.blocks[-1].attn
    assert attn.fused_attn is True  # timm's default on this torch
    seen = []
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    h.remove()
    assert seen == []


def test_last_block_attention_is_a_softmax_and_fused_flag_is_restored():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    a = AM.last_block_attention(model, x)
    heads = model.blocks[-1].attn.num_heads
    assert a.shape == (2, heads, 5, 5)  # 1 CLS + 2 x 2 patches
    assert torch.isfinite(a).all() and (a >= 0).all() and a.abs().sum() > 0
    torch.testing.assert_close(a.sum(-1), torch.ones(2, heads, 5))
    assert model.blocks[-1].attn.fused_attn is True  # restored after the extraction
    # the extraction does not change what the model computes
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_cls_attention_shape_and_dependence_on_input():
    model = tiny_vit()
    x1, x2 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    m1, m2 = AM.cls_attention(model, x1), AM.cls_attention(model, x2)
    heads = model.blocks[-1].attn.num_heads
    assert m1.shape == (1, heads, 2, 2)  # (B, heads, grid, grid)
    assert (m1 > 0).all() and (m1.sum((-1, -2)) <= 1 + 1e-5).all()  # CLS -> patches: a part of a softmax row
    assert not torch.allclose(m1, m2)
    torch.testing.assert_close(AM.cls_attention(model, x1), m1)  # deterministic in eval mode
    up = AM.upsample(m1, (32, 32))
    assert up.shape == (1, heads, 32, 32)


def test_larger_grid_and_register_tokens():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", "random", num_classes=3, img_size=64).eval()
    assert AM.cls_attention(model, torch.randn(1, 3, 64, 64)).shape == (1, 3, 4, 4)
    reg = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, reg_tokens=4,
                            num_classes=3).eval()
    assert reg.num_prefix_tokens == 5
    m = AM.cls_attention(reg, torch.randn(2, 3, 32, 32))
    assert m.shape == (2, 2, 2, 2) and (m.sum((-1, -2)) < 1).all()


def test_feature_maps_five_stages_of_resnet18():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=6).eval()
    x = torch.randn(1, 3, 64, 64)
    fm = AM.feature_maps(model, x)
    assert [n for n, _ in fm] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert [a.shape[1] for _, a in fm] == [64, 64, 128, 256, 512]
    assert [a.shape[-1] for _, a in fm] == [32, 16, 8, 4, 2]
    convs = AM.feature_maps(model, x, "convs")
    assert len(convs) == 5 and convs[0][0] == "conv1" and all("conv" in n for n, _ in convs)
    assert not torch.allclose(fm[1][1], AM.feature_maps(model, torch.randn(1, 3, 64, 64))[1][1])


@pytest.mark.slow
def test_cli_writes_the_figures(tmp_path):
    vit, cnn = tiny_vit(), timm.create_model("test_resnet", num_classes=6)
    save_weights(vit, tmp_path / "sup_vit.safetensors")
    save_weights(create_backbone("test_vit", "random", img_size=32), tmp_path / "cass_vit.safetensors")
    save_weights(cnn, tmp_path / "sup_cnn.safetensors")
    save_weights(timm.create_model("test_resnet"), tmp_path / "cass_cnn.safetensors")  # 1000-class head, as CASS
    out = tmp_path / "figs"
    proc = run_script("attention_maps.py", "--data", "synthetic", "--img-size", 32, "--split-file",
                      tmp_path / "split.json", "--arch", "test_vit",
                      "--weights", tmp_path / "sup_vit.safetensors", "--compare", tmp_path / "cass_vit.safetensors",
                      "--cnn", "test_resnet", "--cnn-weights", tmp_path / "sup_cnn.safetensors",
                      "--cnn-compare", tmp_path / "cass_cnn.safetensors", "--n", 5, "--out", out, cwd=tmp_path)
    for name in ("fig3_attention_single.png", "fig7_attention_mean.png", "fig5_feature_map_stem.png",
                 "fig6_feature_maps.png", "maps_summary.json"):
        assert (out / name).stat().st_size > 100, name
    import json
    summary = json.loads((out / "maps_summary.json").read_text())
    assert summary["n"] == 5 and summary["attention_grid"] == [2, 2]
    assert set(summary["attention"]) == {"supervised", "CASS"}
    assert summary["feature_layers"] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert "supervised" in proc.stdout


@pytest.mark.slow
def test_cli_refuses_non_vit_and_missing_weights(tmp_path):
    proc = run_script("attention_maps.py", "--data", "synthetic", "--out", tmp_path, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--weights" in proc.stderr
    save_weights(timm.create_model("test_resnet", num_classes=6), tmp_path / "r.safetensors")
    proc = run_script("attention_maps.py", "--data", "synthetic", "--img-size", 32, "--split-file",
                      tmp_path / "split.json", "--arch", "test_resnet", "--weights", tmp_path / "r.safetensors",
                      "--n", 2, "--out", tmp_path, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "class token" in proc.stderr
