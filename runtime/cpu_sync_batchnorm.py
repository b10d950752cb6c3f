"""Synchronised BatchNorm for several CPU processes (torchrun with gloo), which torch's SyncBatchNorm
does not run on. Imported by models.sync_batchnorm only then; CUDA runs use nn.SyncBatchNorm."""

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from torch import nn

from runtime.distributed import world_size


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all processes, for the
    gloo backend (torch's SyncBatchNorm only runs on GPUs). Mean and variance are two-pass sums
    all-reduced with torch.distributed.nn's differentiable all_reduce, so the gradients are those of
    the single-process BatchNorm over the global batch. Outside training or a process group it is
    plain BatchNorm. Used by the CPU test of distributed training; CUDA runs use nn.SyncBatchNorm."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)
        dist.all_reduce(n)
        n = float(n.item())
        xf = x.float()
        mean = all_reduce(xf.sum(dims)) / n
        var = all_reduce(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)) * m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class CpuSyncBatchNormAct(CpuSyncBatchNorm):
    """CpuSyncBatchNorm followed by the dropout and activation of the timm BatchNormAct2d it replaces
    (timm's fused BatchNorm + activation of DenseNet, EfficientNet, MobileNet), as
    timm.layers.SyncBatchNormAct does on CUDA."""

    def __init__(self, *args, act: nn.Module, drop: nn.Module):
        super().__init__(*args)
        self.act, self.drop = act, drop

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def convert_to_cpu_sync_batchnorm(m: nn.Module) -> nn.Module:
    """Every BatchNorm layer of m replaced by a CpuSyncBatchNorm that keeps its parameters and buffers
    (the same tensors) and its training mode; a timm BatchNormAct2d by a CpuSyncBatchNormAct that
    also keeps its activation and dropout modules."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, CpuSyncBatchNorm):
        settings = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if isinstance(m, BatchNormAct2d):
            new = CpuSyncBatchNormAct(*settings, act=m.act, drop=m.drop)
        else:
            new = CpuSyncBatchNorm(*settings)
        if m.affine:
            new.weight, new.bias = m.weight, m.bias
        if m.track_running_stats:
            new.running_mean, new.running_var = m.running_mean, m.running_var
            new.num_batches_tracked = m.num_batches_tracked
        new.train(m.training)
        return new
    for name, child in m.named_children():
        setattr(m, name, convert_to_cpu_sync_batchnorm(child))
    return m
