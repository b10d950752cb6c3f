import time

import pytest
import timm
import torch

from models import create_backbone, save_weights
from runtime.errors import UserError
from runtime.weight_files import load_weights, read_state_dict

ARCHS = [("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": 32})]


def test_imagenet_init_offline_fails_fast_with_advice():
    t0 = time.time()
    with pytest.raises(UserError, match="--init random"):
        create_backbone("resnet18", "imagenet")
    assert time.time() - t0 < 30


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown timm model"):
        create_backbone("resnet9000", "random")


@pytest.mark.parametrize("name,kw", ARCHS)
def test_saved_weights_load_bit_identically_through_timm(tmp_path, name, kw):
    torch.manual_seed(0)
    model = create_backbone(name, "random", **kw)
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    again = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and through our own --init PATH
    mine = create_backbone(name, str(path), **kw)
    assert all(torch.equal(a[k], v) for k, v in mine.state_dict().items())


def test_new_head_is_the_only_part_reinitialised(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("resnet18", "random")
    save_weights(src, tmp_path / "w.safetensors")
    dst = create_backbone("resnet18", "random", num_classes=4)
    fresh = load_weights(dst, tmp_path / "w.safetensors")
    assert sorted(fresh) == ["fc.bias", "fc.weight"]
    for k, v in dst.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, src.state_dict()[k]), k


def test_headless_backbone_file_loads(tmp_path):
    src = create_backbone("resnet18", "random", num_classes=0)
    torch.save({"state_dict": {"backbone." + k: v for k, v in src.state_dict().items()}}, tmp_path / "b.pth")
    dst = create_backbone("resnet18", "random", num_classes=3)
    assert sorted(load_weights(dst, tmp_path / "b.pth")) == ["fc.bias", "fc.weight"]


def test_wrong_architecture_is_named(tmp_path):
    save_weights(create_backbone("resnet18", "random"), tmp_path / "r18.safetensors")
    with pytest.raises(UserError, match=r"does not fit .*missing"):
        load_weights(create_backbone("vit_tiny_patch16_224", "random", img_size=32), tmp_path / "r18.safetensors")
    save_weights(create_backbone("resnet34", "random"), tmp_path / "r34.safetensors")
    with pytest.raises(UserError, match="does not fit"):
        create_backbone("resnet18", str(tmp_path / "r34.safetensors"))


def test_not_a_weight_file(tmp_path):
    (tmp_path / "x.pth").write_text("hello")
    with pytest.raises(UserError, match="not a readable weight file"):
        read_state_dict(tmp_path / "x.pth")
    torch.save({"epochs": 3}, tmp_path / "y.pth")
    with pytest.raises(UserError, match="not a weight file"):
        read_state_dict(tmp_path / "y.pth")
    with pytest.raises(UserError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_vit_weights_move_to_another_image_size(tmp_path):
    save_weights(create_backbone("vit_tiny_patch16_224", "random", img_size=32), tmp_path / "v.safetensors")
    m = create_backbone("vit_tiny_patch16_224", str(tmp_path / "v.safetensors"), img_size=64)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
