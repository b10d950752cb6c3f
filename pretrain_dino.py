"""DINO pretraining of one backbone, the paper's self-supervised baseline.

A student and a teacher of the same architecture (the teacher an exponential moving average of
the student) see different crops of each training image: the teacher only the two global crops,
the student all crops, and the student learns to match the teacher's centred, sharpened softmax
output (Caron et al., 2021). Defaults follow the official implementation (facebookresearch/dino,
main_dino.py), as the paper says its DINO runs did, with one exception that keeps the comparison with
CASS fair: the global crops are 384 px, the size CASS pretrains at and finetune.py fine-tunes at
(official: 224; --img-size 224 gives it). Multi-crop 2 x 384 px + 8 x 96 px, cut in each image's own
aspect ratio (also from the square decoded cache, see dino_crops.SourceCrop), a projection head of 65536
outputs, AdamW at 5e-4 x batch / 256 with 10 warm-up epochs and cosine decay, weight
decay 0.04 -> 0.4, teacher momentum 0.996 -> 1, teacher temperature 0.04, centre momentum 0.9,
last layer frozen for the first epoch, per-parameter gradient clipping at 3.0. Batch 16 and 100
epochs from ImageNet weights are the paper's settings.

    python pretrain_dino.py --data dermofit --data-root /data/dermofit --arch resnet50
    python pretrain_dino.py --data dermofit --data-root /data/dermofit --arch vit_base_patch16_384
    python pretrain_dino.py --data synthetic --arch resnet18 --init random --img-size 64 \\
        --local-size 32 --epochs 5                 # minutes on a laptop CPU

Training uses the training split only. The output folder holds config.json, log.csv (one row per
epoch, with its wall time for Table 2), backbone.safetensors (the TEACHER backbone, the one DINO
evaluates; loads into a timm model with any head through finetune.py --weights),
student_backbone.safetensors, and checkpoint.pt: rerunning the same command resumes from the last
finished epoch.
"""

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from datasets import load_data, load_table, write_skipped
from evaluation.monitors import (CollapseWarning, add_monitor_args, monitor_line, output_moments, output_spreads,
                                 plot_run)
from losses import DINOLoss
from models import (NORMS, apply_norm, count_params, create_backbone, is_transformer, save_weights, sync_batchnorm,
                    wrap_ddp)
from pipeline.dino_crops import dino_cache_size
from pipeline.loading import dino_pipeline, make_loader, use_gpu_aug
from runtime.cli import add_common_args, autocast, pick_device, run_cli, seed_everything
from runtime.distributed import all_reduce_sum, is_main, main_first, setup_distributed, world_size
from runtime.errors import UserError
from runtime.files import atomic_write_json
from runtime.runs import (CsvLog, TrainingGuard, check_out_dir, load_checkpoint, load_optimizer_state, prepare_out_dir,
                          restores_signal_handlers, resume_point, save_checkpoint, seed_epoch)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, bs=16, epochs=100, img_size=384, init="imagenet")
    g = p.add_argument_group("DINO model")
    g.add_argument("--arch", default="resnet50",
                   help="timm name of the backbone: resnet50 and vit_base_patch16_384 in the paper, any timm "
                        "model works (ViTs are built with dynamic_img_size so they take the local crops)")
    g.add_argument("--out-dim", type=int, default=65536,
                   help="output dimension K of the DINO head (official: 65536; smaller, e.g. 4096, is cheaper "
                        "and often enough on small data sets)")
    g.add_argument("--hidden-dim", type=int, default=2048, help="hidden width of the head's MLP (official: 2048)")
    g.add_argument("--bottleneck-dim", type=int, default=256,
                   help="width of the L2-normalised bottleneck before the last layer (official: 256)")
    g.add_argument("--head-bn", action="store_true",
                   help="BatchNorm in the head's MLP (official --use_bn_in_head; off by default)")
    g.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the norm of the weight-normalised last layer (official default: on; off can "
                        "work better for ViTs but makes training less stable)")
    g.add_argument("--norm", choices=NORMS, default="paper",
                   help="input normalisation: paper (ImageNet mean/std, as the paper) or model (the backbone's own "
                        "weights' mean/std, e.g. 0.5 / 0.5 for timm's vit_base_patch16_384). Recorded in "
                        "config.json; finetune.py and attention_maps.py follow it")
    g.add_argument("--drop-path-rate", type=float, default=None,
                   help="stochastic depth of the STUDENT backbone (the teacher has none); default 0.1 for "
                        "Transformers (official), 0 for CNNs")
    g = p.add_argument_group("DINO multi-crop (global crops are --img-size px: 384 by default, the size CASS "
                             "pretrains and finetune.py fine-tunes at; official DINO: 224)")
    g.add_argument("--global-scale", type=float, nargs=2, default=[0.4, 1.0], metavar=("MIN", "MAX"),
                   help="area fraction of the global crops (official: 0.4 1; its ResNet-50 recipe: 0.14 1)")
    g.add_argument("--local-crops", type=int, default=8,
                   help="number of local crops (official: 8; 0 trains on the two global crops only; each "
                        "local crop adds a student forward/backward at --local-size px)")
    g.add_argument("--local-size", type=int, default=96, help="size of the local crops in px (official: 96)")
    g.add_argument("--local-scale", type=float, nargs=2, default=[0.05, 0.4], metavar=("MIN", "MAX"),
                   help="area fraction of the local crops (official: 0.05 0.4; its ResNet-50 recipe: 0.05 0.14)")
    g = p.add_argument_group("DINO loss and teacher")
    g.add_argument("--momentum-teacher", type=float, default=0.996,
                   help="start of the teacher EMA momentum, raised to 1 by a cosine per iteration (official: "
                        "0.996 at batch 1024; its README advises a higher value for small batches, e.g. 0.9995 "
                        "at batch 256; at --bs 16 try 0.9995-0.9999 if training is unstable)")
    g.add_argument("--teacher-temp", type=float, default=0.04,
                   help="teacher temperature after the warm-up (official: 0.04; above 0.07 is usually unstable; "
                        "raise slightly if needed)")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04,
                   help="teacher temperature at the start of its linear warm-up (official: 0.04; lower it if the "
                        "loss does not decrease)")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=0,
                   help="epochs of the teacher temperature warm-up (official default 0; its stronger ViT-S "
                        "recipe: --warmup-teacher-temp 0.04 --teacher-temp 0.07 over 30 epochs)")
    g.add_argument("--student-temp", type=float, default=0.1, help="student temperature (official: 0.1)")
    g.add_argument("--center-momentum", type=float, default=0.9, help="momentum of the teacher centre (official: 0.9)")
    g = p.add_argument_group("DINO optimisation")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw (official default) or sgd (momentum 0.9; the official ResNet-50 recipe: "
                        "--optimizer sgd --lr 0.03 --weight-decay 1e-4 --weight-decay-end 1e-4)")
    g.add_argument("--lr", type=float, default=5e-4,
                   help="learning rate at batch 256: the peak rate is lr * bs / 256 (linear scaling rule, official: "
                        "5e-4, so 3.1e-5 at --bs 16)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine learning rate decay (official: 1e-6)")
    g.add_argument("--warmup-epochs", type=int, default=10,
                   help="linear learning rate warm-up from 0, in epochs (official: 10); cut to --epochs when "
                        "longer (the run is then all warm-up)")
    g.add_argument("--weight-decay", type=float, default=0.04,
                   help="weight decay at the start of its cosine schedule (official: 0.04); biases and norm "
                        "parameters (ndim <= 1) are never decayed")
    g.add_argument("--weight-decay-end", type=float, default=0.4, help="weight decay at the end (official: 0.4)")
    g.add_argument("--clip-grad", type=float, default=3.0,
                   help="maximal gradient norm of EACH parameter tensor, as official DINO (0 disables)")
    g.add_argument("--freeze-last-layer", type=int, default=1,
                   help="epochs during which the head's last layer is kept fixed (official: 1; raise it if the "
                        "loss does not decrease early on)")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbones (CUDA; slow first epoch)")
    g.add_argument("--cache-size", type=int, default=None,
                   help="size of the decoded-image cache the crops are cut from (image files only; default: "
                        "large enough that the smallest crops of either kind are not enlarged, "
                        "max(img-size / sqrt(min global scale), local-size / sqrt(min local scale)) rounded up "
                        "to 32: 448 px at 224 / 96 px; 608 px at 384 px. Only the training split is cached)")
    g.add_argument("--limit-train", type=int, default=0,
                   help="use only the first N training images (smoke tests and quick looks)")
    add_monitor_args(p)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"runs/dino/{args.data}-{args.arch}-bs{args.bs}-ep{args.epochs}-seed{args.seed}"
    for flag in ("out_dim", "hidden_dim", "bottleneck_dim", "local_size", "img_size", "bs", "epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.momentum_teacher <= 1 or not 0 <= args.center_momentum <= 1:
        raise UserError("--momentum-teacher and --center-momentum must lie in [0, 1]")
    if min(args.teacher_temp, args.warmup_teacher_temp, args.student_temp) <= 0:
        raise UserError("temperatures must be positive")
    return args


# ---------------------------------------------------------------- model: backbone + DINO head

class WeightNormLinear(nn.Module):
    """Linear(in_dim, out_dim, bias=False) whose weight is g * v / ||v|| row by row: the same
    function and parameters (weight_g, weight_v) as nn.utils.weight_norm(nn.Linear(...)), which
    official DINO uses, written out because torch deprecates that helper."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone()  # nn.Linear's default init
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def weight(self):
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x):
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """Official DINO head: MLP in -> hidden -> hidden -> bottleneck (GELU), L2 normalisation, then a
    weight-normalised Linear(bottleneck -> out_dim, no bias) whose norm is frozen at 1 when
    norm_last_layer (the default)."""

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, use_bn=False,
                 norm_last_layer=True, nlayers=3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropNet(nn.Module):
    """Backbone + head over a list of crops (official MultiCropWrapper): consecutive crops of the same
    size go through the backbone as one batch, the features are concatenated crop-major, then the head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        object.__setattr__(self, "_backbone_fn", None)  # a compiled backbone, kept out of the state dict

    def compile_backbone(self):
        object.__setattr__(self, "_backbone_fn", torch.compile(self.backbone))

    def forward(self, crops):
        if torch.is_tensor(crops):
            crops = [crops]
        fn = self.backbone if self._backbone_fn is None else self._backbone_fn
        feats, i = [], 0
        while i < len(crops):
            j = i + 1
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            x = torch.cat(crops[i:j]) if j - i > 1 else crops[i]
            feats.append(fn(x))
            i = j
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])


def create_dino_backbone(arch, init, img_size, **kwargs):
    """A timm backbone giving pooled features (num_classes=0). Models that know dynamic_img_size
    (ViTs) get it so they accept the local crops; others (CNNs) take any size anyway."""
    try:
        return create_backbone(arch, init, num_classes=0, img_size=img_size, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise UserError(f"--arch {arch}: {e}") from None
    try:
        return create_backbone(arch, init, num_classes=0, img_size=img_size, **kwargs)
    except TypeError as e:
        raise UserError(f"--arch {arch}: {e}") from None


def build_models(args, device):
    """Student and teacher (MultiCropNet each). The teacher starts as an exact copy of the student,
    without drop path, and never receives gradients."""
    teacher_bb = create_dino_backbone(args.arch, args.init, args.img_size)
    dpr = args.drop_path_rate if args.drop_path_rate is not None else (0.1 if is_transformer(teacher_bb) else 0.0)
    if dpr > 0:
        student_bb = create_dino_backbone(args.arch, "random", args.img_size, drop_path_rate=dpr)
        student_bb.load_state_dict(teacher_bb.state_dict())
    else:
        student_bb = copy.deepcopy(teacher_bb)
    in_dim = teacher_bb.num_features
    head = DINOHead(in_dim, args.out_dim, args.hidden_dim, args.bottleneck_dim, args.head_bn, args.norm_last_layer)
    student = MultiCropNet(student_bb, head).to(device)
    teacher = MultiCropNet(teacher_bb, copy.deepcopy(head)).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, dpr


# ---------------------------------------------------------------- schedules and the training step

def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """One value per global iteration, as official DINO's utils.cosine_scheduler: a linear warm-up
    from start_warmup_value over warmup_epochs, then a cosine from base_value to final_value.
    A warm-up longer than the run is cut to the run's length."""
    warmup_iters = min(warmup_epochs, epochs) * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def param_groups(model: nn.Module):
    """Official DINO: weight decay on every trainable parameter except biases and norm parameters
    (names ending in .bias or ndim <= 1). Group 0 is decayed (its decay follows the schedule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(kind, groups, device):
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)  # lr and decay are set by the schedules
    return torch.optim.AdamW(groups, lr=0.0, fused=device.type == "cuda")


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float):
    """Official DINO's clipping: each parameter's gradient scaled to norm <= clip on its own
    (factor clip / (norm + 1e-6) when below 1). No host synchronisation."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    coefs = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)  # a factor of 1 leaves a gradient bit-identical
    torch._foreach_mul_(grads, coefs)


def cancel_last_layer_grads(model: nn.Module):
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None  # the optimiser then skips it, weight decay included


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float):
    """teacher <- m * teacher + (1 - m) * student, over parameters (buffers such as BatchNorm
    statistics stay the teacher's own, as in official DINO)."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def train_step(crops, student, teacher, loss_fn, optimizer, *, epoch, lr, wd, momentum, clip_grad,
               freeze_last_layer, device, moments=None):
    """One DINO iteration: set lr and weight decay, teacher forward on the 2 global crops, student
    forward on all crops, loss, backward, per-parameter clipping, last layer frozen during the first
    `freeze_last_layer` epochs, optimiser step, then the teacher's EMA update.
    Returns (loss, stats) as device tensors (no host sync). `moments` (a dict), if given, gets the
    running sums of the teacher's normalised outputs (monitors.output_moments: the collapse signal)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:  # only the first group is regularised
            group["weight_decay"] = wd
    crops = [c.to(device, non_blocking=True) for c in crops]
    if device.type == "cuda" and is_cnn_input(student):
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    with autocast(device):
        with torch.no_grad():
            teacher_out = teacher(crops[:2])  # only the 2 global views pass through the teacher
        student_out = student(crops)
    loss, stats = loss_fn(student_out, teacher_out, epoch, return_stats=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        clip_gradients(student, clip_grad)
    if epoch < freeze_last_layer:
        cancel_last_layer_grads(student)
    optimizer.step()
    ema_update(teacher, student, momentum)
    if moments is not None:
        output_moments(moments, "teacher", teacher_out)
    return loss.detach(), stats


def wrap_and_compile(student: nn.Module, teacher: nn.Module, device, compile: bool) -> nn.Module:
    """The student as the training step calls it: in DistributedDataParallel under torchrun (gradients
    averaged over the processes), then, with --compile, compiled as a whole, DDP included (PyTorch's
    guidance: DDP first, then compile, so that TorchDynamo splits the graph at DDP's gradient buckets
    and the all-reduces overlap the backward pass; a backbone compiled inside DDP would hand DDP all
    its gradients at once, at the end of its backward). The teacher, never wrapped, gets its backbone
    compiled. In a single process the student's backbone alone is compiled, as the teacher's."""
    fwd_student = wrap_ddp(student, device)
    if compile:
        teacher.compile_backbone()
        if fwd_student is student:
            student.compile_backbone()
        else:
            fwd_student = torch.compile(fwd_student)
    return fwd_student


def is_cnn_input(model):
    return not is_transformer(model)  # (the backbone, also of a DDP-wrapped or compiled student: models.backbone_of)


# ---------------------------------------------------------------- main

@restores_signal_handlers  # (called from Python: SIGTERM / Ctrl-C handled as before it, after)
def main(argv=None):
    args = get_args(argv)
    device = setup_distributed(pick_device(args.device), args.dist_timeout)  # torchrun: one process per GPU (or CPU process)
    config = dict(vars(args))
    out = check_out_dir(args.out, config, args.force)  # another run's folder: refused before any work

    # ---- data: the training split only (Appendix C.5.1), decoded once at a size the crops can cut from
    cache_size = args.cache_size or dino_cache_size(args.img_size, args.local_size, args.global_scale,
                                                    args.local_scale)
    with main_first():  # rank 0 first: it writes the split file and the decoded cache
        table, split = load_data(args, cache_size=cache_size, cache_part="train")
    gpu = use_gpu_aug(args, device, table)
    rows = split["train"][: args.limit_train] if args.limit_train else split["train"]
    if args.bs > len(rows):
        raise UserError(f"--bs {args.bs} is larger than the training set ({len(rows)} images)")
    train_set, prepare = dino_pipeline(table, rows, args, device, gpu)  # --gpu-aug: crops cut on the device
    steps_per_epoch = len(rows) // args.bs  # drop_last=True, as official DINO

    # ---- student, teacher, loss, optimiser, schedules
    seed_everything(args.seed)
    student, teacher, dpr = build_models(args, device)
    student, teacher = sync_batchnorm(student, device), sync_batchnorm(teacher, device)  # torchrun: global statistics
    mean_std = [apply_norm(net.backbone, args.norm) for net in (student, teacher)][0]  # --norm model: its own
    if device.type == "cuda" and is_cnn_input(student):
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    ncrops = 2 + args.local_crops
    dino_loss = DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, args.student_temp,
                         args.center_momentum).to(device)
    optimizer = make_optimizer(args.optimizer, param_groups(student), device)
    peak_lr = args.lr * args.bs / 256.0  # linear scaling rule
    lr_schedule = cosine_scheduler(peak_lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    momentum_schedule = cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch)
    fwd_student = wrap_and_compile(student, teacher, device, args.compile)

    def train_state():  # what a checkpoint holds besides the epoch
        return {"elapsed": elapsed, "student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "dino_loss": dino_loss.state_dict()}

    # ---- output folder (written only now that the data and models are known to be good), resume
    with main_first():
        prepare_out_dir(out, config, args.force)
        write_skipped(out, table)
    start_epoch, elapsed, partial = 0, 0.0, None
    ckpt = load_checkpoint(out)
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        load_optimizer_state(optimizer, ckpt["optimizer"])  # (written on any device)
        dino_loss.load_state_dict(ckpt["dino_loss"])
        elapsed = float(ckpt.get("elapsed", 0.0))
        start_epoch, partial = resume_point(out, ckpt)
    log = CsvLog(out / "log.csv", keep_epochs_below=start_epoch)
    monitor = None
    if args.monitor and is_main():  # the evaluation view of the original images (the cache holds DINO's crop source)
        from evaluation.feature_monitors import Monitor
        monitor = Monitor(load_table(args.data, args.data_root, args.cache_dir), split, args.img_size, device,
                          args.monitor_bank, args.monitor_val, seed=args.seed)
    collapse = CollapseWarning(log.rows)
    if monitor is not None and start_epoch == 0 and partial is None:  # the start, drawn as epoch 0 in monitors.png
        atomic_write_json(out / "monitors_init.json", monitor.measure({"teacher": teacher.backbone}))

    print(f"DINO: {args.arch} ({count_params(student.backbone) / 1e6:.1f}M backbone + "
          f"{count_params(student.head) / 1e6:.1f}M head, drop path {dpr}), {len(rows)} training images of "
          f"{args.data}, 2 x {args.img_size} px + {args.local_crops} x {args.local_size} px crops, "
          f"{steps_per_epoch} steps/epoch, peak lr {peak_lr:.3g}, {args.epochs} epochs on {device}"
          f"{f' x {world_size()} processes' if world_size() > 1 else ''}, {'device' if gpu else 'CPU'} augmentation, "
          f"normalisation {'ImageNet' if args.norm == 'paper' else mean_std}, output {out}")

    t_run = time.perf_counter()
    max_entropy = math.log(args.out_dim)
    guard = TrainingGuard(out, device, train_state, partial,  # SIGTERM / Ctrl-C, NaN watch, mid-epoch resume
                          hint="try a lower --lr, a higher --momentum-teacher or --clip-grad")
    for epoch in range(start_epoch, args.epochs):
        loader = make_loader(train_set, args.bs, shuffle=True, workers=args.workers, drop_last=True,
                             generator=seed_epoch(args.seed, epoch), device=device, shard=True,
                             skip_batches=guard.skip)  # (resuming in an epoch: its first batches are done)
        student.train(), teacher.train()  # as official DINO (a BatchNorm teacher uses batch statistics)
        # loss, teacher entropy, teacher KL to mean, student KL; sums of the teacher's normalised outputs and
        # their squares (collapse signal)
        s = guard.start_epoch(epoch, {"sums": torch.zeros(4, device=device), "moments": {}})
        sums, moments = s["sums"], s["moments"]
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True, disable=None,
                   initial=guard.skip, total=guard.skip + len(loader))  # (no bar when stderr is a file)
        for step, (crops, _, _) in enumerate(bar, start=guard.skip):
            it = epoch * steps_per_epoch + step  # global iteration
            crops = prepare(crops)  # to the device; --gpu-aug: cut and augmented there
            loss, st = train_step(crops, fwd_student, teacher, dino_loss, optimizer, epoch=epoch,
                                  lr=float(lr_schedule[it]), wd=float(wd_schedule[it]),
                                  momentum=float(momentum_schedule[it]), clip_grad=args.clip_grad,
                                  freeze_last_layer=args.freeze_last_layer, device=device, moments=moments)
            sums += torch.stack([loss, st["teacher_entropy"], st["teacher_kl_to_mean"], st["student_kl"]])
            guard.step(loss, step, bar)
        guard.end_epoch()
        mean = (all_reduce_sum(sums) / (steps_per_epoch * world_size())).tolist()  # torchrun: over every process
        for s in moments.values():
            all_reduce_sum(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = guard.seconds()
        elapsed += seconds
        last = (epoch + 1) * steps_per_epoch - 1
        n_img = steps_per_epoch * args.bs
        row = {"epoch": epoch, "loss": mean[0], "lr": float(lr_schedule[last]), "wd": float(wd_schedule[last]),
               "teacher_temp": dino_loss.teacher_temp(epoch), "momentum": float(momentum_schedule[last]),
               "seconds": seconds, "total_seconds": elapsed, "img_per_s": n_img / seconds,
               "teacher_entropy": mean[1], "teacher_kl_to_mean": mean[2], "student_kl": mean[3],
               "max_entropy": max_entropy}
        row.update(output_spreads(moments, 2 * n_img * world_size()))  # the teacher sees 2 global crops an image
        if monitor is not None:  # the teacher's backbone (what is saved): spread, effective rank, online k-NN
            row.update(monitor.measure({"teacher": teacher.backbone}))
        collapse.check(row, epoch, tqdm.write)
        log.append(row)
        save_checkpoint(out, {**train_state(), "epoch": epoch})
        tqdm.write(f"epoch {epoch + 1}/{args.epochs} loss {mean[0]:.4f} teacher entropy {mean[1]:.3f} "
                   f"(max {max_entropy:.2f}) kl_to_mean {mean[2]:.3f} {seconds:.1f}s {row['img_per_s']:.1f} img/s"
                   + (f" | {monitor_line(row)}" if monitor is not None else ""))
        guard.stop_if_asked()  # a signal during the epoch's end: its checkpoint is already saved

    # ---- final weights: the teacher's backbone (what DINO evaluates) and the student's
    save_weights(teacher.backbone, out / "backbone.safetensors")
    save_weights(student.backbone, out / "student_backbone.safetensors")
    if is_main():
        plot_run(out)
    print(f"done: {args.epochs} epochs, {elapsed:.0f}s of training ({time.perf_counter() - t_run:.0f}s this "
          f"session); teacher backbone {out / 'backbone.safetensors'}, log {out / 'log.csv'}")


if __name__ == "__main__":
    run_cli(main)
