"""The claim modes' tables as cells (results/claims.md; the modes are in study/profiles.py): claim 3's batch
sizes, claim 4's pretraining epochs, claim 5's smallest data regime and claim 6's ablations, each on the
PBC 200-image subset (claim 3 also on brain MRI), fine-tuned with 100% of the labels. Same cells as
study/cells.py's, so study/run_all.py runs them and study/tables.py builds their tables like any other
mode's; study/claims.py judges the tables."""

from study import paper_results as PR
from study.cells import BEYOND, Cell, Finetune, TableDef, default_cass, default_dino, supervised
from study.profiles import CLAIM_BATCH_SIZES, CLAIM_EPOCHS, CPU_IMG, METHOD_LABEL, Profile, frac_label, label

PREDICTOR_KW = {"predictor": True}  # the option the options study recommends (docs/monitoring-and-collapse.md)


def _arm_label(prof: Profile, method: str, arm: str, predictor: bool = False) -> str:
    arch = label(prof.cnn if arm == "cnn" else prof.vit)
    if method == "dino":
        return f"DINO ({arch})"
    return f"CASS --predictor, {BEYOND} ({arch} arm)" if predictor else f"CASS ({arch} arm)"


def _sweep_cells(prof: Profile, data: str, sweep: str, values, col, methods=("cass", "dino"), paper=None) -> list:
    """One row per method and arm, one column per value of the pretraining setting `sweep` (bs or epochs),
    fine-tuned with 100% of the labels; CASS --predictor (beyond the paper) at the base setting only."""
    cells = []
    for method in methods:
        for arm in ("cnn", "vit"):
            arch = prof.cnn if arm == "cnn" else prof.vit
            for v in values:
                src = (default_cass(prof, data, **{sweep: v}) if method == "cass"
                       else default_dino(prof, data, arch, **{sweep: v}))
                cells.append(Cell(_arm_label(prof, method, arm), col(v), Finetune(data, arch, 1.0, src, arm),
                                  paper(v, arm) if paper and method == "cass" else None))
    if prof.data == "pbc":  # the option beside the paper's recipe, at the base setting (study/profiles.py: a budget cut)
        base = getattr(prof, sweep)
        for arm in ("cnn", "vit"):
            src = default_cass(prof, data, **PREDICTOR_KW)
            cells.append(Cell(_arm_label(prof, "cass", arm, True), col(base), Finetune(data, src.arch(arm), 1.0, src, arm)))
    return cells


def _setting(prof: Profile) -> str:
    return (f"{label(prof.cnn)} + {label(prof.vit)}, {CPU_IMG} px, random init, CPU; fine-tuned with 100% of the labels "
            "to convergence (up to 50 epochs, patience 5)" if prof.data == "pbc" else
            f"{label(prof.cnn)} + {label(prof.vit)}, {CPU_IMG} px, random init, {prof.epochs} pretraining epochs, CPU; "
            "fine-tuned with 100% of the labels for 3 epochs (the cpu mode's protocol)")


def claim3_study(prof: Profile) -> dict:
    """Claim 3 on the PBC subset: CASS and DINO (each backbone) pretrained at batch 8 / 16 / 32, as Figure 2b."""
    data = prof.data
    cells = _sweep_cells(prof, data, "bs", CLAIM_BATCH_SIZES, lambda b: f"batch {b}")
    note = ("Claim 3 (Introduction, Section 5.3.2, Figure 2b): CASS is robust to the pretraining batch size, DINO "
            "\"drops classification performance by 25% when trained with batch size 8\". The paper's Figure 2b "
            f"(autoimmune) prints no numbers: no paper column. {prof.epochs} pretraining epochs at every batch size "
            f"(fewer steps at larger batches, as in the paper). CASS --predictor is {BEYOND}, at batch {prof.bs} only.")
    return {"claim3_batch": TableDef("claim3_batch", f"Claim 3, pretraining batch size, {prof.title} ({_setting(prof)}, "
                                     f"{prof.epochs} pretraining epochs)", data, "f1_macro", "ablation", cells,
                                     note=note)}


def claim3_mri_study(prof: Profile) -> dict:
    """Claim 3 on brain MRI as the paper's Table 6: CASS alone at batch 8 / 16 / 32, both arms."""
    data = prof.data
    cells = _sweep_cells(prof, data, "bs", CLAIM_BATCH_SIZES, lambda b: f"batch {b}", methods=("cass",),
                         paper=lambda b, arm: PR.ablation_cell("table6", str(b), arm))
    note = ("Claim 3 as the paper's Table 6 tests it (CASS alone; the paper has no DINO on brain MRI). Paper column: "
            "Table 6, ResNet-50 / ViT-B/16, 384 px, ImageNet init, 100 epochs: another scale, for orientation.")
    return {"claim3_batch_mri": TableDef("claim3_batch_mri", f"Claim 3, pretraining batch size, {prof.title} "
                                         f"({_setting(prof)})", data, "f1_macro", "ablation", cells, note=note,
                                         paper_label="paper, Table 6")}


def claim4_study(prof: Profile) -> dict:
    """Claim 4 on the PBC subset: CASS and DINO (each backbone) pretrained for 50 and 100 epochs, as Figure 2a."""
    data = prof.data
    cells = _sweep_cells(prof, data, "epochs", CLAIM_EPOCHS, lambda e: f"{e} epochs")
    note = ("Claim 4 (Section 5.3.1, Figure 2a, Tables 7-8): CASS is robust to the number of pretraining epochs (the "
            "paper: 50 to 300). Here 50 and 100 epochs (the paper's recipe) at batch 16; DINO's warm-up is 10 epochs at "
            "both, so that only the epochs change. No paper column (Figure 2a prints no numbers; Tables 7-8 are on "
            f"autoimmune and brain MRI). CASS --predictor is {BEYOND}, at {prof.epochs} epochs only.")
    return {"claim4_epochs": TableDef("claim4_epochs", f"Claim 4, pretraining epochs, {prof.title} ({_setting(prof)}, "
                                      f"batch {prof.bs})", data, "f1_macro", "ablation", cells, note=note)}


def claim5_study(prof: Profile) -> dict:
    """Claim 5 on the PBC subset: DINO, CASS (and CASS --predictor) and supervised training, each backbone,
    100% of the 200 labels, as Table 1's 100% column (198 images)."""
    data, cells = prof.data, []
    for arm in ("cnn", "vit"):
        arch = prof.cnn if arm == "cnn" else prof.vit
        for method, kw in (("dino", None), ("cass", {}), ("cass", PREDICTOR_KW), ("supervised", None)):
            for f in prof.fracs:
                if method == "dino":
                    ft = Finetune(data, arch, f, default_dino(prof, data, arch), arm)
                elif method == "cass":
                    ft = Finetune(data, arch, f, default_cass(prof, data, **kw), arm)
                else:
                    ft = supervised(prof, data, arch, f)
                row = (f"CASS --predictor, {BEYOND} ({label(arch)})" if kw else f"{METHOD_LABEL[method]} ({label(arch)})")
                paper = None if kw else PR.main_cell("table1", method, arm, f)
                cells.append(Cell(row, frac_label(f), ft, paper))
    note = ("Claim 5 (Table 1, Section 1): CASS works with the smallest data set, 198 images. Paper column: Table 1, "
            "autoimmune (198 multi-label biopsy images), ANOTHER DATA SET, ResNet-50 / ViT-B/16, 384 px, ImageNet init, "
            "100 epochs: for orientation and for the size of the paper's gaps. Table 1's 10% column is not run here "
            "(a budget cut: study/profiles.py).")
    return {"claim5_small_data": TableDef(
        "claim5_small_data", f"Claim 5, the smallest data regime, {prof.title} (ours: {label(prof.cnn)} / "
        f"{label(prof.vit)}, {CPU_IMG} px, random init, {prof.epochs} pretraining epochs, CPU, fine-tuned to "
        "convergence)", data, "f1_macro", "main", cells, note=note,
        paper_label="paper on autoimmune (198 images), another data set")}


# Claim 6: (table, the paper's row label of the recipe, [(paper row label, our row label, Cass options, arms)])
CLAIM6_ABLATIONS = (
    ("table9", "CASS only", [("CASS + Gaussian blur + Solarize", "CASS + Gaussian blur + Solarize",
                              {"extra_aug": ("blur", "solarize")}, ("vit",))]),
    ("table10", "Adam", [("SGD", "SGD for the CNN arm", {"cnn_opt": "sgd"}, ("vit",))]),
    ("table11", "Without Sigmoid or Softmax", [("With Sigmoid Layer", "With Sigmoid Layer", {"head_act": "sigmoid"},
                                                ("cnn", "vit")),
                                               ("With Softmax Layer", "With Softmax Layer", {"head_act": "softmax"},
                                                ("cnn", "vit"))]),
    ("table18", "ResNet-50 + ViT Base/16", [("ResNet-50 + DenseNet-161", "ResNet-18 + DenseNet-121",
                                             {"vit": "densenet121"}, ("cnn",))]),
)
CLAIM6_CLAIMS = {"table9": "BYOL-like augmentations (Gaussian blur and solarize) hurt the Transformer",
                 "table10": "SGD for the CNN arm costs the Transformer about 6 points",
                 "table11": "no sigmoid or softmax before the loss is best, for both arms",
                 "table18": "a CNN-Transformer pair beats a CNN-CNN pair (the CNN arm, which both pairs share)"}


def claim6_study(prof: Profile) -> dict:
    """Claim 6 on the PBC subset: each ablation's variant beside the paper's recipe (both arms), the variant
    fine-tuned on the arm the paper's claim is about; one table per paper table."""
    data, t = prof.data, {}
    base = default_cass(prof, data)
    recipe = f"{label(prof.cnn)} + {label(prof.vit)}"
    for table, paper_row, variants in CLAIM6_ABLATIONS:
        spec = PR.ABLATION[table]
        ours_base = recipe if table == "table18" else f"{paper_row} (the paper's recipe)"
        rows = [(paper_row, ours_base, base, ("cnn", "vit"))] + \
            [(pr, row, default_cass(prof, data, **kw), arms) for pr, row, kw, arms in variants]
        cells = []
        for pr, row, cass, arms in rows:
            for arm in arms:
                col = "CNN arm" if arm == "cnn" else ("second arm" if table == "table18" else "Transformer arm")
                cells.append(Cell(row, col, Finetune(data, cass.arch(arm), 1.0, cass, arm),
                                  PR.ablation_cell(table, pr, arm)))
        name = f"claim6_{table}"
        paper_data = spec["data"].replace("brain-mri", "brain MRI")
        t[name] = TableDef(name, f"Claim 6, {table.replace('table', 'Table ')}: {CLAIM6_CLAIMS[table]}; {prof.title} "
                           f"({recipe}, {CPU_IMG} px, random init, {prof.epochs} pretraining epochs, CPU, fine-tuned "
                           "with 100% of the labels to convergence)", data, "f1_macro", "ablation", cells,
                           paper_label=f"paper on {paper_data}, another data set",
                           note=f"Paper column: {spec['title']}, ResNet-50 / ViT-B/16, 384 px, ImageNet init, 100 "
                                "epochs: another data set and scale, for the size of the paper's gap. A blank cell: an "
                                "arm the claim is not about, not run (a budget cut: study/profiles.py).")
    return t


CLAIM_STUDIES = {"3": claim3_study, "3-mri": claim3_mri_study, "4": claim4_study, "5": claim5_study,
                 "6": claim6_study}
