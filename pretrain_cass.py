"""CASS pretraining: a CNN and a Transformer learn from each other without labels.

One augmented view of each training image goes through both arms; the loss is Equation 1 of the
paper, 2 - 2 cos(R, T), on their logits, and one backward pass updates both arms. Defaults are the
paper's recipe (Appendix C.5): ResNet-50 + ViT-B/16 at 384 px from ImageNet, batch 16, Adam 1e-3
for both arms, cosine annealing over 16 iterations down to 1e-6, SWA, 100 epochs.

    python pretrain_cass.py --data dermofit --data-root /data/dermofit --bs 16
    python pretrain_cass.py --data synthetic --cnn resnet18 --vit vit_tiny_patch16_224 \
        --img-size 64 --init random --epochs 5     # minutes on a laptop CPU

Rerunning the same command resumes from the last finished epoch in the output folder.
"""

import argparse
import time

import torch
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm import tqdm

from datasets import load_data, write_skipped
from evaluation.monitors import (CollapseWarning, add_monitor_args, monitor_line, output_moments, output_spreads,
                                 plot_run)
from losses import CASSLoss
from models import (NORMS, CassArm, MLPHead, apply_norm, count_params, create_backbone, in_layout, save_weights,
                    sync_batchnorm, uses_channels_last, wrap_ddp)
from pipeline.loading import cass_pipeline, make_loader, use_gpu_aug
from runtime.cli import add_common_args, autocast, pick_device, run_cli, seed_everything
from runtime.distributed import all_reduce_sum, is_main, main_first, setup_distributed, world_size
from runtime.errors import UserError
from runtime.files import atomic_save_safetensors, atomic_write_json
from runtime.runs import (CsvLog, TrainingGuard, check_out_dir, load_checkpoint, load_optimizer_state, prepare_out_dir,
                          restores_signal_handlers, resume_point, save_checkpoint, seed_epoch)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, bs=16, epochs=100, img_size=384, init="imagenet")
    g = p.add_argument_group("CASS")
    g.add_argument("--cnn", default="resnet50", help="timm name of arm 1 (a CNN in the paper; any timm "
                   "model works, e.g. densenet161 or swin_base_patch4_window12_384 for Tables 18-19)")
    g.add_argument("--vit", default="vit_base_patch16_384", help="timm name of arm 2 (a Transformer; "
                   "vit_large_patch16_384, deit_base_patch16_384 or densenet161 for the ablations)")
    g.add_argument("--cnn-init", default=None,
                   help="start of arm 1 if not --init's: imagenet, random or PATH (Tables 15/17: ResNet-200, "
                        "which has no ImageNet weights in timm, starts random beside an ImageNet ViT)")
    g.add_argument("--vit-init", default=None, help="start of arm 2 if not --init's: imagenet, random or PATH")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both arms (paper: 1e-3)")
    g.add_argument("--cnn-opt", choices=("adam", "sgd"), default="adam",
                   help="optimiser of arm 1; sgd (momentum 0.9, same lr) is the Table 10 ablation, which "
                        "cost the Transformer about 6 F1 points in the paper")
    g.add_argument("--t-max", type=int, default=16,
                   help="cosine annealing half-period in iterations (paper: 16); the rate then rises "
                        "again, a cosine wave of period 2 * t-max, as torch's CosineAnnealingLR does")
    g.add_argument("--min-lr", type=float, default=1e-6, help="minimum of the cosine schedule (paper: 1e-6)")
    g.add_argument("--sched-unit", choices=("step", "epoch"), default="step",
                   help="what one scheduler iteration is: 'step' (an optimiser step, as the paper's word "
                        "'iterations' and the authors' code have it) or 'epoch'")
    g.add_argument("--swa", action=argparse.BooleanOptionalAction, default=True,
                   help="stochastic weight averaging of both arms (torch.optim.swa_utils), averaged at the "
                        "end of every epoch from --swa-start on; BatchNorm statistics recomputed after")
    g.add_argument("--swa-start", type=float, default=0.75,
                   help="fraction of the epochs after which averaging starts (the paper does not say; "
                        "0.75 follows the SWA paper's practice of averaging the last quarter)")
    g.add_argument("--head-act", choices=("none", "softmax", "sigmoid"), default="none",
                   help="activation applied to the logits before the loss (Table 11); the paper uses none")
    g.add_argument("--extra-aug", default="",
                   help="comma-separated extra augmentations for the Table 9 ablation: blur, solarize")
    g.add_argument("--no-guard", dest="guard", action="store_false",
                   help="disable the collapse guard of Algorithm 1 (noise added when both arms' outputs "
                        "are identical; it never fires otherwise)")
    g.add_argument("--norm", choices=NORMS, default="paper",
                   help="input normalisation of each arm: paper (both ImageNet mean/std, as the paper) or model "
                        "(each backbone its own weights' mean/std, applied to the same augmented view; e.g. 0.5 / "
                        "0.5 for timm's vit_base_patch16_384, which then sees inputs about 2.2x smaller than with "
                        "paper). Recorded in config.json; finetune.py and attention_maps.py follow it")
    g.add_argument("--compile", action="store_true", help="torch.compile both arms (CUDA; slow first epoch)")
    o = p.add_argument_group("beyond the paper: options against collapse (all off by default; README 'Options "
                             "against collapse')")
    o.add_argument("--predictor", action="store_true",
                   help="a predictor MLP on each arm and a stop-gradient on the other arm's output, the loss "
                        "symmetrised: (D(p(R), sg(T)) + D(p(T), sg(R))) / 2 (SimSiam, Chen & He 2021; BYOL)")
    o.add_argument("--pred-hidden", type=int, default=512,
                   help="hidden width of the predictors (SimSiam: 512 for 2048-d outputs, a bottleneck)")
    o.add_argument("--projector", type=int, default=0, metavar="DIM",
                   help="compare DIM-d projections of the pooled features (MLP with BatchNorm, as BYOL) "
                        "instead of the 1000-d classifier logits; the arms are then saved without classifier")
    o.add_argument("--proj-hidden", type=int, default=2048, help="hidden width of the projectors (BYOL: 4096)")
    o.add_argument("--var-reg", type=float, default=0.0, metavar="W",
                   help="add W x VICReg's variance hinge (std of every output dimension at least 1) and "
                        "covariance penalty of each arm's outputs to Equation 1 (Bardes et al. 2022); try 1")
    o.add_argument("--cov-weight", type=float, default=0.04,
                   help="weight of the covariance penalty relative to the variance hinge in --var-reg "
                        "(VICReg's 1 / 25)")
    g.add_argument("--limit-train", type=int, default=0,
                   help="use only the first N training images (smoke tests and quick looks)")
    add_monitor_args(p)
    args = p.parse_args(argv)
    args.extra_aug = tuple(a for a in args.extra_aug.split(",") if a)
    for flag in ("projector", "pred_hidden", "proj_hidden"):
        if getattr(args, flag) < 0 or (flag != "projector" and getattr(args, flag) < 1):
            raise UserError(f"--{flag.replace('_', '-')} must be {'0 (off) or ' if flag == 'projector' else ''}"
                            "a positive width")
    if args.var_reg < 0 or args.cov_weight < 0:
        raise UserError("--var-reg and --cov-weight must be at least 0")
    if args.out is None:
        args.out = f"runs/cass/{args.data}-{args.cnn}-{args.vit}-bs{args.bs}-ep{args.epochs}-seed{args.seed}"
    return args


def make_optimizer(kind, params, lr, device):
    fused = device.type == "cuda"
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, fused=fused)


def cass_step(x, fwd_cnn, fwd_vit, criterion, opt_cnn, opt_vit, device):
    """One CASS iteration on the input batch x (on the device): both arms' forward passes under
    bf16 autocast (CUDA; an arm that is a CNN in channels_last, whichever arm it is:
    models.uses_channels_last), the loss, one backward pass into both arms, both optimiser steps.
    Returns (loss, guard fired, cnn output, vit output) as device tensors, no host sync. Under DDP,
    fwd_cnn / fwd_vit are the wrapped arms and the gradients are averaged. An arm with pretraining
    heads (models.CassArm) returns (output, predictor output or None)."""
    with autocast(device):
        r = fwd_cnn(in_layout(x, uses_channels_last(fwd_cnn, device)))
        t = fwd_vit(in_layout(x, uses_channels_last(fwd_vit, device)))
    (r, pr), (t, pt) = (r, t) if isinstance(r, tuple) else ((r, None), (t, None))
    loss, fired = criterion(r, t, pr, pt)
    opt_cnn.zero_grad(set_to_none=True)  # the authors' loop never zeroed the gradients
    opt_vit.zero_grad(set_to_none=True)
    loss.backward()
    opt_cnn.step(), opt_vit.step()
    return loss, fired, r, t


def swa_batchnorm(swa: AveragedModel, batches, device):
    """Recompute the BatchNorm statistics of an SWA average over `batches` (torch's update_bn) under
    the bf16 autocast of training on CUDA: the statistics of the activations the averaged weights
    meet in training and in evaluation (finetune.py and the monitors also run under autocast)."""
    with autocast(device):
        update_bn(batches, swa, device=device)


def has_batchnorm(model):
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@restores_signal_handlers  # (called from Python: SIGTERM / Ctrl-C handled as before it, after)
def main(argv=None):
    args = get_args(argv)
    device = setup_distributed(pick_device(args.device), args.dist_timeout)  # torchrun: one process per GPU (or CPU process)

    config = dict(vars(args))
    out = check_out_dir(args.out, config, args.force)  # another run's folder: refused before any work

    # ---- data: the training split only (Appendix C.5.1)
    with main_first():  # rank 0 first: it writes the split file and the decoded cache
        table, split = load_data(args)
    gpu = use_gpu_aug(args, device, table)
    rows = split["train"][: args.limit_train] if args.limit_train else split["train"]
    if args.bs > len(rows):
        raise UserError(f"--bs {args.bs} is larger than the training set ({len(rows)} images)")
    train_set, prepare = cass_pipeline(table, rows, args.img_size, args.extra_aug, device, gpu)
    drop_last = len(rows) % args.bs == 1  # a batch of one breaks BatchNorm in training mode
    steps_per_epoch = len(rows) // args.bs + (0 if drop_last or len(rows) % args.bs == 0 else 1)

    # ---- the two arms, their optimisers, schedules and SWA averages
    seed_everything(args.seed)
    cnn_init, vit_init = args.cnn_init or args.init, args.vit_init or args.init
    cnn = sync_batchnorm(create_backbone(args.cnn, cnn_init, img_size=args.img_size, flag="--cnn-init" if args.cnn_init
                                         else "--init"), device).to(device)
    vit = sync_batchnorm(create_backbone(args.vit, vit_init, img_size=args.img_size, flag="--vit-init" if args.vit_init
                                         else "--init"), device).to(device)
    if args.projector:  # the arms' pooled features feed the projectors: no classifier
        cnn.reset_classifier(0), vit.reset_classifier(0)
    arms = {}  # with options: each arm and its pretraining heads as one module (models.CassArm)
    if args.projector or args.predictor:
        seed_everything(args.seed + 1)  # the heads' own random start; the backbones' is unchanged
        for name, m in (("cnn", cnn), ("vit", vit)):
            d = args.projector or m.num_classes
            proj = MLPHead(m.num_features, args.proj_hidden, args.projector) if args.projector else None
            pred = MLPHead(d, args.pred_hidden, d) if args.predictor else None
            arms[name] = sync_batchnorm(CassArm(m, proj, pred), device).to(device)
        cnn, vit = arms["cnn"].backbone, arms["vit"].backbone  # (sync_batchnorm may have rebuilt them)
    norms = {"cnn": apply_norm(cnn, args.norm), "vit": apply_norm(vit, args.norm)}  # each arm's (mean, std)
    for arm in (cnn, vit):  # CNNs in channels_last on CUDA, whichever arm they are (e.g. --vit densenet161)
        if uses_channels_last(arm, device):
            arm.to(memory_format=torch.channels_last)
    arm_cnn, arm_vit = arms.get("cnn", cnn), arms.get("vit", vit)
    opt_cnn = make_optimizer(args.cnn_opt, arm_cnn.parameters(), args.lr, device)
    opt_vit = make_optimizer("adam", arm_vit.parameters(), args.lr, device)
    sched_cnn = torch.optim.lr_scheduler.CosineAnnealingLR(opt_cnn, T_max=args.t_max, eta_min=args.min_lr)
    sched_vit = torch.optim.lr_scheduler.CosineAnnealingLR(opt_vit, T_max=args.t_max, eta_min=args.min_lr)
    swa_cnn, swa_vit = AveragedModel(cnn), AveragedModel(vit)
    swa_start = min(args.epochs - 1, int(args.swa_start * args.epochs))
    criterion = CASSLoss(args.head_act, guard=args.guard, var_reg=args.var_reg, cov_weight=args.cov_weight)
    fwd_cnn, fwd_vit = wrap_ddp(arm_cnn, device), wrap_ddp(arm_vit, device)  # torchrun: gradients averaged
    if args.compile:
        fwd_cnn, fwd_vit = torch.compile(fwd_cnn), torch.compile(fwd_vit)

    def train_state():  # what a checkpoint holds besides the epoch
        return {"cnn": cnn.state_dict(), "vit": vit.state_dict(), "opt_cnn": opt_cnn.state_dict(),
                "opt_vit": opt_vit.state_dict(), "sched_cnn": sched_cnn.state_dict(),
                "sched_vit": sched_vit.state_dict(), "swa_cnn": swa_cnn.state_dict(), "swa_vit": swa_vit.state_dict(),
                **{f"heads_{k}": a.heads_state_dict() for k, a in arms.items()}}

    # ---- output folder (written only now that the data and models are known to be good), resume
    with main_first():
        prepare_out_dir(out, config, args.force)
        write_skipped(out, table)
    start_epoch, partial = 0, None
    ckpt = load_checkpoint(out)
    if ckpt is not None:
        for obj, key in ((cnn, "cnn"), (vit, "vit"), (sched_cnn, "sched_cnn"), (sched_vit, "sched_vit"),
                         (swa_cnn, "swa_cnn"), (swa_vit, "swa_vit")):
            obj.load_state_dict(ckpt[key])
        load_optimizer_state(opt_cnn, ckpt["opt_cnn"]), load_optimizer_state(opt_vit, ckpt["opt_vit"])  # (any device)
        for k, a in arms.items():
            a.load_state_dict(ckpt[f"heads_{k}"], strict=False)  # (the backbone's keys are loaded above)
        start_epoch, partial = resume_point(out, ckpt)
    log = CsvLog(out / "log.csv", keep_epochs_below=start_epoch)
    monitor = None
    if args.monitor and is_main():  # (rank 0 alone measures; the others go on)
        from evaluation.feature_monitors import Monitor
        monitor = Monitor(table, split, args.img_size, device, args.monitor_bank, args.monitor_val, seed=args.seed)
    collapse = CollapseWarning(log.rows)
    if monitor is not None and start_epoch == 0 and partial is None:  # the start, drawn as epoch 0 in monitors.png
        atomic_write_json(out / "monitors_init.json", monitor.measure({"cnn": cnn, "vit": vit}))

    print(f"CASS: {args.cnn} ({count_params(cnn) / 1e6:.1f}M, from {cnn_init}) + {args.vit} "
          f"({count_params(vit) / 1e6:.1f}M, from {vit_init}), "
          f"{len(rows)} training images of {args.data}, {steps_per_epoch} steps/epoch, "
          f"{args.epochs} epochs on {device}{f' x {world_size()} processes' if world_size() > 1 else ''}, "
          f"{'device' if gpu else 'CPU'} augmentation, "
          f"{'ImageNet normalisation' if args.norm == 'paper' else f'normalisation per arm {norms}'}, output {out}")

    t_run = time.perf_counter()
    guard = TrainingGuard(out, device, train_state, partial)  # SIGTERM / Ctrl-C, NaN watch, mid-epoch resume
    for epoch in range(start_epoch, args.epochs):
        loader = make_loader(train_set, args.bs, shuffle=True, workers=args.workers, drop_last=drop_last,
                             generator=seed_epoch(args.seed, epoch), device=device, shard=True,
                             skip_batches=guard.skip)  # (resuming in an epoch: its first batches are done)
        cnn.train(), vit.train()
        # loss sum, guard firings, samples; per-arm sums of normalised outputs and their squares (collapse signal)
        sums = guard.start_epoch(epoch, {"stats": torch.zeros(3, device=device), "moments": {}})
        stats, moments = sums["stats"], sums["moments"]
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True, disable=None,
                   initial=guard.skip, total=guard.skip + len(loader))  # (no bar when stderr is a file)
        for step, (x, _, _) in enumerate(bar, start=guard.skip):
            x = prepare(x)  # prepare: to the device; --gpu-aug: augmented there
            loss, fired, r, t = cass_step(x, fwd_cnn, fwd_vit, criterion, opt_cnn, opt_vit, device)
            if args.sched_unit == "step":
                sched_cnn.step(), sched_vit.step()
            with torch.no_grad():
                stats[0] += loss.detach() * len(x)
                stats[1] += fired
                stats[2] += len(x)
                output_moments(moments, "cnn", r), output_moments(moments, "vit", t)
            guard.step(loss, step, bar)
        if args.sched_unit == "epoch":
            sched_cnn.step(), sched_vit.step()
        guard.end_epoch()
        all_reduce_sum(stats)  # torchrun: sums over every process's share of the epoch
        for s in moments.values():
            all_reduce_sum(s)
        loss_sum, fired_n, n = stats.tolist()
        if args.swa and epoch >= swa_start:
            swa_cnn.update_parameters(cnn), swa_vit.update_parameters(vit)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = guard.seconds()
        row = {"epoch": epoch, "loss": loss_sum / n, "lr_cnn": opt_cnn.param_groups[0]["lr"],
               "lr_vit": opt_vit.param_groups[0]["lr"], "seconds": seconds, "img_per_s": n / seconds,
               "guard_fired": int(fired_n)}
        row.update(output_spreads(moments, n))  # spread of the normalised logits; 0 means collapse
        row["uniform_std"] = 1 / moments["cnn"].shape[1] ** 0.5  # what an even spread looks like
        if monitor is not None:  # pooled features: spread, effective rank, online k-NN (evaluation/monitors.py)
            row.update(monitor.measure({"cnn": cnn, "vit": vit}))
        collapse.check(row, epoch, tqdm.write)
        log.append(row)
        save_checkpoint(out, {**train_state(), "epoch": epoch})
        tqdm.write(f"epoch {epoch + 1}/{args.epochs} loss {row['loss']:.4g} cnn_std {row['cnn_std']:.4f} "
                   f"vit_std {row['vit_std']:.4f} {seconds:.1f}s {row['img_per_s']:.1f} img/s"
                   + (f" | {monitor_line(row)}" if monitor is not None else ""))
        guard.stop_if_asked()  # a signal during the epoch's end: its checkpoint is already saved

    # ---- final weights: SWA averages (BatchNorm statistics recomputed) and the last raw weights
    save_weights(cnn, out / "cnn_last.safetensors")
    save_weights(vit, out / "vit_last.safetensors")
    if arms and is_main():  # pretraining-only heads, apart from the backbones that finetune.py and timm load
        atomic_save_safetensors(out / "heads.safetensors", {f"{k}.{n}": v.detach().cpu().contiguous()
                                                            for k, a in arms.items()
                                                            for n, v in a.heads_state_dict().items()})
    if args.swa:
        bn_loader = make_loader(train_set, args.bs, shuffle=True, workers=args.workers, drop_last=drop_last,
                                generator=seed_epoch(args.seed, args.epochs), device=device, shard=True)
        for swa in (swa_cnn, swa_vit):
            if has_batchnorm(swa.module):  # (synchronised BatchNorm under torchrun: every process takes part)
                swa_batchnorm(swa, ((prepare(x),) for x, _, _ in bn_loader), device)
        save_weights(swa_cnn.module, out / "cnn.safetensors")
        save_weights(swa_vit.module, out / "vit.safetensors")
    else:
        save_weights(cnn, out / "cnn.safetensors")
        save_weights(vit, out / "vit.safetensors")
    total = sum(float(r["seconds"]) for r in log.rows)
    if is_main():
        plot_run(out)
    print(f"done: {args.epochs} epochs, {total:.0f}s of training ({time.perf_counter() - t_run:.0f}s this "
          f"session); weights {out / 'cnn.safetensors'} and {out / 'vit.safetensors'}, log {out / 'log.csv'}")


if __name__ == "__main__":
    run_cli(main)
