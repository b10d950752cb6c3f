"""The study as data: each table of the paper (or of a smaller mode) as cells, one fine-tuning
setting each (data set, backbone, label fraction, and where the weights come from: supervised from
an init, a CASS arm, or a DINO backbone), with the paper's number beside it. study/run_all.py turns the
cells into runs, study/tables.py reads the same cells back to build the tables.

The settings (Cass, Dino, Finetune) know their command line and their run folder; a setting shared
by several tables is one run."""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from study import paper_results as PR
from study.profiles import CASS_OPTIONS, CLASS_WEIGHTS, CPU_IMG, METHOD_LABEL, NO_IMAGENET, Profile, frac_label, label

BEYOND = "beyond the paper"  # marks the rows of options the paper does not have (the claim modes' --predictor)

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
    beside: str = ""  # a second metric in a column beside `metric` (F1 (macro) has micro F1 beside it anyway)
    paper_label: str = ""  # what the paper column holds, when it is not this table's data set

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
    if prof.claim:
        from study.claim_cells import CLAIM_STUDIES  # (it builds on this module's settings and cells)
        return CLAIM_STUDIES[prof.claim](prof)
    if prof.name == "quick":
        return quick_study(prof)
    if prof.name == "cpu":
        return cpu_study(prof)
    if prof.name == "cpu-options":
        return cpu_options_study(prof)
    if prof.name == "cpu-weights":
        return cpu_weights_study(prof)
    if prof.data:
        return cpu_data_study(prof)
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



def cpu_data_study(prof: Profile) -> dict:
    """The cpu mode's study on another real data set (prof.data: HAM10000, PBC, a PBC subset): the
    fine-tuning grid at the profile's label fractions (with the nearest paper table beside, labelled as
    such, when there is one), the frozen backbones' probes and the pretraining time, named after the mode."""
    data, name, t = prof.data, prof.name.replace("-", "_"), {}
    what = prof.title or data
    metric = PR.METRIC_LABEL.get(prof.metric, prof.metric)
    ours = (f"ours: {label(prof.cnn)} / {label(prof.vit)}, {CPU_IMG} px, random init, {prof.epochs} pretraining "
            f"epoch{'s' if prof.epochs != 1 else ''}, CPU")
    cells = main_cells(prof, data, prof.fracs, prof.paper_table or None)
    if prof.paper_table:
        spec = PR.MAIN[prof.paper_table]
        paper_data = spec["title"].split(":")[0]
        title = (f"{what}, fine-tuned: test {metric} ({ours}; paper column: its {prof.paper_table.replace('table', 'Table ')}"
                 f" on {paper_data}, ANOTHER DATA SET, ResNet-50 / ViT-B/16, 384 px, ImageNet init, 100 epochs)")
        note = (f"The paper column is the paper's {prof.paper_table.replace('table', 'Table ')} ({spec['title']}), "
                f"the nearest it has: a different data set (HAM10000 is a part of ISIC 2019's training images), "
                "a different scale and init. It is shown for orientation, not as a number these runs should reach.")
        paper_label = f"paper on {paper_data.split(' (')[0]}, another data set"
    else:
        title = f"{what}, fine-tuned: test {metric} ({ours})"
        note = (f"No paper column: the paper has no results on {data.upper() if data == 'pbc' else data} "
                "(its microscopy data, Table 1, is a private multi-label set of 198 biopsy images).")
        paper_label = ""
    t[name] = TableDef(name, title, data, prof.metric, "main", cells, note=note, beside=prof.beside,
                       paper_label=paper_label)
    frozen_metric = "accuracy" if prof.metric == "f1_macro" else prof.metric
    frozen = TableDef(f"{name}_frozen", f"{what}, frozen pooled features with 100% of the labels: test "
                      f"{PR.METRIC_LABEL.get(frozen_metric, frozen_metric)} of a cosine 20-NN vote and of a "
                      "logistic-regression probe", data, frozen_metric, "main", frozen_cells(prof, data))
    t[frozen.name] = frozen
    t[f"{name}_frozen_f1"] = replace(frozen, name=f"{name}_frozen_f1", metric="f1_macro", title=frozen.title.replace(
        f"test {PR.METRIC_LABEL.get(frozen_metric, frozen_metric)}", "test F1 (macro)"))
    paper_time = PR.TABLE2.get("isic2019") if prof.paper_table == "table5" else None
    t[f"{name}_time"] = TableDef(
        f"{name}_time", f"Pretraining wall time, CASS vs DINO ({prof.epochs} epoch{'s' if prof.epochs != 1 else ''}, "
        f"{what}, 2-core CPU)", "", "seconds", "time",
        sources=[(data, default_cass(prof, data), default_dino(prof, data, prof.cnn),
                  default_dino(prof, data, prof.vit), None)],
        note=("The paper's nearest timing is ISIC 2019's (Table 2, another data set): CASS "
              f"{paper_time['cass'] // 3600} h {paper_time['cass'] % 3600 // 60} min, DINO "
              f"{paper_time['dino'] // 3600} h {paper_time['dino'] % 3600 // 60} min for 100 epochs."
              if paper_time else ""))
    return t
