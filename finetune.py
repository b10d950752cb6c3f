"""Fine-tuning and evaluation of one backbone with labels: the paper's downstream stage (Section 4.3,
Appendix C.6) and the "Supervised" rows of its tables.

The backbone starts from ImageNet (--init imagenet), from scratch (--init random), or from a weight
file (--weights): an arm of CASS (cnn.safetensors / vit.safetensors of pretrain_cass.py) or a DINO
backbone (backbone.safetensors). A new classification head is put on top and the whole model is
trained end to end on --label-frac of the training split (stratified, seeded). Defaults are the
paper's recipe: Adam 3e-4 with cosine annealing, at most 50 epochs, early stopping on the validation
loss with patience 5 (best weights restored for the test), focal loss (alpha 1, gamma 2) weighted by
the min-max normalised class counts, the pretraining augmentations, batch 16, 384 px.

    python finetune.py --data dermofit --data-root /data/dermofit --weights runs/cass/.../cnn.safetensors
    python finetune.py --data synthetic --arch resnet18 --init random --img-size 64 --label-frac 0.1
    python finetune.py --data synthetic --arch resnet18 --weights cnn.safetensors --eval knn

--eval knn|linear skip training: frozen pooled features of the labelled training images (evaluation
transform) are used by a cosine k-nearest-neighbour vote or a logistic-regression probe.
Multi-label data (told by the data set, not a flag) use a sigmoid focal loss and --threshold.

Metrics are computed with scikit-learn on the whole test set: macro/micro/weighted F1, balanced
accuracy (macro recall, ISIC 2019's metric), accuracy, per-class precision/recall/F1, confusion
matrix and one-vs-rest AUROC. The output folder holds config.json, labelled_ids.json, log.csv,
predictions.csv, confusion_matrix.png, best.safetensors and, written last, metrics.json (test
metrics at the top level; best_epoch counts from 0 like the epoch column of log.csv).
Rerunning the same command resumes an interrupted run from checkpoint.pt; a finished one is left alone.
"""

import argparse
import math
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets import _strata, largest_remainder, load_data, write_skipped
from evaluation.metrics import compute_metrics, plot_confusion, to_probs, write_predictions
from evaluation.probes import knn_probs, linear_probs  # (--eval knn / linear)
from losses import FocalLoss, class_weights
from models import (NORMS, apply_norm, count_params, create_backbone, is_transformer, save_weights, sync_batchnorm,
                    wrap_ddp)
from pipeline.loading import batch_to_device, cass_pipeline, eval_pipeline, make_loader, use_gpu_aug
from runtime import cli, distributed, files, runs
from runtime.errors import UserError
from runtime.weight_files import head_prefixes, load_weights, norm_of_weights

# Headline metric per data set (Appendix D.1): F1 for autoimmune, dermofit and brain MRI; the
# organisers' balanced multi-class accuracy (macro recall) for ISIC 2019.
HEADLINE = {"isic2019": "balanced_accuracy", "ham10000": "balanced_accuracy"}  # the ISIC challenge metric


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p, bs=16, epochs=50, img_size=384, init="imagenet")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--arch", default="resnet50",
                   help="timm name of the backbone (paper: resnet50, vit_base_patch16_384)")
    g.add_argument("--weights", default=None,
                   help="weight file to start from: an arm of CASS (cnn.safetensors / vit.safetensors) or a "
                        "DINO backbone (backbone.safetensors), or any timm state dict of --arch; every "
                        "backbone tensor must fit, only the classification head is re-initialised. "
                        "Overrides --init (which may also be given a PATH)")
    g.add_argument("--norm", choices=NORMS, default=None,
                   help="input normalisation: paper (ImageNet mean/std) or model (the backbone's own weights' "
                        "mean/std, see pretrain_cass.py --norm). Default: the --norm of the run that wrote "
                        "--weights (its folder's config.json), else paper")
    g.add_argument("--label-frac", type=float, default=1.0,
                   help="fraction of the training split whose labels are used, in (0, 1] (paper: 0.01, "
                        "0.1, 1). Stratified by class (multi-label: by label combination), seeded by "
                        "--seed, at least one image per class; validation and test stay whole")
    g.add_argument("--eval", choices=("finetune", "knn", "linear"), default="finetune",
                   help="finetune: end-to-end training (the paper). knn: cosine k-nearest-neighbour vote on "
                        "frozen features (multi-label: each label's share among the neighbours). linear: "
                        "logistic regression on frozen standardised features (multi-label: one per label)")
    g.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (paper: 3e-4)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="floor of the cosine schedule")
    g.add_argument("--sched-step", choices=("epoch", "batch"), default="epoch",
                   help="epoch (default): one cosine decay from --lr to --min-lr over --epochs, stepped "
                        "once per epoch; the paper's text ('a cosine annealing learning rate starting at "
                        "3e-4') read plainly, and the same schedule whatever the data set and label "
                        "fraction. batch: the authors' code, CosineAnnealingLR stepped every batch with "
                        "T_max 16, i.e. a cosine wave of period 32 batches whose shape depends on the "
                        "number of batches per epoch")
    g.add_argument("--t-max", type=int, default=None,
                   help="CosineAnnealingLR T_max in scheduler steps (default: --epochs for --sched-step "
                        "epoch, 16 for --sched-step batch)")
    g.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs in a row without a lower validation loss (paper: 5; "
                        "the authors' code stopped after 6); 0 trains all --epochs. The weights of the "
                        "epoch with the lowest validation loss are restored for the test either way")
    g.add_argument("--val-size", type=int, default=None,
                   help="score a stratified subset of N validation images after each epoch, drawn once (from "
                        "--split-seed) and saved beside the split file (<split>-val<N>.json), instead of the "
                        "whole validation split: with few training images, scoring a large validation split is "
                        "most of an epoch's cost. The test split stays whole")
    g.add_argument("--class-weights", choices=("minmax", "inverse", "none"), default="minmax",
                   help="per-class weights of the focal loss, from the labelled training counts. minmax "
                        "(default, the paper's 'minimum-maximum normalized class distribution' as the "
                        "authors coded it): 0.2 + 0.8 (c - min) / (max - min), so the MOST frequent class "
                        "weighs 1.0 and the rarest 0.2. inverse: n / (C c), rare classes weigh more "
                        "(scikit-learn's 'balanced'). none: all 1")
    g.add_argument("--focal-alpha", type=float, default=1.0, help="focal loss alpha, a plain multiplier (paper: 1)")
    g.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (paper: 2)")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="multi-label only: a label is predicted when its sigmoid probability is >= this")
    g.add_argument("--knn-k", type=int, default=20,
                   help="--eval knn: number of neighbours (capped at the number of labelled images)")
    g.add_argument("--linear-c", type=float, default=1.0,
                   help="--eval linear: inverse L2 strength of the logistic regression")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training (CUDA; slow first epoch)")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep checkpoint.pt after the run has finished (removed by default: it holds the "
                        "optimiser state and two copies of the weights)")
    args = p.parse_args(argv)

    if not 0 < args.label_frac <= 1:
        raise UserError(f"--label-frac {args.label_frac}: expected a fraction in (0, 1]")
    if args.init not in ("imagenet", "random"):
        if args.weights and args.weights != args.init:
            raise UserError("--init PATH and --weights PATH both given; pass the weight file once (--weights)")
        args.weights, args.init = args.init, "random"
    if args.norm is None:  # as the weights were pretrained
        args.norm = norm_of_weights(args.weights) if args.weights else "paper"
    if args.t_max is None:
        args.t_max = args.epochs if args.sched_step == "epoch" else 16
    if args.out is None:
        args.out = (f"runs/{args.eval}/{args.data}-{args.arch}-{init_tag(args)}"
                    f"-frac{args.label_frac:g}-seed{args.seed}")
    return args


def init_tag(args) -> str:
    """Short name of the starting weights for the default output folder: imagenet, random, or
    <folder of the weight file>-<its name>, e.g. synthetic-resnet18-vit_tiny...-seed0-cnn."""
    if not args.weights:
        return args.init
    path = Path(args.weights)
    tag = f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


# ---------------------------------------------------------------- the labelled subset

def labelled_subset(table, train_rows, frac: float, seed: int) -> np.ndarray:
    """Rows of the training split whose labels are used: round(frac * n) of them, stratified.

    Each stratum (class, or label combination for multi-label, see datasets._strata) gives
    frac * its size, rounded by largest remainder so the total is round(frac * n); members are taken
    from a seeded permutation of the stratum, so with the same seed a smaller fraction is (nearly) a
    subset of a larger one. Then every class with training images gets at least one (multi-label:
    every label with a positive training image gets one positive), which may add a few rows."""
    train_rows = np.sort(np.asarray(train_rows, dtype=np.int64))
    if frac >= 1:
        return train_rows
    rng = np.random.default_rng(seed)
    strata = _strata(table, train_rows)
    uniq = np.unique(strata)
    members = [rng.permutation(train_rows[strata == s]) for s in uniq]
    want = frac * np.array([len(m) for m in members], dtype=np.float64)
    take = largest_remainder(want, int(round(frac * len(train_rows))), tiebreak=rng.random(len(uniq)))  # random ties
    chosen = set(np.concatenate([m[:k] for m, k in zip(members, take)]).tolist())
    y = table.labels
    for c in range(len(table.class_names)):
        has = (y[train_rows, c] > 0) if table.multilabel else (y[train_rows] == c)
        pool = train_rows[has]
        if len(pool) and not any(r in chosen for r in pool.tolist()):
            chosen.add(int(rng.choice(pool)))
    return np.sort(np.fromiter(chosen, dtype=np.int64))


def require_every_class(table, counts, split):
    """Stop when a class (multi-label: a label) has no example among the labelled training images.

    labelled_subset gives every class of the training split at least one image, so this happens
    when the split put all of a class's images into validation and test (a class of one or two
    images): the model could never predict it, and its test scores would be meaningless."""
    empty = [c for c, k in enumerate(counts) if k == 0]
    if not empty:
        return
    name = table.class_names[empty[0]]
    total = int(table.class_counts()[empty[0]])
    where = {p: int(table.class_counts(split[p])[empty[0]]) for p in ("val", "test")}
    more = f" (and {len(empty) - 1} more: {', '.join(table.class_names[c] for c in empty[1:4])})" if len(empty) > 1 else ""
    raise UserError(f"class '{name}'{more} has no labelled training example: the training split holds none of "
                    f"its {total} image(s) (validation {where['val']}, test {where['test']}); add images of it, "
                    f"drop the class, or pass a --split-file that puts some in train")


# ---------------------------------------------------------------- model

def build_model(args, num_classes: int):
    """The backbone with a fresh `num_classes` head, and the list of keys that were initialised anew.

    --weights: a randomly initialised timm model into which the file is loaded (weight_files.load_weights
    checks every backbone tensor); the head is always re-initialised, even where the file holds one
    of the right shape. Otherwise --init imagenet (timm's weights; the head is new) or random."""
    if not args.weights:
        model = create_backbone(args.arch, args.init, num_classes=num_classes, img_size=args.img_size)
        fresh = [k for k in model.state_dict() if k.startswith(head_prefixes(model))]
        return model, (fresh if args.init == "imagenet" else ["(all: --init random)"])
    model = create_backbone(args.arch, "random", num_classes=num_classes, img_size=args.img_size)
    heads = head_prefixes(model)
    new_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(heads)}
    fresh = load_weights(model, args.weights, flag="--weights")
    model.load_state_dict(new_head, strict=False)  # a head of the right shape in the file is not kept
    return model, sorted(new_head) if new_head else fresh


# ---------------------------------------------------------------- early stopping

class EarlyStopping:
    """Early stopping on a value to minimise (the validation loss).

    step(value, epoch) records one epoch and returns True when it is the best so far (strictly
    lower); should_stop becomes True after `patience` epochs in a row without improvement
    (patience 0: never). A NaN never improves."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.bad_epochs = patience, math.inf, -1, 0

    def step(self, value: float, epoch: int) -> bool:
        if value < self.best:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self):
        return {"patience": self.patience, "best": self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d):
        self.patience, self.best, self.best_epoch, self.bad_epochs = (
            d["patience"], d["best"], d["best_epoch"], d["bad_epochs"])


# ---------------------------------------------------------------- one pass over a data set

def forward_all(model, loader, device, criterion=None, desc="eval"):
    """Outputs of `model` for every image of `loader` (no dropped batch), in loader order; the batches
    go to the device through loading.batch_to_device (normalised there with --gpu-aug).
    Returns (outputs float64 (N, D), labels (N,) or (N, L), rows (N,), mean loss or None)."""
    model.eval()
    outs, labels, rows, loss_sum = [], [], [], 0.0
    with torch.no_grad():
        for x, y, r in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
            x = batch_to_device(x, loader.dataset, device)
            if device.type == "cuda" and not is_transformer(model):
                x = x.contiguous(memory_format=torch.channels_last)
            with cli.autocast(device):
                z = model(x)
            z = z.float()
            if criterion is not None:
                loss_sum += criterion(z, y.to(device)).item() * len(x)
            outs.append(z.cpu()), labels.append(y), rows.append(r)
    n = sum(len(r) for r in rows)
    return (torch.cat(outs).double().numpy(), torch.cat(labels).numpy(), torch.cat(rows).numpy(),
            loss_sum / n if criterion is not None else None)


def finetune_step(fwd, x, y, criterion, opt, device):
    """One fine-tuning iteration: forward under bf16 autocast (CUDA; a CNN in channels_last), focal
    loss, backward (DDP: gradients averaged over the processes), Adam step. Returns the loss as a
    device tensor (no host sync)."""
    if device.type == "cuda" and not is_transformer(getattr(fwd, "module", fwd)):
        x = x.contiguous(memory_format=torch.channels_last)
    with cli.autocast(device):
        logits = fwd(x)
    loss = criterion(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


# ---------------------------------------------------------------- main

@runs.restores_signal_handlers  # (called from Python: SIGTERM / Ctrl-C handled as before it, after)
def main(argv=None):
    args = get_args(argv)
    device = distributed.setup_distributed(cli.pick_device(args.device), args.dist_timeout)  # torchrun: one process per GPU
    config = dict(vars(args))
    runtime = (*runs.RUNTIME_FLAGS, "keep_checkpoint")
    out = runs.check_out_dir(args.out, config, args.force, ignore=runtime)  # another run's: refused now
    if (out / "metrics.json").exists() and not args.force:
        print(f"{out} already holds a finished run (metrics.json); nothing to do "
              "(pass --force to run it again)")
        return

    # ---- data: labelled subset of the training split; validation and test whole
    with distributed.main_first():  # rank 0 first: it writes the split file and the decoded cache
        table, split = load_data(args)
    gpu = use_gpu_aug(args, device, table)
    C = len(table.class_names)
    for part in ("train", "val", "test"):
        if len(split[part]) == 0:
            raise UserError(f"the {part} split of --data {args.data} is empty; the data set is too small")
    if args.bs > len(split["train"]) and args.eval == "finetune":
        raise UserError(f"--bs {args.bs} is larger than the training set ({len(split['train'])} images)")
    rows = labelled_subset(table, split["train"], args.label_frac, args.seed)
    counts = table.class_counts(rows)
    require_every_class(table, counts, split)
    if args.bs > len(rows) and args.eval == "finetune":  # expected with 1% labels of a small data set
        print(f"note: --bs {args.bs} is larger than the {len(rows)} labelled images: every epoch is one batch "
              f"of {len(rows)}")
    test_set, _ = eval_pipeline(table, split["test"], args.img_size, device, gpu)
    test_loader = make_loader(test_set, args.bs, shuffle=False, workers=args.workers, device=device)
    kind = "multi-label" if table.multilabel else "single-label"
    print(f"{args.data}: {C} classes ({kind}), {len(rows)} labelled training images "
          f"({args.label_frac:g} of {len(split['train'])}; per class {counts.tolist()}), "
          f"{len(split['val'])} validation, {len(split['test'])} test")

    cli.seed_everything(args.seed)
    model, fresh = build_model(args, C)
    mean_std = apply_norm(model, args.norm)
    print(f"{args.arch} ({count_params(model) / 1e6:.1f}M parameters) from "
          f"{args.weights or args.init}; re-initialised: {', '.join(fresh)}; normalisation "
          f"{'ImageNet' if args.norm == 'paper' else mean_std} (--norm {args.norm})")

    # ---- output folder: written only now that the data and the start weights are known to be good
    with distributed.main_first():
        runs.prepare_out_dir(out, config, args.force, ignore=runtime)
        if args.force:
            (out / "metrics.json").unlink(missing_ok=True)
        write_skipped(out, table)
        files.atomic_write_json(out / "labelled_ids.json", {
            "data": args.data, "label_frac": args.label_frac, "seed": args.seed, "n_train": len(split["train"]),
            "n_labelled": len(rows), "class_names": table.class_names, "class_counts": counts.tolist(),
            "ids": [table.ids[r] for r in rows]})
    model.to(device)
    if device.type == "cuda" and not is_transformer(model):
        model.to(memory_format=torch.channels_last)

    extra = {}
    if args.eval != "finetune":
        if not distributed.is_main():  # frozen-feature evaluations are not distributed: rank 0 does them
            return
        model.reset_classifier(0)  # pooled features
        feat_loader = make_loader(eval_pipeline(table, rows, args.img_size, device, gpu)[0], args.bs,
                                  shuffle=False, workers=args.workers, device=device)
        train_f, train_y, _, _ = forward_all(model, feat_loader, device, desc="features (train)")
        test_f, test_y, test_rows, _ = forward_all(model, test_loader, device, desc="features (test)")
        if args.eval == "knn":
            k = min(args.knn_k, len(rows))
            probs = knn_probs(train_f, train_y, test_f, k, C, table.multilabel)
            extra = {"knn_k": k}
        else:
            probs = linear_probs(train_f, train_y, test_f, C, table.multilabel, args.linear_c, args.seed)
        extra["feature_dim"] = int(train_f.shape[1])
        best_epoch = epochs_run = None
        t_total = 0.0
    else:
        res = train(args, out, model, table, rows, split, counts, device, test_loader, gpu)
        if res is None:  # not rank 0 of a torchrun
            return
        test_y, test_rows, probs = res["test_y"], res["test_rows"], res["probs"]
        best_epoch, epochs_run, t_total = res["best_epoch"], res["epochs_run"], res["seconds"]
        extra = {"stopped_early": res["stopped_early"], "best_val_loss": res["best_val_loss"]}

    # ---- test metrics and files (metrics.json last: its presence means the run is complete)
    metrics = compute_metrics(test_y, probs, table.class_names, table.multilabel, args.threshold)
    metrics.update(clean_test_metrics(metrics, table, test_y, test_rows, probs, args.threshold))
    ids = [table.ids[r] for r in test_rows]
    write_predictions(out / "predictions.csv", ids, test_y, probs, table.class_names, table.multilabel,
                      args.threshold)
    headline = HEADLINE.get(args.data, "f1_macro")
    title = f"{args.data} {args.arch} {init_tag(args)} frac {args.label_frac:g} seed {args.seed} ({args.eval})"
    plot_confusion(out / "confusion_matrix.png", metrics, table.class_names, table.multilabel, title)
    metrics.update({
        "headline_metric": headline, "headline_value": metrics[headline], "best_epoch": best_epoch,
        "epochs_run": epochs_run, "n_test": len(ids), "n_labelled": len(rows), "n_val": len(split["val"]),
        "label_frac": args.label_frac, "seed": args.seed, "data": args.data, "arch": args.arch,
        "init": init_tag(args), "eval": args.eval, "class_names": table.class_names,
        "multilabel": table.multilabel, "train_seconds": t_total, **extra})
    files.atomic_write_json(out / "metrics.json", metrics)
    if not args.keep_checkpoint:
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            (out / name).unlink(missing_ok=True)
    where = f"best epoch {best_epoch + 1}/{epochs_run}, " if best_epoch is not None else ""
    print(f"done ({args.eval}): {where}test {headline} {metrics[headline]:.4f} "
          f"(f1_macro {metrics['f1_macro']:.4f}, balanced_accuracy {metrics['balanced_accuracy']:.4f}, "
          f"n_test {len(ids)}); files in {out}")
    if metrics["n_test_clean"] < len(ids):
        clean = metrics.get(f"{headline}_clean")
        print(f"clean test ({metrics['n_test_clean']} images without a copy in training or validation): "
              f"{headline} {'n/a' if clean is None else f'{clean:.4f}'}")


def clean_test_metrics(metrics, table, test_y, test_rows, probs, threshold) -> dict:
    """Every scalar test metric of `metrics` again on the clean test (the test images with no copy in
    training or validation: datasets.note_leaks) as <metric>_clean, with n_test_clean and the split's
    leak counts. With no clean image left those metrics are None."""
    clean = np.isin(np.asarray(test_rows), table.extra["clean_test"])
    if clean.all():
        sub = metrics
    elif clean.any():
        sub = compute_metrics(np.asarray(test_y)[clean], np.asarray(probs)[clean], table.class_names,
                              table.multilabel, threshold)
    else:
        sub = None
    out = {f"{k}_clean": (None if sub is None else sub[k]) for k, v in metrics.items()
           if k != "threshold" and not isinstance(v, (dict, list))}
    out.update({"per_class_clean": None if sub is None else sub["per_class"], "n_test_clean": int(clean.sum()),
                "leaks": table.extra["leaks"]})
    return out


def train(args, out, model, table, rows, split, counts, device, test_loader, gpu=False):
    """End-to-end fine-tuning with early stopping, then the test pass with the best validation
    weights; returns a dict for main's metrics, or None on the processes other than rank 0 of a
    torchrun (the test and the files are rank 0's).

    Under torchrun the training batches are split over the processes (DDP, synchronised BatchNorm);
    every process evaluates the whole validation set and rank 0's validation loss decides."""
    train_set, prepare = cass_pipeline(table, rows, args.img_size, (), device, gpu)
    val_loader = make_loader(eval_pipeline(table, split["val"], args.img_size, device, gpu)[0], args.bs,
                             shuffle=False, workers=args.workers, device=device)
    drop_last = len(rows) % args.bs == 1 and len(rows) > args.bs  # a batch of one breaks BatchNorm
    weight = class_weights(counts, args.class_weights).to(device)
    criterion = FocalLoss(args.focal_alpha, args.focal_gamma, weight, multilabel=table.multilabel).to(device)
    print(f"class weights ({args.class_weights}): {[round(w, 3) for w in weight.tolist()]}")
    model = sync_batchnorm(model, device)
    fwd = wrap_ddp(model, device)
    if args.compile:
        fwd = torch.compile(fwd)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.t_max, eta_min=args.min_lr)
    stopper = EarlyStopping(args.patience)
    best_state = None

    def train_state():  # what a checkpoint holds besides the epoch
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "early_stopping": stopper.state_dict(), "best_state": best_state}

    start_epoch, partial = 0, None
    ckpt = runs.load_checkpoint(out)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        runs.load_optimizer_state(opt, ckpt["optimizer"])  # (written on any device)
        sched.load_state_dict(ckpt["scheduler"])
        stopper.load_state_dict(ckpt["early_stopping"])
        best_state = ckpt["best_state"]
        start_epoch, partial = runs.resume_point(out, ckpt)
    log = runs.CsvLog(out / "log.csv", keep_epochs_below=start_epoch)

    guard = runs.TrainingGuard(out, device, train_state, partial)  # SIGTERM / Ctrl-C, NaN watch, mid-epoch resume
    epoch = start_epoch - 1
    for epoch in range(start_epoch, args.epochs):
        if stopper.should_stop:  # resumed after the stopping epoch's checkpoint
            epoch -= 1
            break
        loader = make_loader(train_set, args.bs, shuffle=True, workers=args.workers, drop_last=drop_last,
                             generator=runs.seed_epoch(args.seed, epoch), device=device, shard=True,
                             skip_batches=guard.skip)  # (resuming in an epoch: its first batches are done)
        model.train()
        # loss sum, images; and the rate the epoch starts with (a resumed epoch: as saved)
        sums = guard.start_epoch(epoch, {"sums": torch.zeros(2, device=device)}, lr=opt.param_groups[0]["lr"])["sums"]
        lr = guard.extra["lr"]
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True, disable=None,
                   initial=guard.skip, total=guard.skip + len(loader))
        for step, (x, y, _) in enumerate(bar, start=guard.skip):
            x, y = prepare(x), y.to(device, non_blocking=True)
            loss = finetune_step(fwd, x, y, criterion, opt, device)
            if args.sched_step == "batch":
                sched.step()
            sums[0] += loss.detach() * len(x)
            sums[1] += len(x)
            guard.step(loss, step, bar)
        if args.sched_step == "epoch":
            sched.step()
        guard.end_epoch()
        loss_sum, n = distributed.all_reduce_sum(sums).tolist()
        train_loss = loss_sum / max(n, 1)
        logits, val_y, _, val_loss = forward_all(model, val_loader, device, criterion, desc="validation")
        val_loss = distributed.broadcast_float(val_loss)  # every process takes rank 0's early-stopping decision
        val = compute_metrics(val_y, to_probs(logits, table.multilabel), table.class_names,
                              table.multilabel, args.threshold)
        if stopper.step(val_loss, epoch):
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        seconds = guard.seconds()
        log.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_f1_macro": val["f1_macro"],
                    "val_balanced_accuracy": val["balanced_accuracy"], "lr": lr, "seconds": seconds})
        runs.save_checkpoint(out, {**train_state(), "epoch": epoch})
        mark = " *" if stopper.best_epoch == epoch else ""
        tqdm.write(f"epoch {epoch + 1}/{args.epochs} train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
                   f"val_f1_macro {val['f1_macro']:.4f} lr {lr:.2e} {seconds:.1f}s{mark}")
        guard.stop_if_asked()  # a signal during the epoch's end: its checkpoint is already saved
        if stopper.should_stop:
            print(f"early stopping: no lower validation loss for {args.patience} epochs "
                  f"(best {stopper.best:.4f} at epoch {stopper.best_epoch + 1})")
            break
    epochs_run = epoch + 1
    if best_state is None:
        raise UserError("no epoch was trained (--epochs 0?)")

    # ---- best validation weights for the test
    if not distributed.is_main():
        return None
    model.load_state_dict(best_state)
    save_weights(model, out / "best.safetensors")
    logits, test_y, test_rows, _ = forward_all(model, test_loader, device, desc="test")
    return {"best_epoch": stopper.best_epoch, "epochs_run": epochs_run, "best_val_loss": stopper.best,
            "seconds": sum(float(r["seconds"]) for r in log.rows), "stopped_early": stopper.should_stop,
            "test_y": test_y, "test_rows": test_rows, "probs": to_probs(logits, table.multilabel)}


if __name__ == "__main__":
    cli.run_cli(main)
