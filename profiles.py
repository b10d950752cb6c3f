"""The modes of `bash run_all.sh` (quick, paper, cpu, cpu-options, cpu-weights): each one's default
backbones, batch, epochs, seeds and the flags every run of the mode gets; and the names tables give
to backbones, methods and label fractions. What each mode runs is in study.py."""

from dataclasses import dataclass, replace
from pathlib import Path


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

