"""The modes of `bash run_all.sh` (quick, paper, cpu, cpu-options, cpu-weights, cpu-ham10000, cpu-pbc,
cpu-pbc200, and the claim modes of results/claims.md: claim3-batch, claim3-batch-mri, claim4-epochs,
claim5-small-data, claim6-ablations): each one's default
backbones, batch, epochs, seeds and the flags every run of the mode gets; and the names tables give
to backbones, methods and label fractions. What each mode runs is in study/cells.py (the claim modes':
study/claim_cells.py)."""

from dataclasses import dataclass, replace
from pathlib import Path

# Data sets read from a root (paper mode, and the CPU study of each real data set):
# name -> (environment variable, flag, what it is)
DATA_ROOTS = {
    "autoimmune": ("AUTOIMMUNE_CSV", "--autoimmune-csv", "CSV of image path + one 0/1 column per cell type"),
    "dermofit": ("DERMOFIT_ROOT", "--dermofit-root", "folder with one sub-folder per class"),
    "brain-mri": ("BRAIN_MRI_ROOT", "--brain-mri-root", "folder holding Training/ and Testing/"),
    "isic2019": ("ISIC_ROOT", "--isic-root", "folder holding ISIC_2019_Training_GroundTruth.csv and "
                 "ISIC_2019_Training_Input/"),
    "ham10000": ("HAM10000_ROOT", "--ham10000-root", "folder holding HAM10000_metadata.csv and the images "
                 "(HAM10000_images_part_1/ and _part_2/, or one folder)"),
    "pbc": ("PBC_ROOT", "--pbc-root", "folder holding PBC_dataset_normal_DIB/ (or the 8 class folders)"),
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
    data: str = ""  # a CPU study of one real data set other than brain MRI (study.cpu_data_study): its --data
    fracs: tuple = ()  # that study's label fractions
    metric: str = "f1_macro"  # that study's headline metric (metrics.json key)
    beside: str = ""  # a second metric shown beside the headline in its fine-tuning table
    paper_table: str = ""  # paper_results.MAIN table shown as the nearest paper column ("": none)
    title: str = ""  # the data set as the tables name it
    claim: str = ""  # a mode of the claims ledger (results/claims.md): which of study/claim_cells.py's CLAIM_STUDIES it runs

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

def _with_flag(args: tuple, flag: str, value: str) -> tuple:
    """`args` with the value after `flag` replaced."""
    i = args.index(flag)
    return args[:i + 1] + (value,) + args[i + 2:]


def _without_flag(args: tuple, flag: str) -> tuple:
    """`args` without `flag` and its value (the script's default applies)."""
    i = args.index(flag)
    return args[:i] + args[i + 2:]


# The CPU studies of HAM10000 and PBC: the cpu mode's protocol (ResNet-18 + ViT-Ti/16, 64 px, random init,
# batch 16, CASS and DINO with the cpu mode's DINO settings, min-max class weights, patience 5, the
# frozen 20-NN and linear probes, the monitors, the pretraining time), each sized for about 2 hours on
# a 2-core CPU (docs/run_all.md, "The HAM10000 and PBC studies", estimates until measured). Their
# training sets are larger than brain MRI's 4,995 images (HAM10000 about 7,010, PBC about 11,964), and
# cost grows with the images an epoch passes, so the cut is in the epochs: the full sets keep every
# training image, every label fraction and every seed of the cpu mode, and get about the same number of
# optimisation steps as the cpu mode instead of the same number of epochs (epochs scaled by
# 4,995 / training images). Validation is still scored after every epoch and the test once, on the whole
# (larger) splits; that part of the cost is what the fewer epochs buy back.
#
# HAM10000 (split by lesion, metadata CSV): 2 pretraining epochs (2 x 7,010 = 14,020 images, the cpu mode's
# 3 x 4,995 = 14,985); fine-tuning 11 / 7 / 2 epochs at 1% / 10% / 100% (770 / 4,907 / 14,020 labelled
# images passed, the cpu mode's 750 / 4,995 / 14,985); seeds as the cpu mode (3 / 3 / 2). Headline metric:
# balanced accuracy (the ISIC challenge's and the paper's Table 5's), macro F1 beside it; the paper column
# is Table 5 on ISIC 2019, a different (larger, 8-class) data set that contains HAM10000.
CPU_HAM10000 = replace(
    CPU, name="cpu-ham10000", epochs=2, ft_epochs_by_frac=((0.01, 11), (0.1, 7), (1.0, 2)),
    data="ham10000", fracs=(0.01, 0.1, 1.0), metric="balanced_accuracy", beside="f1_macro", paper_table="table5",
    title="HAM10000 (dermoscopy, 10,015 images of 7,470 lesions, 7 classes, split by lesion)")
# PBC, all of it: 1 pretraining epoch on the ~11,964 training images (80% of the cpu mode's pretraining
# steps; 2 epochs would add about 20 minutes of wall time over the budget), and DINO without a warm-up
# epoch (with 1 epoch, --warmup-epochs 1 would make the whole run a warm-up; 0: a cosine from the peak);
# fine-tuning 6 / 4 / 1 epochs at 1% / 10% / 100% (720 / 4,784 / 11,964 labelled images passed); seeds 3 / 3 / 2.
# No paper column: the paper has no PBC results.
CPU_PBC = replace(
    CPU, name="cpu-pbc", epochs=1, ft_epochs_by_frac=((0.01, 6), (0.1, 4), (1.0, 1)),
    dino_args=_with_flag(CPU.dino_args, "--warmup-epochs", "0"),
    data="pbc", fracs=(0.01, 0.1, 1.0),
    title="PBC (blood-cell microscopy, 17,092 images, 8 classes)")
# PBC with a 200-image training subset (--train-size 200 in every pretraining, fine-tuning and probe
# command: the size of the paper's Table 1 data, 198 images; validation (~1,709) and test (~3,419) stay
# whole). Pretraining is cheap here, so it gets 50 epochs (10,000 images passed, two thirds of the cpu
# mode's; the paper: 100 epochs on its 198 images) with a 5-epoch DINO warm-up (the official recipe's
# tenth). Labels: 10% (20 images) and 100% only, as the paper on its 198 images (1% would be 2 images).
# Fine-tuning 15 epochs at both (300 / 3,000 labelled images passed), 3 seeds at both (one more at 100%
# than the cpu mode: small sets vary more). Scoring the whole validation split after every epoch is most
# of a fine-tuning run's cost here, which is what keeps the epochs at 15. No paper column.
PBC_TRAIN_SIZE = 200
_SUBSET = ("--train-size", str(PBC_TRAIN_SIZE))
CPU_PBC200 = replace(
    CPU, name="cpu-pbc200", epochs=50, seeds_by_frac=(), ft_epochs_by_frac=((0.1, 15), (1.0, 15)),
    cass_args=CPU.cass_args + _SUBSET,
    dino_args=_with_flag(CPU.dino_args, "--warmup-epochs", "5") + _SUBSET,
    ft_args=CPU.ft_args + _SUBSET,
    data="pbc", fracs=(0.1, 1.0),
    title=f"PBC (blood-cell microscopy, 8 classes), {PBC_TRAIN_SIZE}-image training subset")
# Brain MRI re-split (--resplit in every command): the curator's Training/ and Testing/ pooled and split by us,
# stratified 70/10/20 with every group of copies in one part, so no test image has a copy in training (the
# curator's test: 486 of 1,311 do, 369 of the 405 notumor images; check_data.py). The cpu mode's protocol
# and budget otherwise (the training part has 4,900 images instead of 5,007). No paper column: the paper
# used the curator's split.
_RESPLIT = ("--resplit",)
CPU_RESPLIT = replace(
    CPU, name="cpu-resplit", cass_args=CPU.cass_args + _RESPLIT, dino_args=CPU.dino_args + _RESPLIT,
    ft_args=CPU.ft_args + _RESPLIT, data="brain-mri", fracs=(0.01, 0.1, 1.0),
    title="Brain MRI re-split by us (Training/ and Testing/ pooled, stratified 70/10/20, copies kept in one part)")

# The claims ledger (results/claims.md): the paper's claims 3-6 tested at CPU scale, one mode per claim
# group (docs/run_all.md, "The claim modes"; every cost there is an estimate until measured).
#
# On PBC with the 200-image training subset (claims 3, 4, 5, 6): ResNet-18 + ViT-Ti/16 at 64 px from random init,
# batch 16 (13 steps an epoch), --train-size 200 in every command, validation (~1,709) and test (~3,419) whole.
# Pretraining: CASS with the paper's recipe; DINO with the cpu mode's 4,096-d head and 2 local crops of 32 px and
# the official 10 warm-up epochs (the script's default, the same at 50 and 100 epochs, so that only the epochs
# change in claim 4, as in the paper's Tables 7-8). Fine-tuning to convergence with the paper's protocol, stated
# explicitly: up to 50 epochs, early stopping on the validation loss with patience 5 (finetune.py's defaults),
# Adam 3e-4, cosine, focal loss with min-max class weights; 3 fine-tuning seeds (0, 1, 2), mean +- sample std.
# Claims 3, 4 and 6 share one runs folder, runs/claims-pbc200-val500 (they validate on a subset: below), so a
# setting several claims use (the base: batch 16, 50 epochs; CASS, CASS --predictor, DINO; fine-tuned with 100%
# labels) runs once, in whichever mode comes first; claim 5 has its own, runs/claims-pbc200.
# Cuts, all forced by the budget (about 10 hours for the whole ledger, of which 1.9 h, measured, are claim 1's
# cpu-ham10000 and cpu-pbc), each with what it saves:
# - pretraining 50 epochs, not the paper's 100, except claim 4's 100-epoch row (the issue asks for 100 epochs
#   where the claim is about epochs; halves every other pretraining run);
# - one pretraining run per setting (pretraining seed 0); the 3 seeds are fine-tuning seeds, so the spread
#   leaves out pretraining's own variance (3 pretraining seeds would triple pretraining, about +5 h);
# - 100% labels only (Tables 6-11 and 18 and Figure 2 are at 100%; claim 5 drops Table 1's 10% column: 20
#   labelled images make 2 steps an epoch, likely to run to the 50-epoch cap, ~14 min a run, ~2 h for 18 runs);
# - CASS --predictor (beyond the paper) only at the base setting, beside CASS in claims 3, 4 and 5, not swept
#   over batch sizes or epochs nor given the ablations (each would add about 40 minutes);
# - claim 6: the variant the paper's claim names (Table 9: blur + solarize together; Table 10: SGD; Table 11:
#   sigmoid and softmax; Table 18: a CNN-CNN pair), fine-tuned on the arm the claim is about (Tables 9-10: the
#   Transformer; Table 11: both; Table 18: the CNN, which both pairs share); DenseNet-121 as the second CNN
#   (the paper's DenseNet-161 costs about 3 times as much).
# With the validation subset below, the five claim modes took about 5.8 h on a 2-core CPU, measured with
# claim4-epochs and claim6-ablations run after claim3-batch in its runs folder (docs/run_all.md, "The claim
# modes", which also gives their times alone and lists the next cuts and what each saves).
CLAIM_BASE_EPOCHS, CLAIM_EPOCHS = 50, (50, 100)
CLAIM_BATCH_SIZES = (8, 16, 32)
_TO_CONVERGENCE = ("--epochs", "50", "--patience", "5")  # finetune.py's defaults, the paper's, written out
_CLAIM_PBC = replace(
    CPU, name="claim5-small-data", epochs=CLAIM_BASE_EPOCHS, seeds_by_frac=(), ft_epochs_by_frac=(),
    cass_args=CPU.cass_args + _SUBSET,
    dino_args=_without_flag(CPU.dino_args, "--warmup-epochs") + _SUBSET,
    ft_args=CPU.ft_args + _SUBSET + _TO_CONVERGENCE,
    data="pbc", fracs=(1.0,), runs_dir="runs/claims-pbc200",
    title=f"PBC (blood-cell microscopy, 8 classes), {PBC_TRAIN_SIZE}-image training subset")
CLAIM5 = replace(_CLAIM_PBC, name="claim5-small-data", results_dir="results/claims/claim5-small-data", claim="5")
# Claims 3, 4 and 6 validate on a fixed stratified subset of 500 of the ~1,709 validation images (--val-size 500;
# the test stays whole): a cut decided after claim5-small-data's run showed what whole-split validation costs
# (measured: ~10 s a fine-tuning epoch, most of it validation, and runs often reach the 50-epoch cap, ~7.5 min a
# run), before any of these three modes ran. At that cost none of them fits the ~2.5 h a session can give a
# mode (claim3-batch: ~3.3 h), and a mode must finish where it started. Their own runs folder, so that none of
# claim5's whole-validation runs is reused for them.
CLAIM_VAL_SIZE = 500
_CLAIM_PBC_VAL = replace(_CLAIM_PBC, runs_dir=f"runs/claims-pbc200-val{CLAIM_VAL_SIZE}",
                         ft_args=CPU.ft_args + _SUBSET + ("--val-size", str(CLAIM_VAL_SIZE)) + _TO_CONVERGENCE)
CLAIM3 = replace(_CLAIM_PBC_VAL, name="claim3-batch", results_dir="results/claims/claim3-batch", claim="3")
CLAIM4 = replace(_CLAIM_PBC_VAL, name="claim4-epochs", results_dir="results/claims/claim4-epochs", claim="4")
CLAIM6 = replace(_CLAIM_PBC_VAL, name="claim6-ablations", results_dir="results/claims/claim6-ablations", claim="6")
# Claim 3 on brain MRI, as the paper's Table 6: CASS alone (the paper has no DINO there) at batch 8 / 16 / 32, both
# arms, 100% labels, 3 seeds. The cpu mode's protocol (3 pretraining epochs on the 5,007 training images, then
# 3 fine-tuning epochs with patience 5): a cut, since fine-tuning to convergence on 5,007 images costs about 2 min
# an epoch, 20-50 min a run. Its own runs folder (so as not to add a third 100% seed to the cpu mode's tables).
CLAIM3_MRI = replace(CPU, name="claim3-batch-mri", seeds_by_frac=(), data="brain-mri", fracs=(1.0,),
                     runs_dir="runs/claim3-batch-mri", results_dir="results/claims/claim3-batch-mri", claim="3-mri",
                     title="Brain MRI (7,019 images, 4 classes)")
CLAIM_MODES = (CLAIM3, CLAIM3_MRI, CLAIM4, CLAIM5, CLAIM6)
PROFILES = {"quick": QUICK, "paper": PAPER, "cpu": CPU, "cpu-options": CPU_OPTIONS, "cpu-weights": CPU_WEIGHTS,
            "cpu-ham10000": CPU_HAM10000, "cpu-pbc": CPU_PBC, "cpu-pbc200": CPU_PBC200, "cpu-resplit": CPU_RESPLIT,
            **{m.name: m for m in CLAIM_MODES}}

# timm has no ImageNet weights for plain ResNet-200 (only resnet200d); the paper used random init.
NO_IMAGENET = {"resnet200"}

LABELS = {
    "resnet18": "ResNet-18", "resnet50": "ResNet-50", "resnet200": "ResNet-200", "densenet161": "DenseNet-161",
    "densenet121": "DenseNet-121",
    "test_resnet": "test_resnet", "test_vit": "test_vit/16",
    "vit_tiny_patch16_224": "ViT-Ti/16", "vit_base_patch16_384": "ViT-B/16", "vit_large_patch16_384": "ViT-L/16",
    "deit_base_patch16_384": "DeiT-B/16", "swin_base_patch4_window12_384": "Swin-B (patch 4, window 12)",
}
METHOD_LABEL = {"cass": "CASS", "dino": "DINO", "supervised": "Supervised"}


def label(arch: str) -> str:
    return LABELS.get(arch, arch)


def frac_label(f: float) -> str:
    return f"{f * 100:g}%"

