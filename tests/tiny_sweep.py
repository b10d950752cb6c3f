"""study/run_all.py's command line with one more mode, `tiny`: a sweep of a few short runs on the synthetic
data, for the tests of how run_all stops (test_run_all_signals.py).

    python tests/tiny_sweep.py tiny --runs R --results S [any study/run_all.py flag]

The plan: the data job, one CASS pretraining (timm's test_resnet + test_vit at 32 px, 64 images), then
two fine-tunings of test_resnet on 5% of the labels, one from the CASS CNN arm and one from random init
(the latter runs beside the pretraining with --jobs 2), then the tables. Run as a script, this file
is also the main module of run_all's spawned workers, so the mode exists there too (study/tables.py).

TINY_STUBBORN=N puts N jobs first that ignore SIGTERM and sleep, as a run stuck in a long step.

The tests stop a sweep while both runs are in their training loops, so the CASS run (8 epochs of a
fraction of a second each) must not end before the supervised run beside it has started training, on
however fast a CPU: after its first epoch's checkpoint, it waits until that run has saved one too (or
finished; at most a minute). This changes no number the runs compute."""

import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study import cells as S  # noqa: E402
from study import job_runner as JR  # noqa: E402
from study import profiles as P  # noqa: E402
from study import run_all as RA  # noqa: E402

EPOCHS = 8  # (of about 0.4 s each: a run lasts long enough to be stopped in the middle)
TINY = replace(P.QUICK, name="tiny", cnn="test_resnet", vit="test_vit", seeds=(0,), pretrain_seeds=1,
               seeds_by_data=(), seeds_by_frac=(), ft_epochs_by_frac=(), ft_epochs_by_arch=(), class_weights="minmax",
               epochs=EPOCHS, bs=16, jobs=2,
               cass_args=("--img-size", "32", "--limit-train", "64", "--workers", "0", "--monitor-bank", "32",
                          "--monitor-val", "16"),
               ft_args=("--img-size", "32", "--epochs", str(EPOCHS), "--bs", "32", "--patience", "0",
                        "--workers", "0"))


def tiny_study(prof) -> dict:
    cass = S.default_cass(prof, "synthetic")
    cells = [S.Cell("CASS (test_resnet)", "5%", S.Finetune("synthetic", prof.cnn, 0.05, cass, "cnn")),
             S.Cell("Supervised (test_resnet)", "5%", S.supervised(prof, "synthetic", prof.cnn, 0.05))]
    return {"tiny": S.TableDef("tiny", "Tiny sweep: test F1 (macro)", "synthetic", "f1_macro", "main", cells)}


def stubborn_jobs(prof) -> list:
    n = int(os.environ.get("TINY_STUBBORN", "0"))
    return [JR.Job("finetune", prof.runs / f"stubborn{i}", ["tiny_sweep.py", "stubborn"], done=("never",))
            for i in range(n)]


SUPERVISED = Path("finetune") / "supervised-random" / "test_resnet-frac0.05-seed0"  # (beside the CASS run)


def wait_for_the_supervised_run(stop_if_asked):
    def paced(guard):
        out = Path(guard.out)
        if guard.epoch == 0 and out.parent.name == "cass":
            sibling, deadline = out.parents[1] / SUPERVISED, time.time() + 60
            while not any((sibling / f).exists() for f in ("checkpoint.pt", "metrics.json")) \
                    and time.time() < deadline:
                time.sleep(0.02)
        stop_if_asked(guard)
    return paced


if "tiny" not in P.PROFILES:  # (this file runs twice in a worker: as its main module and as a job's module)
    P.PROFILES["tiny"] = TINY
    _study, _plan = S.study, RA.plan
    S.study = RA.study = lambda prof: tiny_study(prof) if prof.name == "tiny" else _study(prof)  # (study/tables.py, run_all)
    RA.plan = lambda prof, names, roots, log=print: stubborn_jobs(prof) + _plan(prof, names, roots, log)
    if __name__ != "__main__":  # (the runs train in the workers; the main process need not import torch)
        from runtime import runs as R
        R.TrainingGuard.stop_if_asked = wait_for_the_supervised_run(R.TrainingGuard.stop_if_asked)


def main(argv):
    """The stubborn job."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("stubborn job: ignoring SIGTERM", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    sys.exit(RA.main())
