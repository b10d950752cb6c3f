"""run_all.sh lists its plan without running anything (--dry-run / DRY_RUN=1), for the quick mode and
for a paper table whose data root is given; tables without data are skipped with a message; runs
whose metrics.json (fine-tuning) or weight files (pretraining) exist are skipped."""

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT
from study import cells as S
from study import job_runner as JR
from study import paper_results as P_R
from study import profiles as P
from study import run_all as RA


def run_all(*args, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("ISIC_ROOT", "BRAIN_MRI_ROOT", "DERMOFIT_ROOT",
                                                           "AUTOIMMUNE_CSV", "HAM10000_ROOT", "PBC_ROOT",
                                                           "DRY_RUN")}
    env.update(env_extra or {})
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def quick_run_count():
    """Pretraining (CASS + DINO x 2 per pretraining seed), the single-label grid (3 methods x 2 backbones at
    10%, the supervised ones also at 100%), the frozen probes (3 starts x 2 backbones x 2 probes per
    pretraining seed) and the multi-label supervised rows (2 backbones at 100%)."""
    q, ml = P.QUICK, "synthetic-multilabel"
    return (3 * q.pretrain_seeds + 6 * len(q.seeds_for("synthetic", 0.1)) + 2 * len(q.seeds_for("synthetic", 1.0))
            + 12 * q.pretrain_seeds + 2 * len(q.seeds_for(ml, 1.0)))


def todo_lines(stdout):
    return [ln for ln in stdout.splitlines() if ln.startswith("[todo")]


def test_quick_dry_run_lists_the_plan_and_runs_nothing(tmp_path):
    runs = tmp_path / "runs"
    proc = run_all("quick", "--dry-run", "--runs", runs, "--results", tmp_path / "res")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dry run: nothing was run" in out
    n_runs = len(todo_lines(out))
    assert n_runs == quick_run_count()
    assert f"{n_runs} runs left" in out
    # CASS and DINO for both backbones, per pretraining seed, on the single-label data only
    assert out.count("pretrain_cass.py --data synthetic ") == P.QUICK.pretrain_seeds == 2
    assert "pretrain_cass.py --data synthetic-multilabel" not in out
    assert out.count("pretrain_dino.py --data synthetic --arch test_resnet ") == 2
    assert out.count("pretrain_dino.py --data synthetic --arch test_vit ") == 2
    assert "--label-frac 0.1" in out and "--label-frac 1 " in out and "--init random" in out
    ft = [ln for ln in todo_lines(out) if "finetune.py" in ln]
    tuned = [ln for ln in ft if "--eval" not in ln]
    assert tuned and all("--class-weights inverse" in ln for ln in tuned)
    assert not any("--class-weights" in ln for ln in ft if "--eval" in ln)  # probes have no loss to weigh
    assert all("--epochs 20" in ln for ln in tuned if "--arch test_vit --label-frac 1 " in ln)
    assert all("--epochs 5" in ln for ln in tuned if "--arch test_resnet --label-frac 1 " in ln)
    assert all("--epochs 20" in ln for ln in tuned if "--label-frac 0.1 " in ln)
    # the pretrained rows are fine-tuned with 10% of the labels only
    assert not any("--weights" in ln for ln in tuned if "--label-frac 1 " in ln)
    assert sum("--eval knn" in ln for ln in ft) == sum("--eval linear" in ln for ln in ft) == 6 * 2
    assert "attention_maps.py" in out and "study.tables --mode quick" in out
    assert not runs.exists() and not (tmp_path / "res").exists()
    # every fine-tuning of pretrained weights comes after the run that makes them
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    for i, ln in enumerate(lines):
        if "--weights" in ln:
            w = ln.split("--weights ")[1].split()[0]
            maker = str(Path(w).parent)
            script = "finetune.py" if "attention_maps.py" in ln else "pretrain_"
            assert any(f"--out {maker} " in prev for prev in lines[:i] if script in prev), ln


def test_dry_run_env_variable(tmp_path):
    proc = run_all("quick", "--runs", tmp_path / "runs", env_extra={"DRY_RUN": "1"})
    assert proc.returncode == 0 and "dry run: nothing was run" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_paper_table_with_its_data_root(tmp_path):
    isic = tmp_path / "isic"
    isic.mkdir()
    proc = run_all("paper", "table5", "--dry-run", "--runs", tmp_path / "runs", env_extra={"ISIC_ROOT": str(isic)})
    assert proc.returncode == 0, proc.stderr
    todo = todo_lines(proc.stdout)
    # 1 CASS + 2 DINO pretraining runs per pretraining seed (5), 3 methods x 2 backbones x 3 fractions x 5 seeds
    assert len(todo) == 5 * 3 + 90
    assert all(f"--data isic2019 --data-root {isic}" in ln for ln in todo)
    text = proc.stdout
    assert "--cnn resnet50 --vit vit_base_patch16_384 --bs 16 --epochs 100 --init imagenet" in text
    assert "--label-frac 0.01" in text and "--seed 4" in text
    assert "pretrain_cass.py" in text and "pretrain_dino.py --data isic2019" in text


def test_paper_tables_without_data_are_skipped_with_a_message(tmp_path):
    proc = run_all("paper", "table1", "table7", "--dry-run", "--runs", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert "table1: skipped, data set autoimmune not given (set AUTOIMMUNE_CSV=" in proc.stdout
    assert "table7: skipped" in proc.stdout
    assert todo_lines(proc.stdout) == [] and "0 runs left" in proc.stdout


def test_paper_ablation_plan(tmp_path):
    csv = tmp_path / "auto.csv"
    csv.write_text("path,a\n")
    proc = run_all("paper", "table10", "table16", "--dry-run", "--seeds", "2", "--runs", tmp_path / "runs",
                   "--autoimmune-csv", csv)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "--cnn-opt sgd" in text and f"--data autoimmune --data-root {csv}" in text
    # ResNet-200 has no ImageNet weights in timm: random init, as the paper
    assert "--arch resnet200 --label-frac 1 --seed 0 --init random" in text
    assert "--arch resnet18 --label-frac 1 --seed 0 --init imagenet" in text


def test_plan_skips_finished_runs(tmp_path):
    runs = tmp_path / "runs"
    prof = replace(P.QUICK, runs_dir=str(runs))
    jobs = RA.plan(prof, list(S.study(prof)), {}, log=lambda *a: None)
    cass = next(j for j in jobs if j.kind == "cass")
    ft = next(j for j in jobs if j.kind == "finetune" and "--weights" in j.argv)
    # a finished fine-tuning run and a finished CASS pretraining run
    ft.out.mkdir(parents=True)
    (ft.out / "metrics.json").write_text("{}")
    cass.out.mkdir(parents=True)
    for f in ("cnn.safetensors", "vit.safetensors"):
        (cass.out / f).write_bytes(b"")
    # a half-done fine-tuning run (no metrics.json) still counts as to do
    other = next(j for j in jobs if j.kind == "finetune" and j is not ft)
    other.out.mkdir(parents=True)
    (other.out / "checkpoint.pt").write_bytes(b"")

    proc = run_all("quick", "--dry-run", "--runs", runs)
    assert proc.returncode == 0, proc.stderr
    done = [ln for ln in proc.stdout.splitlines() if ln.startswith("[done")]
    assert len(done) == 2
    assert any(f"--out {ft.out} " in ln for ln in done) and any(f"--out {cass.out} " in ln for ln in done)
    total = quick_run_count()
    assert f"{total - 2} runs left" in proc.stdout and "2 done" in proc.stdout
    assert not any(f"--out {other.out} " in ln for ln in done)


def test_unknown_table_and_quick_with_tables_are_refused(tmp_path):
    proc = run_all("paper", "table99", "--dry-run")
    assert proc.returncode == 2 and "unknown table" in proc.stderr
    proc = run_all("quick", "table1", "--dry-run")
    assert proc.returncode == 2


def test_pretrain_seed_pairing():
    assert [S.pretrain_seed(P.QUICK, s) for s in P.QUICK.seeds] == [0, 1, 0]
    assert [S.pretrain_seed(P.PAPER, s) for s in P.PAPER.seeds] == [0, 1, 2, 3, 4]


def test_every_paper_table_is_planned_when_all_roots_are_set(tmp_path):
    roots = {d: str(tmp_path) for d in P.DATA_ROOTS}
    prof = replace(P.PAPER, runs_dir=str(tmp_path / "runs"))
    msgs = []
    jobs = RA.plan(prof, list(S.study(prof)), roots, log=msgs.append)
    assert msgs == []
    outs = [str(j.out) for j in jobs]
    assert len(outs) == len(set(outs))  # every run once, shared settings deduplicated
    archs = " ".join(" ".join(j.argv) for j in jobs if j.kind == "cass")
    for a in ("densenet161", "swin_base_patch4_window12_384", "vit_large_patch16_384", "deit_base_patch16_384",
              "resnet200", "resnet18", "--extra-aug blur,solarize", "--head-act softmax", "--bs 8", "--epochs 300"):
        assert a in archs, a
    assert sum(j.kind == "maps" for j in jobs) == 4
    # Tables 15 and 17: ResNet-200 (no ImageNet weights in timm) starts random, its ViT from ImageNet
    r200 = [" ".join(j.argv) for j in jobs if j.kind == "cass" and "--cnn resnet200 " in " ".join(j.argv)]
    assert r200 and all("--init imagenet" in a and "--cnn-init random" in a for a in r200)


FAKE_SCRIPT = '''
import sys, time
from pathlib import Path
from runtime.errors import UserError

def main(argv):
    out, action = Path(argv[0]), argv[1]
    print("working on", out)
    if action == "fail":
        time.sleep(3)  # outlasts the other jobs, which then all finish before the sweep stops
        raise UserError("this run fails on purpose")
    time.sleep(0.2)
    (out / "result.txt").write_text(" ".join(argv))
    print("fake done", out.name)
'''


@pytest.mark.slow
def test_execute_orders_by_needs_reports_failures_and_resumes(tmp_path, monkeypatch):
    """The runner on fake jobs (a module imported by the worker processes): a job waits for the file
    it needs, a failure is reported with the tail of its log and stops the sweep, and running the
    same plan again skips what is done."""
    (tmp_path / "fakejob.py").write_text(FAKE_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit the parent's sys.path
    a, b, c, d = (tmp_path / n for n in "abcd")

    def job(out, action, needs=()):
        return JR.Job("finetune", out, ["fakejob.py", str(out), action], done=("result.txt",), needs=needs)

    jobs = [job(b, "ok", needs=(a / "result.txt",)), job(a, "ok"), job(c, "fail"), job(d, "ok", needs=(c / "x",))]
    failed = JR.execute(jobs, 2, verbose=False, keep_going=False, t0=0)
    assert [j.out for j in failed] == [c]
    assert (a / "result.txt").exists() and (b / "result.txt").exists() and not (d / "result.txt").exists()
    assert "this run fails on purpose" in (c / "run_all.log").read_text()
    assert "fake done a" in (a / "run_all.log").read_text()
    # again, with the failing job fixed: only c and d run
    jobs[2] = job(c, "ok")
    jobs[3] = job(d, "ok", needs=(c / "result.txt",))
    before = (a / "run_all.log").read_text()
    assert JR.execute(jobs, 2, verbose=False, keep_going=False, t0=0) == []
    assert (d / "result.txt").exists() and (a / "run_all.log").read_text() == before


def test_cpu_mode_plans_the_brain_mri_study(tmp_path):
    mri = tmp_path / "mri"
    mri.mkdir()
    proc = run_all("cpu", "--dry-run", "--runs", tmp_path / "runs", env_extra={"BRAIN_MRI_ROOT": str(mri)})
    assert proc.returncode == 0, proc.stderr
    todo = todo_lines(proc.stdout)
    ft = [ln for ln in todo if "finetune.py" in ln and "--eval" not in ln]
    probes = [ln for ln in todo if "--eval" in ln]
    # 1 CASS + 2 DINO; 3 methods x 2 backbones x (3 + 3 + 2 seeds); 3 sources x 2 backbones x (knn, linear)
    assert len(todo) == 3 + 48 + 12 and len(ft) == 48 and len(probes) == 12
    assert all(f"--data brain-mri --data-root {mri}" in ln for ln in todo)
    pre = [ln for ln in todo if "pretrain_" in ln]
    assert all("--bs 16 --epochs 3 --init random" in ln and "--img-size 64" in ln for ln in pre)
    for frac, epochs, seeds in (("0.01", 15, 3), ("0.1", 10, 3), ("1", 3, 2)):
        lines = [ln for ln in ft if f"--label-frac {frac} " in ln]
        assert len(lines) == 6 * seeds and all(ln.endswith(f"--epochs {epochs}") for ln in lines)
    assert all("--label-frac 1 --seed 0 --eval" in ln and "--epochs" not in ln for ln in probes)
    assert sum("--init random" in ln for ln in probes) == 4  # the random-init baselines of both backbones
    assert "study.tables --mode cpu" in proc.stdout



def test_cpu_options_mode_shares_the_cpu_runs_and_adds_one_run_per_option(tmp_path):
    mri = tmp_path / "mri"
    mri.mkdir()
    proc = run_all("cpu-options", "--dry-run", env_extra={"BRAIN_MRI_ROOT": str(mri)})
    assert proc.returncode == 0, proc.stderr
    assert "under runs/cpu/" in proc.stdout and "--out results/cpu/options" in proc.stdout
    cass = [ln for ln in todo_lines(proc.stdout) + [ln for ln in proc.stdout.splitlines() if ln.startswith("[done")]
            if "pretrain_cass.py" in ln]
    flags = sorted(ln.split("--out ")[1].split(" ", 1)[1].replace("--img-size 64 --workers 0", "").strip()
                   for ln in cass)
    assert flags == ["", "--predictor", "--projector 256", "--projector 256 --predictor", "--var-reg 1"]
    ft = [ln for ln in proc.stdout.splitlines() if "finetune.py" in ln]
    assert len(ft) == 5 * 2 * (2 + 3 + 3)  # per option and arm: knn, linear, 3 seeds at 1% and at 10%
    assert all("--label-frac 1 " not in ln or "--eval" in ln for ln in ft)
    assert not any("pretrain_dino.py" in ln for ln in proc.stdout.splitlines())


def test_option_keys_leave_the_paper_recipe_key_unchanged():
    base = S.Cass("brain-mri", "resnet18", "vit_tiny_patch16_224", 16, 3, "random")
    assert base.key() == ("cass", "brain-mri", "resnet18", "vit_tiny_patch16_224", 16, 3, "random", (), "adam", "none")
    keys = {S.Cass("brain-mri", "resnet18", "vit_tiny_patch16_224", 16, 3, "random", **kw).key()
            for _, kw in P.CASS_OPTIONS}
    assert len(keys) == len(P.CASS_OPTIONS) and base.key() in keys


def test_cpu_weights_mode_adds_the_other_class_weights_beside_the_cpu_runs(tmp_path):
    mri = tmp_path / "mri"
    mri.mkdir()
    proc = run_all("cpu-weights", "--dry-run", env_extra={"BRAIN_MRI_ROOT": str(mri)})
    assert proc.returncode == 0, proc.stderr
    assert "under runs/cpu/" in proc.stdout and "--out results/cpu/class_weights" in proc.stdout
    ft = [ln for ln in proc.stdout.splitlines() if "finetune.py" in ln]
    assert len(ft) == 2 * 3 * 3  # backbones x weightings x seeds, at 10% labels
    assert all("--label-frac 0.1 " in ln for ln in ft)
    for cw in ("inverse", "none"):
        mine = [ln for ln in ft if f"--class-weights {cw} " in ln]
        assert len(mine) == 6 and all(f"supervised-random-cw{cw}/" in ln for ln in mine)
    paper = [ln for ln in ft if "--class-weights" not in ln]  # min-max: the cpu mode's own runs and folders
    assert len(paper) == 6 and all("/supervised-random/" in ln for ln in paper)
    keys = {S.Finetune("brain-mri", "resnet18", 0.1, None, None, "random", class_weights=cw).key()
            for _, cw in P.CLASS_WEIGHTS}
    assert len(keys) == 3 and S.Finetune("brain-mri", "resnet18", 0.1, None, None, "random").key() in keys


# ---------------------------------------------------------------- the CPU studies of HAM10000 and PBC

DATA_MODES = (("cpu-ham10000", "ham10000", "HAM10000_ROOT", "--ham10000-root"),
              ("cpu-pbc", "pbc", "PBC_ROOT", "--pbc-root"),
              ("cpu-pbc200", "pbc", "PBC_ROOT", "--pbc-root"))


@pytest.mark.parametrize("mode,data,env,flag", DATA_MODES)
def test_data_cpu_modes_need_their_data_root(tmp_path, mode, data, env, flag):
    """Without its data root (or with one that does not exist) a data set's CPU mode stops with one line
    naming the environment variable and the flag, and plans nothing."""
    proc = run_all(mode, "--dry-run", "--runs", tmp_path / "runs")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and env in proc.stderr and flag in proc.stderr, proc.stderr
    proc = run_all(mode, "--dry-run", "--runs", tmp_path / "runs", env_extra={env: str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no such folder" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("mode", ["cpu", "cpu-options", "cpu-weights", "cpu-resplit"])
def test_brain_mri_cpu_modes_need_their_data_root(tmp_path, mode):
    """The brain-MRI CPU modes stop with one line and exit 2 without BRAIN_MRI_ROOT, as the other data sets'
    modes do (they used to plan nothing, say so on stdout and exit 0)."""
    proc = run_all(mode, "--dry-run", "--runs", tmp_path / "runs", env_extra={"BRAIN_MRI_ROOT": ""})
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
    assert proc.stderr.strip().count("\n") == 0 and "BRAIN_MRI_ROOT" in proc.stderr and "--brain-mri-root" in proc.stderr
    assert not (tmp_path / "runs").exists()


def data_mode_plan(tmp_path, mode, env):
    root = tmp_path / "data"
    root.mkdir()
    proc = run_all(mode, "--dry-run", "--runs", tmp_path / "runs", env_extra={env: str(root)})
    assert proc.returncode == 0, proc.stderr
    todo = todo_lines(proc.stdout)
    ft = [ln for ln in todo if "finetune.py" in ln and "--eval" not in ln]
    probes = [ln for ln in todo if "--eval" in ln]
    pre = [ln for ln in todo if "pretrain_" in ln]
    assert f"study.tables --mode {mode} " in proc.stdout
    return root, todo, ft, probes, pre


def assert_fracs(ft, plan):
    """plan: (label fraction, fine-tuning epochs, seeds) for each of the 3 methods x 2 backbones."""
    assert len(ft) == 6 * sum(seeds for _, _, seeds in plan)
    for frac, epochs, seeds in plan:
        lines = [ln for ln in ft if f"--label-frac {frac} " in ln]
        assert len(lines) == 6 * seeds and all(f"--epochs {epochs}" in ln.split("--out ")[1] for ln in lines)
        for s in range(seeds):
            assert sum(f"--seed {s} " in ln for ln in lines) == 6


def test_cpu_ham10000_mode_plans_the_study_on_all_of_ham10000(tmp_path):
    root, todo, ft, probes, pre = data_mode_plan(tmp_path, "cpu-ham10000", "HAM10000_ROOT")
    assert len(todo) == 3 + 48 + 12 and len(probes) == 12 and len(pre) == 3
    assert all(f"--data ham10000 --data-root {root} " in ln for ln in todo)
    assert not any("--train-size" in ln for ln in todo)
    assert all("--bs 16 --epochs 2 --init random" in ln and "--img-size 64" in ln for ln in pre)
    assert all("--warmup-epochs 1 " in ln for ln in pre if "pretrain_dino.py" in ln)
    assert_fracs(ft, ((0.01, 11, 3), (0.1, 7, 3), (1, 2, 2)))
    assert all("--label-frac 1 --seed 0 --eval" in ln and "--epochs" not in ln for ln in probes)
    # the headline is balanced accuracy (the paper's ISIC metric), macro F1 beside, Table 5 as the paper column
    td = S.study(P.PROFILES["cpu-ham10000"])["cpu_ham10000"]
    assert td.metric == "balanced_accuracy" and td.beside == "f1_macro" and "another data set" in td.paper_label
    for c in td.cells:
        arm = "cnn" if c.ft.arch == P.CPU.cnn else "vit"
        assert c.paper is not None and c.paper == P_R.main_cell("table5", c.ft.method, arm, c.ft.frac)


def test_cpu_pbc_mode_plans_the_study_on_all_of_pbc(tmp_path):
    root, todo, ft, probes, pre = data_mode_plan(tmp_path, "cpu-pbc", "PBC_ROOT")
    assert len(todo) == 3 + 48 + 12 and len(probes) == 12
    assert all(f"--data pbc --data-root {root} " in ln for ln in todo)
    assert not any("--train-size" in ln for ln in todo)
    assert all("--bs 16 --epochs 1 --init random" in ln for ln in pre)
    assert all("--warmup-epochs 0 " in ln for ln in pre if "pretrain_dino.py" in ln)
    assert_fracs(ft, ((0.01, 6, 3), (0.1, 4, 3), (1, 1, 2)))
    td = S.study(P.PROFILES["cpu-pbc"])["cpu_pbc"]
    assert td.metric == "f1_macro" and all(c.paper is None for c in td.cells)  # the paper has no PBC results


def test_cpu_pbc200_mode_passes_the_training_subset_to_every_command(tmp_path):
    root, todo, ft, probes, pre = data_mode_plan(tmp_path, "cpu-pbc200", "PBC_ROOT")
    # 1 CASS + 2 DINO; 3 methods x 2 backbones x (3 seeds at 10% + 3 at 100%); 12 probes
    assert len(todo) == 3 + 36 + 12 and len(probes) == 12
    assert all(ln.split().count("--train-size") == 1 and "--train-size 200" in ln for ln in todo)
    assert all(f"--data pbc --data-root {root} " in ln for ln in todo)
    assert all("--bs 16 --epochs 50 --init random" in ln for ln in pre)
    assert all("--warmup-epochs 5 " in ln for ln in pre if "pretrain_dino.py" in ln)
    assert not any("--label-frac 0.01 " in ln for ln in todo)  # 1% of 200 images: 2 images
    assert_fracs(ft, ((0.1, 15, 3), (1, 15, 3)))
    assert P.PROFILES["cpu-pbc200"].runs != P.PROFILES["cpu-pbc"].runs  # no clash with the full set's runs


def test_cpu_resplit_mode_passes_resplit_to_every_command(tmp_path):
    root, todo, ft, probes, pre = data_mode_plan(tmp_path, "cpu-resplit", "BRAIN_MRI_ROOT")
    assert len(todo) == 3 + 48 + 12 and len(probes) == 12  # the cpu mode's plan
    assert all(ln.split().count("--resplit") == 1 for ln in todo)
    assert all(f"--data brain-mri --data-root {root} " in ln for ln in todo)
    assert_fracs(ft, ((0.01, 15, 3), (0.1, 10, 3), (1, 3, 2)))
    assert P.PROFILES["cpu-resplit"].runs != P.PROFILES["cpu"].runs  # its own runs: another split


# ---------------------------------------------------------------- the claim modes (results/claims.md)

CLAIM_PBC_MODES = ("claim3-batch", "claim4-epochs", "claim5-small-data", "claim6-ablations")


@pytest.mark.parametrize("mode,env", [(m, "PBC_ROOT") for m in CLAIM_PBC_MODES] + [("claim3-batch-mri", "BRAIN_MRI_ROOT")])
def test_claim_modes_need_their_data_root(tmp_path, mode, env):
    proc = run_all(mode, "--dry-run", "--runs", tmp_path / "runs")
    assert proc.returncode == 2 and proc.stdout == "" and env in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


def claim_plan(tmp_path, mode, env="PBC_ROOT"):
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    proc = run_all(mode, "--dry-run", "--runs", tmp_path / "runs", env_extra={env: str(root)})
    assert proc.returncode == 0, proc.stderr
    todo = todo_lines(proc.stdout)
    assert f"study.tables --mode {mode} " in proc.stdout and f"--out results/claims/{mode}" in proc.stdout
    return (root, todo, [ln for ln in todo if "finetune.py" in ln], [ln for ln in todo if "pretrain_cass.py" in ln],
            [ln for ln in todo if "pretrain_dino.py" in ln])


def assert_claim_pbc_protocol(root, todo, ft, dino, val_subset=True):
    """Every command on the 200-image subset; fine-tuning to convergence (up to 50 epochs, patience 5) with 100% of the
    labels, 3 seeds, no probes; DINO with the official 10 warm-up epochs (the script's default)."""
    assert all(f"--data pbc --data-root {root} " in ln for ln in todo)
    assert all(ln.split().count("--train-size") == 1 and "--train-size 200" in ln for ln in todo)
    assert ft and all(ln.endswith("--epochs 50 --patience 5") and ln.split().count("--epochs") == 1 for ln in ft)
    # claim 5 validates on the whole validation split; claims 3, 4 and 6 on a fixed 500-image subset (a budget cut)
    assert all(ln.split().count("--val-size") == val_subset and ("--val-size 500 " in ln) == val_subset for ln in ft)
    assert not any("--val-size" in ln for ln in todo if "finetune.py" not in ln)
    assert all("--label-frac 1 " in ln and "--eval" not in ln for ln in ft)
    assert all("--seed 0 " in ln for ln in todo if "pretrain_" in ln)  # one pretraining run per setting
    for s in (0, 1, 2):
        assert sum(f"--seed {s} " in ln for ln in ft) == len(ft) // 3
    assert not any("--warmup-epochs" in ln for ln in dino)
    assert all("--out-dim 4096 --workers 0" in ln for ln in dino)


def test_claim3_batch_mode_sweeps_cass_and_dino_over_batch_8_16_32(tmp_path):
    root, todo, ft, cass, dino = claim_plan(tmp_path, "claim3-batch")
    assert_claim_pbc_protocol(root, todo, ft, dino)
    for bs in (8, 16, 32):
        assert sum(f"--bs {bs} --epochs 50 " in ln and "--predictor" not in ln for ln in cass) == 1
        assert sum(f"--bs {bs} --epochs 50 " in ln for ln in dino) == 2  # ResNet-18 and ViT-Ti/16
        out = [ln.split("--out ")[1] for ln in ft if "-pred-" not in ln]
        assert sum(f"-bs{bs}-ep50-" in o for o in out) == 4 * 3  # 2 methods x 2 arms x 3 seeds
    # CASS --predictor beside the paper's CASS at batch 16 only, marked beyond the paper in the table
    pred = [ln for ln in cass if "--predictor" in ln]
    assert len(pred) == 1 and "--bs 16 " in pred[0]
    assert sum("-pred-" in ln for ln in ft) == 2 * 3
    assert len(ft) == 3 * 12 + 6
    td = S.study(P.PROFILES["claim3-batch"])["claim3_batch"]
    beyond = [c for c in td.cells if c.ft.source is not None and getattr(c.ft.source, "predictor", False)]
    assert beyond and all(S.BEYOND in c.row and c.col == "batch 16" for c in beyond)
    assert not any(S.BEYOND in c.row for c in td.cells if c not in beyond)


def test_claim3_batch_mri_mode_is_table6_on_brain_mri(tmp_path):
    root, todo, ft, cass, dino = claim_plan(tmp_path, "claim3-batch-mri", "BRAIN_MRI_ROOT")
    assert not dino and all(f"--data brain-mri --data-root {root} " in ln for ln in todo)
    assert not any("--train-size" in ln or "--predictor" in ln for ln in todo)
    assert sorted(ln.split("--bs ")[1].split()[0] for ln in cass) == ["16", "32", "8"]
    assert all("--epochs 3 --init random" in ln for ln in cass)
    # the cpu mode's protocol at 100% labels (3 epochs, patience 5 by default), 3 seeds, both arms
    assert len(ft) == 3 * 2 * 3 and all("--label-frac 1 " in ln and ln.endswith("--epochs 3") for ln in ft)
    assert P.PROFILES["claim3-batch-mri"].runs != P.CPU.runs  # the cpu mode's tables keep their seeds
    td = S.study(P.PROFILES["claim3-batch-mri"])["claim3_batch_mri"]
    assert all(c.paper == P_R.ablation_cell("table6", c.col.split()[1], c.ft.arm) for c in td.cells)


def test_claim4_epochs_mode_compares_50_and_100_epochs(tmp_path):
    root, todo, ft, cass, dino = claim_plan(tmp_path, "claim4-epochs")
    assert_claim_pbc_protocol(root, todo, ft, dino)
    for ep in (50, 100):
        assert sum(f"--bs 16 --epochs {ep} " in ln and "--predictor" not in ln for ln in cass) == 1
        assert sum(f"--bs 16 --epochs {ep} " in ln for ln in dino) == 2
        assert sum(f"-bs16-ep{ep}-" in ln.split("--out ")[1] for ln in ft) == 12 + (6 if ep == 50 else 0)
    assert [ln for ln in cass if "--predictor" in ln][0].count("--epochs 50 ") == 1


def test_claim5_small_data_mode_compares_every_method_on_200_images(tmp_path):
    root, todo, ft, cass, dino = claim_plan(tmp_path, "claim5-small-data")
    assert_claim_pbc_protocol(root, todo, ft, dino, val_subset=False)
    assert len(cass) == 2 and len(dino) == 2 and len(ft) == 4 * 2 * 3  # DINO, CASS, CASS --predictor, supervised
    assert sum("--init random" in ln for ln in ft) == 2 * 3
    td = S.study(P.PROFILES["claim5-small-data"])["claim5_small_data"]
    for c in td.cells:
        beyond = c.ft.method == "cass" and c.ft.source.predictor
        assert (S.BEYOND in c.row) == beyond and (c.paper is None) == beyond
    assert "another data set" in td.paper_label


def test_claim6_ablations_mode_maps_each_table_to_its_flag(tmp_path):
    root, todo, ft, cass, dino = claim_plan(tmp_path, "claim6-ablations")
    assert_claim_pbc_protocol(root, todo, ft, dino)
    assert not dino and not any("--predictor" in ln for ln in todo)
    flags = sorted(ln.split("-seed0 ")[1].replace("--img-size 64 --workers 0 --train-size 200", "").strip()
                   for ln in cass)
    assert flags == ["", "", "--cnn-opt sgd", "--extra-aug blur,solarize", "--head-act sigmoid", "--head-act softmax"]
    assert sum("--vit densenet121 " in ln for ln in cass) == 1 and all("--epochs 50 " in ln for ln in cass)
    # the recipe both arms; Tables 9-10 the Transformer arm, Table 11 both, Table 18 the CNN arm (shared by both pairs)
    folders = [ln.split("--out ")[1].split("/finetune/")[1].split("/")[0] for ln in ft]
    expect = {"": ("cnn", "vit"), "-aug_blur_solarize": ("vit",), "-cnnopt_sgd": ("vit",),
              "-head_sigmoid": ("cnn", "vit"), "-head_softmax": ("cnn", "vit")}
    for tag, arms in expect.items():
        for arm in ("cnn", "vit"):
            n = folders.count(f"cass-resnet18+vit_tiny_patch16_224-bs16-ep50-random{tag}-{arm}")
            assert n == (3 if arm in arms else 0), (tag, arm, n)
    assert sorted(f.rsplit("-", 1)[1] for f in folders if "densenet121" in f) == ["cnn"] * 3
    assert len(ft) == 3 * (2 + 1 + 1 + 2 + 2 + 1)
    tables = S.study(P.PROFILES["claim6-ablations"])
    assert sorted(tables) == ["claim6_table10", "claim6_table11", "claim6_table18", "claim6_table9"]
    assert tables["claim6_table10"].cells[-1].paper == P_R.ablation_cell("table10", "SGD", "vit")


def test_claim_pbc_modes_share_one_runs_folder_and_the_base_setting(tmp_path):
    profs = [P.PROFILES[m] for m in CLAIM_PBC_MODES]
    # claims 3, 4 and 6 validate on a 500-image subset, so they share their own folder, not claim 5's
    assert {p.name: str(p.runs) for p in profs} == {
        "claim3-batch": "runs/claims-pbc200-val500", "claim4-epochs": "runs/claims-pbc200-val500",
        "claim5-small-data": "runs/claims-pbc200", "claim6-ablations": "runs/claims-pbc200-val500"}
    assert len({p.results for p in profs}) == 4
    assert all(p.runs not in (P.CPU_PBC200.runs, P.CPU_PBC.runs) for p in profs)
    assert all(("--val-size" in p.ft_args) == (p.name != "claim5-small-data") for p in profs)
    base = S.default_cass(profs[0], "pbc").key()
    for p in profs:
        keys = {c.ft.source.key() for td in S.study(p).values() for c in td.cells if c.ft.source is not None}
        assert base in keys, p.name
