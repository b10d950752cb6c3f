"""What copying a script drags in: the optional parts (augmentation on the device, the decoded-image
cache, the synthetic-data generator, the CSV / brain MRI / ISIC / MedMNIST layouts, weight files, CPU
synchronised BatchNorm, the feature monitors, run_all's machinery) are imported only when a run uses them."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

OPTIONAL = ("pipeline.gpu_aug", "pipeline.decoded_cache", "pipeline.synthetic", "pipeline.synthetic_cells",
            "pipeline.layouts", "pipeline.dino_crops", "study.run_all", "study.job_runner", "study.cells",
            "study.tables", "runtime.weight_files", "runtime.cpu_sync_batchnorm", "evaluation.feature_monitors")
ALLOWED = {"pretrain_dino": {"pipeline.dino_crops"}, "finetune": {"runtime.weight_files"},
           "attention_maps": {"runtime.weight_files"}}


SCRIPTS = ("pretrain_cass", "pretrain_dino", "finetune", "attention_maps")

# One interpreter for the four scripts: each is imported with none of the project's modules loaded
# (those of the script before are dropped from sys.modules), and what it loaded is printed.
WHAT_EACH_IMPORTS = f"""
import json, sys
from pathlib import Path
project = {{p.stem for p in Path('.').glob('*.py')}} | {{p.name for p in Path('.').iterdir() if (p / '__init__.py').is_file()}}
loaded = {{}}
for script in {SCRIPTS!r}:
    for m in [m for m in sys.modules if m.split('.')[0] in project]:
        del sys.modules[m]
    __import__(script)
    loaded[script] = [m for m in {OPTIONAL!r} if m in sys.modules]
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def imported_at_start():
    out = subprocess.run([sys.executable, "-c", WHAT_EACH_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_imports_no_optional_module(script, imported_at_start):
    loaded = set(imported_at_start[script])
    allowed = ALLOWED.get(script, set())
    assert loaded <= allowed, f"{script} imports {sorted(loaded - allowed)} at start"


@pytest.mark.slow
def test_the_optional_modules_are_imported_when_used(tmp_path):
    code = ("import sys, numpy as np; import datasets as D; from pipeline import loading as L; "
            "t = D.load_table('synthetic'); L.cass_pipeline(t, np.arange(4), 16, (), 'cpu', gpu=True); "
            "print(' '.join(m for m in ('pipeline.gpu_aug', 'pipeline.synthetic', 'pipeline.decoded_cache') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) == {"pipeline.gpu_aug", "pipeline.synthetic"}  # (synthetic data: no decoded cache)


@pytest.mark.slow
def test_weight_files_are_imported_only_for_a_weight_file(tmp_path):
    code = ("import sys, models; m = models.create_backbone('test_resnet', 'random'); "
            "a = 'runtime.weight_files' in sys.modules; "
            f"models.save_weights(m, {str(tmp_path / 'w.safetensors')!r}); "
            f"models.create_backbone('test_resnet', {str(tmp_path / 'w.safetensors')!r}); "
            "print(a, 'runtime.weight_files' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.split() == ["False", "True"]
