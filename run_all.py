"""The whole study as a list of runs: the planner behind `bash run_all.sh`.

    bash run_all.sh quick                    # the study in miniature on the synthetic data (CPU, minutes)
    bash run_all.sh paper                    # every table and figure the data roots allow (GPU, weeks)
    bash run_all.sh paper table1 table7 fig2 # only these
    bash run_all.sh paper --dry-run          # list the plan, run nothing (or DRY_RUN=1)

Each table of the paper is defined once here (`study`), as cells: one fine-tuning setting each
(data set, backbone, label fraction, and where the weights come from: supervised from an init, a
CASS arm, or a DINO backbone), with the paper's number beside it. The planner turns the cells into
commands of pretrain_cass.py, pretrain_dino.py and finetune.py, one per seed, each with its own
output folder under runs/<mode>/; tables.py reads the same cells back to build the tables.

Idempotent and resumable: a fine-tuning run whose metrics.json exists and a pretraining run whose
weight files exist are skipped; any other run is (re)started with the same command and output
folder, and the scripts themselves resume from their last checkpoint. So a sweep that died halfway
is finished by running the same command again.

The runs are executed by --jobs worker processes that import the scripts once and call each
script's main() with exactly the arguments of the command the plan prints (importing torch and timm
costs seconds, and the quick mode has 42 runs); each run's output goes to <run folder>/run_all.log.
Every printed command can also be run by hand.

Stopping: SIGTERM or Ctrl-C (`timeout`, `kill`, a scheduler's time limit) is passed on to every
running job, which saves a checkpoint after its current step and stops; run_all waits for them (at
most --stop-timeout seconds; a second signal: not at all), names the stopped runs in one line and
exits with 128 + the signal number. Workers whose main process is killed outright stop the same way
by themselves. A worker that dies (out of memory, killed) fails its run, reported with how it died.
"""

import argparse
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import paper_results as PR

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------- profiles

# Paper-mode data sets: name -> (environment variable, flag, what it is)
DATA_ROOTS = {
    "autoimmune": ("AUTOIMMUNE_CSV", "--autoimmune-csv", "CSV of image path + one 0/1 column per cell type"),
    "dermofit": ("DERMOFIT_ROOT", "--dermofit-root", "folder with one sub-folder per class"),
    "brain-mri": ("BRAIN_MRI_ROOT", "--brain-mri-root", "folder holding Training/ and Testing/"),
    "isic2019": ("ISIC_ROOT", "--isic-root", "folder holding ISIC_2019_Training_GroundTruth.csv and "
                 "ISIC_2019_Training_Input/"),
}


@dataclass(frozen=True)
class Profile:
    """The default setting of one mode and the flags every run of that mode gets."""
    name: str
    cnn: str
    vit: str
    bs: int
    epochs: int
    init: str
    seeds: tuple
    pretrain_seeds: int  # fine-tuning seed s uses pretraining seed s % pretrain_seeds
    cass_args: tuple = ()
    dino_args: tuple = ()
    ft_args: tuple = ()
    maps_args: tuple = ()
    jobs: int = 1  # runs at a time
    seeds_by_data: tuple = ()  # ((data, seeds), ...): other seeds for some data sets
    runs_dir: str = ""  # default runs/<name>
    results_dir: str = ""  # default results/<name>
    seeds_by_frac: tuple = ()  # ((label fraction, seeds), ...): other fine-tuning seeds at some fractions
    ft_epochs_by_frac: tuple = ()  # ((label fraction, epochs), ...): fine-tuning --epochs per fraction
    ft_epochs_by_arch: tuple = ()  # ((arch, label fraction, epochs), ...): the same for one backbone
    class_weights: str = "minmax"  # finetune.py --class-weights of the mode's fine-tuning runs
    data_roots_needed: bool = False  # the mode reads real data sets (their roots must be given)

    def ft_epochs(self, arch: str, frac: float):
        """Fine-tuning --epochs for `arch` at label fraction `frac` (None: the script's default)."""
        by_arch = {(a, round(f, 6)): e for a, f, e in self.ft_epochs_by_arch}
        by_frac = {round(f, 6): e for f, e in self.ft_epochs_by_frac}
        return by_arch.get((arch, round(frac, 6)), by_frac.get(round(frac, 6)))

    def seeds_for(self, data: str, frac: float = None) -> tuple:
        by_frac = {round(f, 6): s for f, s in self.seeds_by_frac}
        if frac is not None and round(frac, 6) in by_frac:
            return by_frac[round(frac, 6)]
        return dict(self.seeds_by_data).get(data, self.seeds)

    @property
    def runs(self) -> Path:
        return Path(self.runs_dir) if self.runs_dir else Path("runs") / self.name

    @property
    def results(self) -> Path:
        return Path(self.results_dir) if self.results_dir else Path("results") / self.name


# Quick: the miniature on the embedded synthetic data, sized to finish within 15 minutes on a 2-core
# CPU, with every choice measured (docs/run_all.md, "How the quick mode departs from the paper"):
# timm's tiny test_resnet (0.4 M parameters) and test_vit (patch 16, width 64, 0.3 M) at 64 px (a
# 4 x 4 patch grid) from random init, batch 16 as the paper. Pretraining (CASS, DINO for each
# backbone) for 3 epochs on the 2,100 training images, two pretraining seeds. Fine-tuning: the
# paper's Adam 3e-4, cosine and focal loss, with inverse-frequency class weights (the paper's min-max
# weights hurt on brain MRI); every method with 10% of the labels for 20 epochs (3 seeds), the
# supervised baselines also with 100% for 5 (CNN) / 20 (ViT) epochs (2 seeds); frozen 20-NN and
# linear probes of every pretrained (and random) backbone with 100%. The multi-label data set gets
# the supervised rows with 100% only. Two runs at a time, one CPU thread each.
QUICK_IMG = 64
QUICK = Profile(
    name="quick", cnn="test_resnet", vit="test_vit", bs=16, epochs=3, init="random",
    seeds=(0, 1, 2), pretrain_seeds=2, jobs=2, seeds_by_frac=((1.0, (0, 1)),),
    ft_epochs_by_frac=((0.1, 20), (1.0, 5)), ft_epochs_by_arch=(("test_vit", 1.0, 20),),
    class_weights="inverse",
    cass_args=("--img-size", str(QUICK_IMG), "--workers", "0"),
    dino_args=("--img-size", str(QUICK_IMG), "--local-size", "32", "--local-crops", "2", "--out-dim", "1024",
               "--hidden-dim", "512", "--bottleneck-dim", "128", "--warmup-epochs", "1", "--workers", "0"),
    ft_args=("--img-size", str(QUICK_IMG), "--bs", "16", "--patience", "0", "--workers", "0"),
    maps_args=("--img-size", str(QUICK_IMG), "--n", "30"),
)

# Paper: Section 4 and Appendix C.5-C.6. The scripts' defaults are the paper's recipe (CASS: 384 px,
# Adam 1e-3, cosine T_max 16, SWA; DINO: the official recipe with 384 px global crops (as CASS); fine-tuning: 384 px, Adam
# 3e-4, focal loss, 50 epochs, patience 5), so no extra flags are needed.
PAPER = Profile(
    name="paper", cnn="resnet50", vit="vit_base_patch16_384", bs=16, epochs=100, init="imagenet",
    seeds=(0, 1, 2, 3, 4), pretrain_seeds=5, maps_args=("--img-size", "384"),
)

# CPU: the paper's brain-MRI study (Table 4 and Table 2's timing) on real data, sized to finish within
# 2 hours on a 2-core CPU (README, "The real-data CPU study"): ResNet-18 + ViT-Ti/16 at 64 px from
# random init (no weights can be downloaded), batch 16, the paper's recipe otherwise. CASS and DINO
# (each backbone) pretrain for the same 3 epochs on the 4,995 training images; DINO gets a 4,096-d
# head and 2 local crops of 32 px instead of 65,536 and 8 x 96 px, and a 1-epoch warm-up (a CPU
# budget; CASS gets no such help). Fine-tuning keeps the paper's protocol (Adam 3e-4, cosine, focal
# loss with min-max class weights, patience 5) for 15 / 10 / 3 epochs at 1% / 10% / 100% labels,
# 3 seeds at 1% and 10% and 2 at 100%; every frozen backbone (CASS arms, DINO, random init) also
# gets a 20-NN and a linear probe on 100% of the labels. Two runs at a time, one thread each.
CPU_IMG = 64
CPU = Profile(
    name="cpu", cnn="resnet18", vit="vit_tiny_patch16_224", bs=16, epochs=3, init="random",
    seeds=(0, 1, 2), pretrain_seeds=1, jobs=2, seeds_by_frac=((1.0, (0, 1)),),
    ft_epochs_by_frac=((0.01, 15), (0.1, 10), (1.0, 3)), data_roots_needed=True,
    cass_args=("--img-size", str(CPU_IMG), "--workers", "0"),
    dino_args=("--img-size", str(CPU_IMG), "--local-size", "32", "--local-crops", "2", "--out-dim", "4096",
               "--warmup-epochs", "1", "--workers", "0"),
    ft_args=("--img-size", str(CPU_IMG), "--workers", "0"),
)
# The options against collapse on the CPU study's setting (same data, backbones, size, epochs, seeds):
# its runs folder is the cpu mode's, so the paper-recipe rows reuse the cpu mode's runs.
CPU_OPTIONS = replace(CPU, name="cpu-options", runs_dir="runs/cpu", results_dir="results/cpu/options")
CASS_OPTIONS = (("Paper recipe (Equation 1 on the logits)", {}),
                ("--predictor", {"predictor": True}),
                ("--projector 256", {"projector": 256}),
                ("--projector 256 --predictor", {"projector": 256, "predictor": True}),
                ("--var-reg 1", {"var_reg": 1.0}))
# The focal loss's class weights on the CPU study's setting: the paper's min-max weights (which give the most
# frequent class the largest weight, as the authors coded them) against inverse-frequency weights and none,
# supervised from random init at 10% labels (3 seeds); the min-max rows are the cpu mode's runs.
CPU_WEIGHTS = replace(CPU, name="cpu-weights", runs_dir="runs/cpu", results_dir="results/cpu/class_weights")
CLASS_WEIGHTS = (("min-max (paper)", "minmax"), ("inverse frequency", "inverse"), ("none", "none"))
PROFILES = {"quick": QUICK, "paper": PAPER, "cpu": CPU, "cpu-options": CPU_OPTIONS, "cpu-weights": CPU_WEIGHTS}

# timm has no ImageNet weights for plain ResNet-200 (only resnet200d); the paper used random init.
NO_IMAGENET = {"resnet200"}

LABELS = {
    "resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet200": "ResNet-200", "densenet161": "DenseNet-161",
    "test_resnet": "test_resnet", "test_vit": "test_vit/16",
    "vit_tiny_patch16_224": "ViT-Ti/16", "vit_base_patch16_384": "ViT-B/16", "vit_large_patch16_384": "ViT-L/16",
    "deit_base_patch16_384": "DeiT-B/16", "swin_base_patch4_window12_384": "Swin-B (patch 4, window 12)",
}
METHOD_LABEL = {"cass": "CASS", "dino": "DINO", "supervised": "Supervised"}


def label(arch: str) -> str:
    return LABELS.get(arch, arch)


def frac_label(f: float) -> str:
    return f"{f * 100:g}%"


# ---------------------------------------------------------------- settings

def _aug_key(extra_aug) -> tuple:
    if isinstance(extra_aug, str):
        extra_aug = [a for a in extra_aug.split(",") if a]
    return tuple(sorted(extra_aug or ()))


@dataclass(frozen=True)
class Cass:
    data: str
    cnn: str
    vit: str
    bs: int
    epochs: int
    init: str
    extra_aug: tuple = ()
    cnn_opt: str = "adam"
    head_act: str = "none"
    cnn_init: Optional[str] = None  # arm 1's start when not `init` (ResNet-200: random beside an ImageNet ViT)
    predictor: bool = False  # the options against collapse (pretrain_cass.py --predictor/--projector/--var-reg)
    projector: int = 0
    var_reg: float = 0.0

    method = "cass"

    def options(self) -> tuple:
        return (self.predictor, self.projector, float(self.var_reg))

    def key(self) -> tuple:
        return ("cass", self.data, self.cnn, self.vit, self.bs, self.epochs, self.init, _aug_key(self.extra_aug),
                self.cnn_opt, self.head_act) + ((self.cnn_init,) if self.cnn_init else ()) + \
            ((("options",) + self.options(),) if any(self.options()) else ())

    def name(self) -> str:
        parts = [f"{self.cnn}+{self.vit}", f"bs{self.bs}", f"ep{self.epochs}", self.init]
        if self.cnn_init:
            parts.append(f"cnn_{self.cnn_init}")
        if self.extra_aug:
            parts.append("aug_" + "_".join(_aug_key(self.extra_aug)))
        if self.cnn_opt != "adam":
            parts.append(f"cnnopt_{self.cnn_opt}")
        if self.head_act != "none":
            parts.append(f"head_{self.head_act}")
        if self.projector:
            parts.append(f"proj{self.projector}")
        if self.predictor:
            parts.append("pred")
        if self.var_reg:
            parts.append(f"varreg{self.var_reg:g}")
        return "-".join(parts)

    def arch(self, arm: str) -> str:
        return self.cnn if arm == "cnn" else self.vit

    def weight_file(self, arm: str) -> str:
        return f"{arm}.safetensors"

    def done_files(self):
        return ("cnn.safetensors", "vit.safetensors")

    def argv(self, prof: Profile, seed: int, out: Path, data_root) -> list:
        a = ["pretrain_cass.py", "--data", self.data, *(["--data-root", data_root] if data_root else []),
             "--cnn", self.cnn, "--vit", self.vit, "--bs", str(self.bs), "--epochs", str(self.epochs),
             "--init", self.init, "--seed", str(seed), "--out", str(out)]
        if self.cnn_init:
            a += ["--cnn-init", self.cnn_init]
        if self.extra_aug:
            a += ["--extra-aug", ",".join(_aug_key(self.extra_aug))]
        if self.cnn_opt != "adam":
            a += ["--cnn-opt", self.cnn_opt]
        if self.head_act != "none":
            a += ["--head-act", self.head_act]
        if self.projector:
            a += ["--projector", str(self.projector)]
        if self.predictor:
            a += ["--predictor"]
        if self.var_reg:
            a += ["--var-reg", f"{self.var_reg:g}"]
        return a + list(prof.cass_args)


@dataclass(frozen=True)
class Dino:
    data: str
    arch_: str
    bs: int
    epochs: int
    init: str

    method = "dino"

    def key(self) -> tuple:
        return ("dino", self.data, self.arch_, self.bs, self.epochs, self.init)

    def name(self) -> str:
        return f"{self.arch_}-bs{self.bs}-ep{self.epochs}-{self.init}"

    def arch(self, arm: str) -> str:
        return self.arch_

    def weight_file(self, arm: str) -> str:
        return "backbone.safetensors"

    def done_files(self):
        return ("backbone.safetensors",)

    def argv(self, prof: Profile, seed: int, out: Path, data_root) -> list:
        return ["pretrain_dino.py", "--data", self.data, *(["--data-root", data_root] if data_root else []),
                "--arch", self.arch_, "--bs", str(self.bs), "--epochs", str(self.epochs), "--init", self.init,
                "--seed", str(seed), "--out", str(out), *prof.dino_args]


@dataclass(frozen=True)
class Finetune:
    """One fine-tuning setting: `arch` on `data` with `frac` of the labels, starting from `source`
    (a Cass or Dino pretraining setting, whose `arm` is used) or, when source is None, from `init`."""
    data: str
    arch: str
    frac: float
    source: Optional[object] = None  # Cass | Dino | None (supervised)
    arm: Optional[str] = None  # 'cnn' | 'vit' (which arm of CASS; for DINO and supervised: the role)
    init: str = "imagenet"
    eval: str = "finetune"  # finetune | knn | linear (finetune.py --eval: frozen-feature probes)
    class_weights: str = "minmax"  # finetune.py --class-weights

    @property
    def method(self) -> str:
        return self.source.method if self.source is not None else "supervised"

    def key(self) -> tuple:
        src = self.source.key() if self.source is not None else ("supervised", self.init)
        arm = self.arm if self.method == "cass" else None
        return (self.data, self.arch, round(float(self.frac), 6), src, arm) + \
            ((self.eval,) if self.eval != "finetune" else ()) + \
            ((("class_weights", self.class_weights),) if self.class_weights != "minmax" else ())

    def group(self) -> str:
        cw = f"-cw{self.class_weights}" if self.class_weights != "minmax" else ""
        if self.source is None:
            return f"supervised-{self.init}{cw}"
        return f"{self.source.method}-{self.source.name()}" + (f"-{self.arm}" if self.method == "cass" else "") + cw


def pretrain_dir(prof: Profile, src, seed: int) -> Path:
    return prof.runs / src.data / src.method / f"{src.name()}-seed{seed}"


def finetune_dir(prof: Profile, ft: Finetune, seed: int) -> Path:
    probe = f"-{ft.eval}" if ft.eval != "finetune" else ""
    return prof.runs / ft.data / "finetune" / ft.group() / f"{ft.arch}{probe}-frac{ft.frac:g}-seed{seed}"


def pretrain_seed(prof: Profile, seed: int) -> int:
    return prof.seeds.index(seed) % prof.pretrain_seeds if seed in prof.seeds else seed % prof.pretrain_seeds


# ---------------------------------------------------------------- tables as cells

@dataclass
class Cell:
    row: str
    col: str
    ft: Finetune
    paper: Optional[tuple] = None  # (mean, spread) as printed, or None


@dataclass
class TableDef:
    name: str
    title: str
    data: str
    metric: str
    kind: str  # main | ablation | supervised | time | figure2 | maps
    cells: list = field(default_factory=list)
    note: str = ""
    sources: list = field(default_factory=list)  # time: [(row, Cass, Dino cnn, Dino vit, paper)]
    maps_n: int = 30
    seeds: tuple = ()  # the table's own seeds, instead of the profile's

    def seeds_of(self, prof: Profile, ft: "Finetune") -> tuple:
        seeds = self.seeds or prof.seeds_for(ft.data, ft.frac)
        # a frozen-feature probe with all labels varies only with the pretraining: one, unless the table says
        return seeds if ft.eval == "finetune" or self.seeds else seeds[:1]


def default_cass(prof: Profile, data: str, **kw) -> Cass:
    c = Cass(data, prof.cnn, prof.vit, prof.bs, prof.epochs, prof.init)
    c = replace(c, **kw)
    if prof.init == "imagenet" and "init" not in kw:  # an arm timm has no ImageNet weights for starts random
        if c.vit in NO_IMAGENET:
            c = replace(c, init="random")
        elif c.cnn in NO_IMAGENET:
            c = replace(c, cnn_init="random")  # the ViT keeps its ImageNet start, as in Tables 15 and 17
    return c


def default_dino(prof: Profile, data: str, arch: str, **kw) -> Dino:
    return replace(Dino(data, arch, prof.bs, prof.epochs, prof.init), **kw)


def supervised(prof: Profile, data: str, arch: str, frac: float) -> Finetune:
    init = "random" if (prof.init == "imagenet" and arch in NO_IMAGENET) else prof.init
    return Finetune(data, arch, frac, None, None, init)


def main_cells(prof: Profile, data: str, fracs, paper_table: str = None) -> list:
    """Rows as the paper's Tables 1, 3-5: DINO, CASS, Supervised for the CNN, then for the Transformer."""
    cells = []
    for arm in ("cnn", "vit"):
        arch = prof.cnn if arm == "cnn" else prof.vit
        for method in ("dino", "cass", "supervised"):
            for f in fracs:
                if method == "cass":
                    ft = Finetune(data, arch, f, default_cass(prof, data), arm)
                elif method == "dino":
                    ft = Finetune(data, arch, f, default_dino(prof, data, arch), arm)
                else:
                    ft = supervised(prof, data, arch, f)
                paper = PR.main_cell(paper_table, method, arm, f) if paper_table else None
                cells.append(Cell(f"{METHOD_LABEL[method]} ({label(arch)})", frac_label(f), ft, paper))
    return cells


def cass_ablation(prof: Profile, table: str, data: str, variants) -> list:
    """Two cells per row (the CNN arm and the Transformer arm of CASS, 100% labels)."""
    cells = []
    for row, cass in variants:
        for arm, col in (("cnn", "CNN arm"), ("vit", "Transformer arm")):
            ft = Finetune(data, cass.arch(arm), 1.0, cass, arm)
            cells.append(Cell(row, col, ft, PR.ablation_cell(table, row, arm)))
    return cells


def supervised_ablation(prof: Profile, table: str, data: str, rows) -> list:
    return [Cell(row, "Supervised", supervised(prof, data, arch, 1.0), PR.ablation_cell(table, row, "value"))
            for row, arch in rows]


VIT_L, DEIT_B = "vit_large_patch16_384", "deit_base_patch16_384"
SWIN_B, DENSENET = "swin_base_patch4_window12_384", "densenet161"


def study(prof: Profile) -> dict:
    """{name: TableDef} of the mode: the paper's tables and figures, or the quick miniature."""
    tables = _study(prof)
    if prof.class_weights != "minmax":  # the mode's weighting for every fine-tuning run (probes need none)
        for td in tables.values():
            td.cells = [replace(c, ft=replace(c.ft, class_weights=prof.class_weights))
                        if c.ft.eval == "finetune" else c for c in td.cells]
    return tables


def _study(prof: Profile) -> dict:
    if prof.name == "quick":
        return quick_study(prof)
    if prof.name == "cpu":
        return cpu_study(prof)
    if prof.name == "cpu-options":
        return cpu_options_study(prof)
    if prof.name == "cpu-weights":
        return cpu_weights_study(prof)
    P, t = prof, {}
    main = {"table1": "autoimmune", "table3": "dermofit", "table4": "brain-mri", "table5": "isic2019"}
    for name, data in main.items():
        spec = PR.MAIN[name]
        t[name] = TableDef(name, spec["title"], data, PR.METRIC[data], "main",
                           main_cells(P, data, spec["fracs"], name))
    t["table2"] = TableDef("table2", "Pretraining wall time, CASS vs DINO (100 epochs)", "", "seconds", "time",
                           sources=[(d, default_cass(P, d), default_dino(P, d, P.cnn), default_dino(P, d, P.vit),
                                     PR.TABLE2[d]) for d in ("autoimmune", "dermofit", "brain-mri", "isic2019")])

    def abl(name, variants):
        spec = PR.ABLATION[name]
        d = spec["data"]
        t[name] = TableDef(name, spec["title"], d, PR.METRIC[d], "ablation",
                           cass_ablation(P, name, d, [(r, c(d)) for r, c in variants]))

    abl("table6", [(str(b), lambda d, b=b: default_cass(P, d, bs=b)) for b in (8, 16, 32)])
    for name in ("table7", "table8"):
        abl(name, [(str(e), lambda d, e=e: default_cass(P, d, epochs=e)) for e in (50, 100, 200, 300)])
    abl("table9", [(row, lambda d, a=a: default_cass(P, d, extra_aug=a)) for row, a in (
        ("CASS only", ()), ("CASS + Solarize", ("solarize",)), ("CASS + Gaussian blur", ("blur",)),
        ("CASS + Gaussian blur + Solarize", ("blur", "solarize")))])
    abl("table10", [("Adam", lambda d: default_cass(P, d)), ("SGD", lambda d: default_cass(P, d, cnn_opt="sgd"))])
    abl("table11", [(row, lambda d, h=h: default_cass(P, d, head_act=h)) for row, h in (
        ("Without Sigmoid or Softmax", "none"), ("With Sigmoid Layer", "sigmoid"), ("With Softmax Layer", "softmax"))])
    abl("table12", [("ViT Base/16", lambda d: default_cass(P, d)),
                    ("ViT Large/16", lambda d: default_cass(P, d, vit=VIT_L))])
    abl("table14", [("DeiT Base/16", lambda d: default_cass(P, d, vit=DEIT_B)),
                    ("ViT Base/16", lambda d: default_cass(P, d)),
                    ("ViT Large/16", lambda d: default_cass(P, d, vit=VIT_L))])
    for name in ("table15", "table17"):
        abl(name, [(label(c), lambda d, c=c: default_cass(P, d, cnn=c)) for c in ("resnet18", "resnet50", "resnet200")])
    abl("table18", [("ResNet-50 + ViT Base/16", lambda d: default_cass(P, d)),
                    ("ResNet-50 + DenseNet-161", lambda d: default_cass(P, d, vit=DENSENET))])
    abl("table19", [("ResNet-50 + ViT Base/16", lambda d: default_cass(P, d)),
                    ("Swin Transformer + ViT Base/16", lambda d: default_cass(P, d, cnn=SWIN_B))])
    for name in ("table20", "table21"):
        abl(name, [("Random", lambda d: default_cass(P, d, init="random")),
                   ("Imagenet", lambda d: default_cass(P, d, init="imagenet"))])
    for name, rows in (("table13", [("ResNet-50", "resnet50"), ("ViT Base/16", P.vit), ("ViT Large/16", VIT_L)]),
                       ("table16", [("ResNet-18", "resnet18"), ("ResNet-50", "resnet50"),
                                    ("ResNet-200", "resnet200")])):
        spec = PR.ABLATION[name]
        t[name] = TableDef(name, spec["title"], spec["data"], PR.METRIC[spec["data"]], "supervised",
                           supervised_ablation(P, name, spec["data"], rows))
    t["fig2"] = figure2(P, "autoimmune", PR.FIGURE2_EPOCHS, PR.FIGURE2_BATCH_SIZES)
    for name, data, n in (("fig7", "autoimmune", 30), ("fig8", "dermofit", 30), ("fig9", "brain-mri", 30),
                          ("fig10", "isic2019", 100)):
        t[name] = maps_def(P, name, data, n)
    ordered = [f"table{i}" for i in range(1, 22)] + ["fig2", "fig7", "fig8", "fig9", "fig10"]
    return {k: t[k] for k in ordered}


def figure2(prof: Profile, data: str, epochs, batch_sizes) -> TableDef:
    """Figure 2: fine-tuned (100% labels) performance against pretraining epochs and batch size,
    CASS vs DINO, CNN and Transformer. Cells: row = 'epochs=E' / 'bs=B', col = '<method> <arm>'."""
    cells = []
    for sweep, values in (("epochs", epochs), ("bs", batch_sizes)):
        for v in values:
            for arm in ("cnn", "vit"):
                arch = prof.cnn if arm == "cnn" else prof.vit
                cass = default_cass(prof, data, **{sweep: v})
                dino = default_dino(prof, data, arch, **{sweep: v})
                cells.append(Cell(f"{sweep}={v}", f"CASS {arm}", Finetune(data, arch, 1.0, cass, arm)))
                cells.append(Cell(f"{sweep}={v}", f"DINO {arm}", Finetune(data, arch, 1.0, dino, arm)))
    return TableDef("fig2", "Performance vs pretraining epochs and batch size (100% labels)", data,
                    PR.METRIC.get(data, "f1_macro"), "figure2", cells)


def maps_def(prof: Profile, name: str, data: str, n: int, frac: float = 1.0) -> TableDef:
    """Attention and feature maps: supervised vs CASS, both fine-tuned with `frac` of the labels (seed first)."""
    cells = []
    for arm in ("vit", "cnn"):
        arch = prof.cnn if arm == "cnn" else prof.vit
        cells.append(Cell("supervised", arm, supervised(prof, data, arch, frac)))
        cells.append(Cell("CASS", arm, Finetune(data, arch, frac, default_cass(prof, data), arm)))
    return TableDef(name, f"Attention and feature maps ({data})", data, "", "maps", cells, maps_n=n)


def frozen_cells(prof: Profile, data: str) -> list:
    """Every frozen backbone (CASS arms, DINO, random init) under a 20-NN vote and a linear probe, 100% labels."""
    cells = []
    for arm in ("cnn", "vit"):
        arch = prof.cnn if arm == "cnn" else prof.vit
        for row, src in (("CASS", default_cass(prof, data)), ("DINO", default_dino(prof, data, arch)),
                         ("Random init", None)):
            for ev, col in (("knn", "20-NN"), ("linear", "linear probe")):
                ft = Finetune(data, arch, 1.0, src, arm, prof.init, eval=ev)
                cells.append(Cell(f"{row} ({label(arch)})", col, ft))
    return cells


def quick_study(prof: Profile) -> dict:
    """The miniature: synthetic (6 classes) with every method fine-tuned and probed frozen, the
    multi-label synthetic data with the supervised rows, and CASS vs DINO pretraining time."""
    data, t = "synthetic", {}
    cells = [c for c in main_cells(prof, data, (0.1, 1.0)) if c.ft.frac < 1 or c.ft.method == "supervised"]
    t["quick_synthetic"] = TableDef(
        "quick_synthetic", "Synthetic miniature (synthetic, 6 classes), fine-tuned: test F1 (macro)", data,
        "f1_macro", "main", cells,
        note="The pretrained rows are fine-tuned with 10% of the labels only (100% for them would not fit the "
             "15 minutes); with all labels, the frozen probes below show what their pretraining learned.")
    t["quick_frozen"] = TableDef("quick_frozen", "Synthetic miniature, frozen pooled features with 100% of the "
                                 "labels: test F1 (macro) of a cosine 20-NN vote and of a logistic-regression probe",
                                 data, "f1_macro", "main", frozen_cells(prof, data),
                                 seeds=prof.seeds[:prof.pretrain_seeds])
    ml = "synthetic-multilabel"
    t["quick_synthetic_multilabel"] = TableDef(
        "quick_synthetic_multilabel", f"Synthetic miniature ({ml}, multi-label, 5 cell types), supervised: test F1 "
        "(macro)", ml, "f1_macro", "main",
        [Cell(f"Supervised ({label(arch)})", "100%", supervised(prof, ml, arch, 1.0)) for arch in (prof.cnn, prof.vit)],
        note="Supervised rows with all labels only (the pretraining comparison is on the single-label data, "
             "within the quick mode's 15 minutes).")
    t["quick_time"] = TableDef("quick_time", f"Pretraining wall time, CASS vs DINO ({prof.epochs} epochs, CPU)",
                               "", "seconds", "time",
                               sources=[(data, default_cass(prof, data), default_dino(prof, data, prof.cnn),
                                         default_dino(prof, data, prof.vit), None)])
    t["quick_maps"] = maps_def(prof, "quick_maps", data, 30, frac=0.1)
    return t


def cpu_study(prof: Profile) -> dict:
    """The brain-MRI study on a CPU: Table 4's shape with the paper's numbers beside (another scale and
    init), the frozen backbones' probes, and Table 2's timing measured in the same run."""
    data, t = "brain-mri", {}
    t["cpu_brain_mri"] = TableDef(
        "cpu_brain_mri", "Brain MRI, fine-tuned: test F1 (macro) (ours: ResNet-18 / ViT-Ti/16, 64 px, random init, "
        f"{prof.epochs} pretraining epochs, CPU; paper: ResNet-50 / ViT-B/16, 384 px, ImageNet init, 100 epochs)",
        data, "f1_macro", "main", main_cells(prof, data, (0.01, 0.1, 1.0), "table4"))
    t["cpu_frozen"] = TableDef("cpu_frozen", "Brain MRI, frozen pooled features with 100% of the labels: test "
                               "accuracy of a cosine 20-NN vote and of a logistic-regression probe", data,
                               "accuracy", "main", frozen_cells(prof, data))
    t["cpu_frozen_f1"] = replace(t["cpu_frozen"], name="cpu_frozen_f1", metric="f1_macro",
                                 title=t["cpu_frozen"].title.replace("test accuracy", "test F1 (macro)"))
    t["cpu_time"] = TableDef("cpu_time", f"Pretraining wall time, CASS vs DINO ({prof.epochs} epochs, brain MRI, "
                             "2-core CPU)", "", "seconds", "time",
                             sources=[(data, default_cass(prof, data), default_dino(prof, data, prof.cnn),
                                       default_dino(prof, data, prof.vit), PR.TABLE2[data])])
    return t


def cpu_options_study(prof: Profile) -> dict:
    """Each option against collapse beside the paper's recipe on the CPU study's setting: per option and
    arm, frozen 20-NN / linear probes (100% labels) and 1% / 10% fine-tuning (the profile's seeds),
    with the monitors and the pretraining time of each run (tables.build_options_table)."""
    data, cells, sources = "brain-mri", [], []
    for row, kw in CASS_OPTIONS:
        cass = default_cass(prof, data, **kw)
        sources.append((row, cass))
        for arm in ("cnn", "vit"):
            arch = cass.arch(arm)
            for ev in ("knn", "linear"):
                cells.append(Cell(row, f"{arm} {ev}", Finetune(data, arch, 1.0, cass, arm, prof.init, eval=ev),))
            for f in (0.01, 0.1):
                cells.append(Cell(row, f"{arm} {frac_label(f)}", Finetune(data, arch, f, cass, arm)))
    return {"cpu_options": TableDef("cpu_options", f"Options against collapse, brain MRI ({label(prof.cnn)} + "
                                    f"{label(prof.vit)}, {CPU_IMG} px, random init, {prof.epochs} epochs, CPU)",
                                    data, "f1_macro", "options", cells, sources=sources)}


def cpu_weights_study(prof: Profile) -> dict:
    """The focal loss's class weights (finetune.py --class-weights) on the CPU study's setting: supervised
    fine-tuning from random init at 10% labels, each backbone, the profile's seeds."""
    data, cells = "brain-mri", []
    for arch in (prof.cnn, prof.vit):
        for row, cw in CLASS_WEIGHTS:
            cells.append(Cell(f"{label(arch)}, {row}", "10%",
                              Finetune(data, arch, 0.1, None, None, prof.init, class_weights=cw)))
    f1 = TableDef("cpu_class_weights", f"Class weights of the focal loss, brain MRI, supervised from random init "
                  f"({CPU_IMG} px, CPU): test F1 (macro)", data, "f1_macro", "ablation", cells)
    bacc = replace(f1, name="cpu_class_weights_bacc", metric="balanced_accuracy",
                   title=f1.title.replace("F1 (macro)", "balanced accuracy"))
    return {"cpu_class_weights": f1, "cpu_class_weights_bacc": bacc}


# ---------------------------------------------------------------- the plan

@dataclass
class Job:
    kind: str  # data | cass | dino | finetune | maps | tables
    out: Path
    argv: list
    done: tuple = ()  # files whose existence means the job is finished
    needs: tuple = ()  # files that must exist before it can run
    after: tuple = ()  # outs of jobs of this plan that must have finished first (data preparation)
    log: Path = None  # where its output goes (default <out>/run_all.log)

    def log_path(self) -> Path:
        return ROOT / (self.log or self.out / "run_all.log")

    def is_done(self) -> bool:
        return bool(self.done) and all((ROOT / self.out / f).exists() for f in self.done)

    def command(self) -> str:
        return " ".join(shlex.quote(a) for a in ["python", *self.argv])


def roots_from(args) -> dict:
    roots = {}
    for data, (env, flag, _) in DATA_ROOTS.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"), None) or os.environ.get(env)
        if v:
            roots[data] = v
    return roots


def table_datasets(td: TableDef) -> set:
    if td.kind == "time":
        return {d for d, *_ in td.sources}
    return {td.data}


def plan(prof: Profile, names, roots: dict, log=print) -> list:
    """The ordered list of jobs for the named tables: for each data set a data job (read it, make its
    split); for each table the pretraining runs it needs, then its fine-tuning runs (each run once,
    however many tables share it), then its maps. Paper mode: tables whose data root is not given
    are skipped with a message."""
    tables = study(prof)
    jobs, seen = [], set()
    needs_roots = prof.name == "paper" or prof.data_roots_needed  # the quick mode's synthetic data needs none

    def add(job):
        if str(job.out) not in seen:
            seen.add(str(job.out))
            jobs.append(job)

    def add_data(data):
        out = prof.runs / "data" / data
        add(Job("data", out, ["run_all.py", "prepare-data", data, *([roots[data]] if data in roots else [])]))
        return (str(out),)

    def add_pretrain(src, seed):
        out = pretrain_dir(prof, src, seed)
        add(Job(src.method, out, src.argv(prof, seed, out, roots.get(src.data)), done=src.done_files(),
                after=add_data(src.data)))
        return out

    def add_finetune(ft, seed):
        argv = ["finetune.py", "--data", ft.data, *(["--data-root", roots[ft.data]] if ft.data in roots else []),
                "--arch", ft.arch, "--label-frac", f"{ft.frac:g}", "--seed", str(seed)]
        if ft.eval != "finetune":
            argv += ["--eval", ft.eval]
        if ft.class_weights != "minmax":
            argv += ["--class-weights", ft.class_weights]
        needs = ()
        if ft.source is not None:
            pre = add_pretrain(ft.source, pretrain_seed(prof, seed))
            w = pre / ft.source.weight_file(ft.arm)
            argv += ["--weights", str(w)]
            needs = (w,)
        else:
            argv += ["--init", ft.init]
        out = finetune_dir(prof, ft, seed)
        epochs = prof.ft_epochs(ft.arch, ft.frac)
        extra = ["--epochs", str(epochs)] if epochs and ft.eval == "finetune" else []
        add(Job("finetune", out, argv + ["--out", str(out), *prof.ft_args, *extra], done=("metrics.json",),
                needs=needs, after=add_data(ft.data)))
        return out

    for name in names:
        td = tables[name]
        missing = sorted(d for d in table_datasets(td) if needs_roots and d not in roots)
        if td.kind == "time":
            sources = [s for s in td.sources if s[0] not in missing]
            if missing:
                log(f"{name}: no data for {', '.join(missing)} ({root_hint(missing)}); "
                    + ("skipped" if not sources else "timing the others only"))
            for _, cass, dcnn, dvit, _ in sources:
                for s in range(prof.pretrain_seeds):
                    add_pretrain(cass, s), add_pretrain(dcnn, s), add_pretrain(dvit, s)
            continue
        if missing:
            log(f"{name}: skipped, data set {missing[0]} not given ({root_hint(missing)})")
            continue
        for cell in td.cells:  # the pretraining runs first, so they start as early as possible
            if cell.ft.source is not None:
                for seed in td.seeds_of(prof, cell.ft):
                    add_pretrain(cell.ft.source, pretrain_seed(prof, seed))
        for cell in td.cells:
            for seed in td.seeds_of(prof, cell.ft):
                add_finetune(cell.ft, seed)
        if td.kind == "maps":
            add(maps_job(prof, td, roots))
    return jobs


def prepare_data(data: str, root: str = None):
    """A data job (`python run_all.py prepare-data DATA [ROOT]`): read the data set once (generating
    the synthetic ones) and make its saved split before any training, so that a wrong data root fails
    at once and parallel runs never generate the same data twice."""
    from common import run_cli
    from datasets import get_split, load_table

    def go():
        t = load_table(data, root)
        split = get_split(t)
        print(f"{t.name}: {len(t)} images, split " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    run_cli(go)


def root_hint(missing) -> str:
    return "; ".join(f"set {DATA_ROOTS[d][0]}=... or {DATA_ROOTS[d][1]}" for d in missing if d in DATA_ROOTS)


def maps_job(prof: Profile, td: TableDef, roots: dict) -> Job:
    """attention_maps.py on the first seed's supervised and CASS fine-tuned weights (100% labels)."""
    seed = prof.seeds_for(td.data)[0]
    w = {(c.row, c.col): finetune_dir(prof, c.ft, seed) / "best.safetensors" for c in td.cells}
    out = prof.results / "figures" / td.data
    root = ["--data-root", roots[td.data]] if td.data in roots else []
    argv = ["attention_maps.py", "--data", td.data, *root, "--arch", prof.vit,
            "--weights", str(w[("supervised", "vit")]), "--compare", str(w[("CASS", "vit")]),
            "--labels", "supervised,CASS", "--cnn", prof.cnn, "--cnn-weights", str(w[("supervised", "cnn")]),
            "--cnn-compare", str(w[("CASS", "cnn")]), "--out", str(out), *prof.maps_args]
    if prof.name == "paper":
        argv += ["--n", str(td.maps_n)]
    return Job("maps", out, argv, needs=tuple(w.values()), log=prof.runs / "logs" / f"maps-{td.data}.log")


def tables_job(prof: Profile) -> Job:
    return Job("tables", prof.results,
               ["tables.py", "--mode", prof.name, "--runs", str(prof.runs), "--out", str(prof.results)],
               log=prof.runs / "logs" / "tables.log")


# ---------------------------------------------------------------- running

RUN_KINDS = ("cass", "dino", "finetune")
SCRIPTS = ("finetune", "pretrain_cass", "pretrain_dino")
JOBS_PER_WORKER = 25  # then a fresh worker process: no slow leaks
STOP_TIMEOUT = 120  # seconds the running jobs get to save a checkpoint after SIGTERM / Ctrl-C


def _worker_init(threads: int):
    """A worker process: set its CPU threads, then import the scripts once (torch and timm take
    seconds to import; a worker runs many jobs)."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import importlib

    import torch
    if threads:
        torch.set_num_threads(threads)
    for name in SCRIPTS:
        importlib.import_module(name)


def run_in_worker(argv: list, log_path) -> int:
    """Run one job, `python SCRIPT ARGS...`, as SCRIPT's main(ARGS) in this process, its output appended
    to log_path (None: the terminal). Returns the exit status the command line would have had, with
    the same one-line messages (common.exit_status, as common.run_cli: a UserError gives 2, a stop on a
    signal 128 + its number, running out of memory 3)."""
    import contextlib
    import gc
    import importlib
    import traceback

    import signal

    from common import exit_status
    with contextlib.ExitStack() as stack:
        if log_path:
            f = stack.enter_context(open(log_path, "a", buffering=1))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        try:
            rc = importlib.import_module(Path(argv[0]).stem).main(argv[1:]) or 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # (a stop on Ctrl-C / SIGTERM comes after the run saved its checkpoint)
            status = exit_status(e, argv[1:])
            if status is None:
                traceback.print_exc()
                rc = 1
            else:
                rc, line = status
                print(line, file=sys.stderr)
        finally:  # the next job in this worker starts with the usual signal behaviour
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()
    return rc


def _worker_loop(conn, threads: int, parent: int):
    """A worker process of execute(): run the jobs (argv, log path) that come on `conn`, answering
    each with its exit status, until None comes or the main process is gone.

    It leaves the main process's process group first: a terminal's Ctrl-C (SIGINT to the whole
    foreground group) then reaches the main process alone, which passes it on once. A run that got
    it twice, from the terminal and from the main process, would quit at once without saving its
    checkpoint (runs.StopOnSignal)."""
    os.setpgrp()
    _stop_when_orphaned(parent)
    _worker_init(threads)
    while True:
        try:
            task = conn.recv()
            if task is None:
                return
            conn.send(run_in_worker(*task))
        except (EOFError, OSError):  # the main process is gone
            return


def _stop_when_orphaned(parent: int):
    """Send this process SIGTERM as soon as its parent, the main process, is gone (killed with
    SIGKILL, say): the running job then saves its checkpoint after its current step and stops,
    instead of training on with nobody waiting for it."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class Worker:
    """One worker process of execute() (spawned, in its own process group) and the job it runs."""

    def __init__(self, ctx, threads: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, threads, os.getpid()), name="run_all-worker")
        self.proc.start()
        child.close()
        self.job, self.since, self.n_jobs = None, 0.0, 0  # job: None when idle

    def run(self, job: Job, log):
        self.conn.send((job.argv, log))
        self.job, self.since, self.n_jobs = job, time.time(), self.n_jobs + 1

    def result(self):
        """The job's exit status once it has ended, a string saying how the worker died if it died,
        None while the job runs."""
        if not self.conn.poll() and self.proc.is_alive():
            return None
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        self.proc.join()
        return _death(self.proc.exitcode)

    def send(self, sig):
        """Send `sig` to the worker; SIGKILL also to its process group (its data loader processes)."""
        if self.proc.exitcode is not None:  # gone already (and its process id free for reuse)
            return
        for kill in ((os.killpg, os.kill) if sig == signal.SIGKILL else (os.kill,)):
            try:
                kill(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):  # (no group yet: it has not called setpgrp)
                pass

    def close(self):
        """End the worker: an idle one is asked to, a busy one is killed."""
        if self.proc.exitcode is None:
            if self.job is None:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
                self.proc.join(10)
            self.send(signal.SIGKILL)
            self.proc.join()
        self.conn.close()


def _death(exitcode) -> str:
    """How a worker process ended, from its exit code."""
    if exitcode is None or exitcode >= 0:
        return f"exited with status {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"killed by {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL else "")


def _summary(job: Job, rc: int, seconds: float, died: str = None) -> list:
    """Lines to print when a job ends: its last output line, or the tail of its log on failure
    (died: how its worker process died)."""
    logf = job.log_path()
    lines = [ln for ln in logf.read_text().splitlines() if ln.strip()] if logf.exists() else []
    if died or rc != 0:
        shown = logf.relative_to(ROOT) if logf.is_relative_to(ROOT) else logf
        what = f"{seconds:.0f}s): the worker process running it died: {died}" if died else f"exit {rc}, {seconds:.0f}s)"
        return ([f"  FAILED {job.kind} {job.out} ({what}; last lines of {shown}:"]
                + ["    " + ln for ln in lines[-15:]])
    last = lines[-1].strip() if lines else ""
    return [f"  done {job.kind} {job.out} ({seconds:.0f}s): {last[:160] + '...' if len(last) > 160 else last}"]


def execute(jobs: list, n_parallel: int, verbose: bool, keep_going: bool, t0: float,
            stop_timeout: float = STOP_TIMEOUT) -> list:
    """Run the jobs that are not done on n_parallel worker processes, each job as soon as the files
    it needs exist (fine-tuning waits for its pretraining) and its data set is prepared, in plan
    order; the maps and the tables run last. Each job's output goes to <out>/run_all.log (with
    --verbose: the terminal). With several workers each gets cores / n_parallel CPU threads
    (OMP_NUM_THREADS, unless set). Returns the failed jobs; a job whose worker process died (killed,
    out of memory) is one, reported with how the worker died.

    SIGTERM or SIGINT (Ctrl-C) stops the sweep: it is passed on to every running job, which saves a
    checkpoint after its current step and stops (runs.StopOnSignal). After stop_timeout seconds,
    or at a second signal, the jobs still running are killed. Then one line names the stopped runs,
    and SystemExit(128 + the signal number) is raised."""
    import multiprocessing
    from multiprocessing.connection import wait

    todo = [j for j in jobs if not j.is_done()]
    final = [j for j in todo if j.kind in ("maps", "tables")]
    pending = [j for j in todo if j not in final]
    needed = {a for j in pending for a in j.after}
    pending = [j for j in pending if j.kind != "data" or str(j.out) in needed]  # data of finished runs: skip
    n_runs = sum(j.kind in RUN_KINDS for j in pending)
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // n_parallel))
    ctx = multiprocessing.get_context("spawn")
    workers, failed, started, signals = [], [], 0, []

    def busy():
        return [w for w in workers if w.job is not None]

    def start(job):
        nonlocal started
        started += job.kind in RUN_KINDS
        (ROOT / job.out).mkdir(parents=True, exist_ok=True)
        log = None if verbose else job.log_path()
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"\n$ {job.command()}\n")
        tag = f"[{started}/{n_runs}] " if job.kind in RUN_KINDS else ""
        print(f"{tag}start {job.kind} {job.out}  ({time.time() - t0:.0f}s elapsed)", flush=True)
        w = next((w for w in workers if w.job is None), None)
        if w is None:
            w = Worker(ctx, threads if n_parallel > 1 else 0)
            workers.append(w)
        w.run(job, log)

    def reap(timeout=1.0) -> list:
        """[(job, exit status or how its worker died, seconds)] of the jobs that ended within `timeout`."""
        wait([c for w in busy() for c in (w.conn, w.proc.sentinel)], timeout)
        ended = []
        for w in busy():
            rc = w.result()
            if rc is None:
                continue
            ended.append((w.job, rc, time.time() - w.since))
            w.job = None
            if isinstance(rc, str) or w.n_jobs >= JOBS_PER_WORKER:  # dead, or a fresh one next: no slow leaks
                w.close()
                workers.remove(w)
        return ended

    def report(job, rc, seconds):
        died = rc if isinstance(rc, str) else None
        if died and not verbose:
            with open(job.log_path(), "a") as f:
                f.write(f"run_all: the worker process running this job died: {died}\n")
        for line in _summary(job, 1 if died else rc, seconds, died):
            print(line)
        sys.stdout.flush()
        if rc != 0:
            failed.append(job)

    def stop():
        signum = signals[0]
        name = signal.Signals(signum).name
        print(f"\n{name} received: asking {len(busy())} running job(s) to save a checkpoint and stop (up to "
              f"{stop_timeout:g}s; a second signal ends them at once)", flush=True)
        for w in busy():
            w.send(signal.SIGTERM)  # even for SIGINT: outside its training loop a job then ends quietly
        saved, lost = [], []
        deadline = time.time() + stop_timeout
        while busy() and len(signals) < 2 and time.time() < deadline:
            for job, rc, seconds in reap(min(1.0, max(0.0, deadline - time.time()))):
                if rc in (128 + signal.SIGTERM, 128 + signal.SIGINT):
                    saved.append(job)
                elif isinstance(rc, str):  # ended by the signal outside its training loop
                    lost.append(job)
                else:
                    report(job, rc, seconds)
        for w in busy():
            lost.append(w.job)
            w.send(signal.SIGKILL)
        saved.sort(key=jobs.index), lost.sort(key=jobs.index)  # in plan order
        parts = []
        if saved:
            parts.append(f"checkpoint saved by {', '.join(str(j.out) for j in saved)}")
        if lost:
            parts.append("killed without a new checkpoint (resumes from its last saved epoch): "
                         + ", ".join(str(j.out) for j in lost))
        print(f"stopped by {name}: {'; '.join(parts) or 'no job was running'}; run the same command again to "
              "resume", flush=True)
        raise SystemExit(128 + signum)

    handlers = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (pending or busy()) and not signals:
            stop_new = failed and not keep_going
            taken = {str(j.out) for j in pending} | {str(w.job.out) for w in busy()} | {str(j.out) for j in failed}
            while not stop_new and pending and len(busy()) < n_parallel:
                ready = next((j for j in pending if all((ROOT / n).exists() for n in j.needs)
                              and not taken.intersection(j.after)), None)
                if ready is None:
                    break
                pending.remove(ready)
                start(ready)
            if not busy():
                for j in pending if not stop_new else []:
                    missing = next((n for n in j.needs if not (ROOT / n).exists()), None)
                    why = f"{missing} is missing" if missing else "its data preparation failed"
                    print(f"  skipped {j.kind} {j.out}: {why} (a failed run)")
                break
            for ended in reap():
                report(*ended)
        for j in final if not signals else []:
            missing = [n for n in j.needs if not (ROOT / n).exists()]
            if missing:
                print(f"  skipped {j.kind}: {missing[0]} is missing")
            elif j.kind == "tables" or keep_going or not failed:
                start(j)
                while busy() and not signals:
                    for ended in reap():
                        report(*ended)
            if signals:
                break
        if signals:
            stop()
    finally:
        for w in workers:
            w.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    return failed


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(PROFILES),
                   help="quick: synthetic miniature on CPU; cpu: the brain-MRI study on real data on a CPU "
                        "(BRAIN_MRI_ROOT, under 2 hours on 2 cores); cpu-options: the options against collapse "
                        "on that setting; cpu-weights: the focal loss's class weights on it; paper: the paper")
    p.add_argument("tables", nargs="*",
                   help="paper mode: tables/figures to run (table1 ... table21, fig2, fig7 ... fig10; fig3, fig5 "
                        "and fig6 come with fig7); default all")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                   help="list the plan and what is left, run nothing (also DRY_RUN=1)")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of fine-tuning seeds (quick: 2, 1 on synthetic-multilabel; paper: 5)")
    p.add_argument("--pretrain-seeds", type=int, default=None,
                   help="number of pretraining seeds: fine-tuning seed i uses pretraining seed i mod this "
                        "(quick: 1, paper: as many as --seeds)")
    p.add_argument("--keep-going", action="store_true",
                   help="after a failed run, go on with the runs that do not depend on it")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show every run's output, one run at a time (default: one line per run, the output in "
                        "<run folder>/run_all.log)")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="runs at a time (quick: 2, one CPU thread each, which uses a 2-core CPU better than one "
                        "run on two threads; paper: 1)")
    p.add_argument("--no-maps", action="store_true", help="skip the attention/feature maps")
    p.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT,
                   help="on SIGTERM or Ctrl-C, seconds the running jobs get to save a checkpoint and stop before "
                        "they are killed (a second signal kills them at once); default %(default)gs")
    p.add_argument("--runs", default=None, help="folder of the run folders (default runs/<mode>)")
    p.add_argument("--results", default=None, help="folder of the tables and figures (default results/<mode>)")
    for data, (env, flag, what) in DATA_ROOTS.items():
        p.add_argument(flag, default=None, help=f"{data}: {what} (default: ${env})")
    args = p.parse_args(argv)
    base = PROFILES[args.mode]
    prof = replace(base, runs_dir=args.runs or base.runs_dir, results_dir=args.results or base.results_dir)
    if args.jobs is None:
        args.jobs = prof.jobs
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.seeds is not None:
        if args.seeds < 1:
            p.error("--seeds must be at least 1")
        prof = replace(prof, seeds=tuple(range(args.seeds)), seeds_by_data=(), seeds_by_frac=(),
                       pretrain_seeds=min(prof.pretrain_seeds, args.seeds) if args.pretrain_seeds is None
                       else prof.pretrain_seeds)
    if args.pretrain_seeds is not None:
        if args.pretrain_seeds < 1:
            p.error("--pretrain-seeds must be at least 1")
        prof = replace(prof, pretrain_seeds=args.pretrain_seeds)
    known = list(study(prof))
    aliases = {"fig3": "fig7", "fig5": "fig7", "fig6": "fig7"} if args.mode == "paper" else {}
    names = []
    for n in args.tables:
        n = aliases.get(n.lower(), n.lower())
        if n not in known:
            p.error(f"unknown table '{n}' for mode {args.mode} (choose from {', '.join(known)})")
        if n not in names:
            names.append(n)
    if args.mode != "paper" and names:
        p.error(f"{args.mode} mode runs its whole study; name tables only in paper mode")
    args.names = names or known
    if args.no_maps:
        args.names = [n for n in args.names if study(prof)[n].kind != "maps"]
    return args, prof


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare-data"] and len(argv) in (2, 3):
        return prepare_data(*argv[1:])
    args, prof = get_args(argv)
    roots = roots_from(args)
    if prof.data_roots_needed or prof.name == "paper":
        for data, (env, flag, _) in DATA_ROOTS.items():
            if prof.name.startswith("cpu") and data != "brain-mri":
                continue
            print(f"  {data:11s} {roots.get(data, '(not set: ' + env + ' / ' + flag + ')')}")
    jobs = plan(prof, args.names, roots)
    jobs.append(tables_job(prof))
    runs = [j for j in jobs if j.kind in ("cass", "dino", "finetune")]
    left = [j for j in runs if not j.is_done()]
    by_kind = {k: sum(1 for j in runs if j.kind == k) for k in ("cass", "dino", "finetune")}
    print(f"{prof.name} mode: {len(runs)} runs ({by_kind['cass']} CASS pretraining, {by_kind['dino']} DINO "
          f"pretraining, {by_kind['finetune']} fine-tuning; seeds {list(prof.seeds)}"
          + "".join(f" ({d}: {list(s)})" for d, s in prof.seeds_by_data)
          + f", pretraining seeds {prof.pretrain_seeds}) under {prof.runs}/: {len(runs) - len(left)} done, "
          f"{len(left)} left")

    if args.dry_run:
        needed = {a for j in jobs if not j.is_done() for a in j.after}
        for j in jobs:
            if j.kind == "data" and str(j.out) not in needed:
                continue
            state = "done" if j.is_done() else ("always" if j.kind not in RUN_KINDS else "todo")
            print(f"[{state:6s}] {j.kind:8s} {j.command()}")
        print(f"dry run: nothing was run ({len(left)} runs left)")
        return 0

    t0 = time.time()
    n_parallel = 1 if args.verbose else args.jobs
    if n_parallel > 1:
        print(f"running up to {n_parallel} jobs at a time")
    failed = execute(jobs, n_parallel, args.verbose, args.keep_going, t0, args.stop_timeout)
    remaining = sum(1 for j in runs if not j.is_done())
    print(f"finished in {time.time() - t0:.0f}s; runs under {prof.runs}/, tables and figures under "
          f"{prof.results}/ ({prof.results / 'tables.md'})")
    if failed:
        print(f"{len(failed)} run(s) failed, {remaining} run(s) left: fix the cause and run the same command again "
              "to resume")
        return 1
    return 0


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `bash run_all.sh paper --dry-run | head` ends quietly
    sys.exit(main())
