"""What copying a script drags in: the optional parts (augmentation on the device, the decoded-image
cache, the synthetic-data generator, the CSV / brain MRI / ISIC / MedMNIST layouts, run_all's machinery) are imported only when a run uses them."""

import subprocess
import sys

import pytest

from conftest import ROOT

OPTIONAL = ("gpu_aug", "decoded_cache", "synthetic", "synthetic_cells", "layouts", "dino_crops", "run_all",
            "job_runner", "study", "tables")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pretrain_cass", "pretrain_dino", "finetune", "attention_maps"])
def test_a_script_imports_no_optional_module(script):
    code = (f"import sys; import {script}; "
            f"print(' '.join(m for m in {OPTIONAL!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    allowed = {"dino_crops"} if script == "pretrain_dino" else set()
    assert loaded <= allowed, f"{script} imports {sorted(loaded - allowed)} at start"


@pytest.mark.slow
def test_the_optional_modules_are_imported_when_used(tmp_path):
    code = ("import sys, numpy as np; import datasets as D, loading as L; "
            "t = D.load_table('synthetic'); L.cass_pipeline(t, np.arange(4), 16, (), 'cpu', gpu=True); "
            "print(' '.join(m for m in ('gpu_aug', 'synthetic', 'decoded_cache') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) == {"gpu_aug", "synthetic"}  # (synthetic data: no decoded cache)
