"""The CUDA and torchrun paths, checked on the CPU (issue 29): what each path decides and builds,
with the CUDA calls stood in for where a GPU would be needed. Fast: no training run."""

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d

import models

CUDA = torch.device("cuda")  # (a device object only: nothing here runs on it)


# ---------------------------------------------------------------- 1. synchronised BatchNorm

@pytest.mark.parametrize("device", [CUDA, torch.device("cpu")])
def test_sync_batchnorm_keeps_the_activations_of_timm_batchnormact(monkeypatch, device):
    """test_efficientnet's BatchNorm layers are timm's BatchNormAct2d (BatchNorm + SiLU in one module):
    converted for torchrun, on CUDA (timm's conversion) as on the CPU (cpu_sync_batchnorm), the model
    computes the same function in eval mode, with the same parameters."""
    monkeypatch.setattr(models, "world_size", lambda: 2)
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=5).eval()
    assert sum(isinstance(m, BatchNormAct2d) for m in model.modules()) > 0
    for m in model.modules():  # running statistics away from (0, 1), so that every layer matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    params = {n: p for n, p in model.named_parameters()}
    converted = models.sync_batchnorm(model, device)
    with torch.no_grad():
        after = converted(x)
    assert torch.equal(before, after)
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "BatchNormAct2d" not in kinds and ("SyncBatchNormAct" in kinds or "CpuSyncBatchNormAct" in kinds)
    assert {n: p for n, p in converted.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in converted.named_parameters())  # the same tensors: optimisers still fit
