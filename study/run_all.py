"""The whole study as a list of runs: the planner behind `bash run_all.sh`.

    bash run_all.sh quick                    # the study in miniature on the synthetic data (CPU, minutes)
    bash run_all.sh paper                    # every table and figure the data roots allow (GPU, weeks)
    bash run_all.sh paper table1 table7 fig2 # only these
    bash run_all.sh paper --dry-run          # list the plan, run nothing (or DRY_RUN=1)

Each table of the paper is defined once, in study/cells.py, as cells: one fine-tuning setting each
(data set, backbone, label fraction, and where the weights come from: supervised from an init, a
CASS arm, or a DINO backbone), with the paper's number beside it; the modes are in study/profiles.py. The
planner here turns the cells into commands of pretrain_cass.py, pretrain_dino.py and finetune.py, one per seed, each with its own
output folder under runs/<mode>/; study/tables.py reads the same cells back to build the tables.

Idempotent and resumable: a fine-tuning run whose metrics.json exists and a pretraining run whose
weight files exist are skipped; any other run is (re)started with the same command and output
folder, and the scripts themselves resume from their last checkpoint. So a sweep that died halfway
is finished by running the same command again.

The runs are executed (study/job_runner.py) by --jobs worker processes that import the scripts once and call each
script's main() with exactly the arguments of the command the plan prints (importing torch and timm
costs seconds, and the quick mode has 56 runs); each run's output goes to <run folder>/run_all.log.
Every printed command can also be run by hand.

Stopping: SIGTERM or Ctrl-C (`timeout`, `kill`, a scheduler's time limit) is passed on to every
running job, which saves a checkpoint after its current step and stops; run_all waits for them (at
most --stop-timeout seconds; a second signal: not at all), names the stopped runs in one line and
exits with 128 + the signal number. Workers whose main process is killed outright stop the same way
by themselves. A worker that dies (out of memory, killed) fails its run, reported with how it died.
"""

import argparse
import os
import sys
import time
from dataclasses import replace

from study.cells import TableDef, finetune_dir, pretrain_dir, pretrain_seed, study
from study.job_runner import RUN_KINDS, STOP_TIMEOUT, Job, execute
from study.profiles import DATA_ROOTS, PROFILES, Profile

# ---------------------------------------------------------------- the plan

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
        add(Job("data", out, ["study.run_all", "prepare-data", data, *([roots[data]] if data in roots else [])]))
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
    """A data job (`python -m study.run_all prepare-data DATA [ROOT]`): read the data set once (generating
    the synthetic ones) and make its saved split before any training, so that a wrong data root fails
    at once and parallel runs never generate the same data twice."""
    from datasets import get_split, load_table
    from runtime.cli import run_cli

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
               ["study.tables", "--mode", prof.name, "--runs", str(prof.runs), "--out", str(prof.results)],
               log=prof.runs / "logs" / "tables.log")



def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(PROFILES),
                   help="quick: synthetic miniature on CPU; cpu: the brain-MRI study on real data on a CPU "
                        "(BRAIN_MRI_ROOT, under 2 hours on 2 cores); cpu-options: the options against collapse "
                        "on that setting; cpu-weights: the focal loss's class weights on it; cpu-ham10000, cpu-pbc, "
                        "cpu-pbc200: the same study on HAM10000 (HAM10000_ROOT), PBC and a 200-image PBC training "
                        "subset (PBC_ROOT), each about 2 hours (estimated); claim3-batch, claim4-epochs, "
                        "claim5-small-data, claim6-ablations: the paper's claims 3-6 (batch size, pretraining epochs, "
                        "198 images, ablations) on the 200-image PBC subset (PBC_ROOT; claims 3, 4 and 6 share "
                        "runs/claims-pbc200-val500), fine-tuned to convergence, 3 seeds; claim3-batch-mri: claim 3 on brain "
                        "MRI as Table 6 (BRAIN_MRI_ROOT); results/claims.md and docs/run_all.md; paper: the paper")
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
    # A CPU study of real data (one data set: prof.data; the brain-MRI modes: their tables' data sets) has nothing
    # to run without its data; only paper mode skips the tables whose data is not given.
    needed = ([prof.data] if prof.data else
              sorted({d for td in study(prof).values() for d in table_datasets(td)}) if prof.data_roots_needed else [])
    for data in needed:
        env, flag, what = DATA_ROOTS[data]
        if data not in roots:
            print(f"run_all.sh {prof.name}: needs the {data} data: set {env}=DIR or {flag} DIR ({what})",
                  file=sys.stderr)
            return 2
        if not os.path.exists(roots[data]):
            print(f"run_all.sh {prof.name}: {env} / {flag} {roots[data]}: no such folder", file=sys.stderr)
            return 2
    if prof.data_roots_needed or prof.name == "paper":
        used = {d for td in study(prof).values() for d in table_datasets(td)}  # the mode's data sets only
        for data, (env, flag, _) in DATA_ROOTS.items():
            if data not in used:
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
