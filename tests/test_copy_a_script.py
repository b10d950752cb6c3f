"""Copying a script into a project of one's own: the script, the three shared modules (datasets.py,
models.py, losses.py) and the folders of the layers below them (pipeline/, runtime/, evaluation/) are
all it takes. In an empty folder holding just those, every script prints its --help and makes a tiny
run, chained as a user would chain them (CASS -> fine-tuning -> attention maps). The study engine
(study/) and the benchmarks (benchmarks/) are not copied, so a script that reached them would fail
here; and no module outside them names them in an import."""

import ast
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ("pretrain_cass.py", "pretrain_dino.py", "finetune.py", "attention_maps.py", "check_data.py")
SHARED = ("datasets.py", "models.py", "losses.py")
LAYERS = ("pipeline", "runtime", "evaluation")  # what the scripts stand on
ABOVE = ("study", "benchmarks")  # never under a script

SMALL = ["--data", "synthetic", "--init", "random", "--img-size", "32", "--workers", "0", "--epochs", "1"]
MONITOR = ["--monitor-bank", "32", "--monitor-val", "16"]
CHAIN = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, '.')
import pretrain_cass, pretrain_dino, finetune, attention_maps, check_data
helps = {{}}
for name, script in [('pretrain_cass', pretrain_cass), ('pretrain_dino', pretrain_dino), ('finetune', finetune),
                     ('attention_maps', attention_maps), ('check_data', check_data)]:
    try:
        script.main(['--help'])
    except SystemExit as e:
        helps[name] = e.code
small = {SMALL!r}
MONITOR = {MONITOR!r}
pretrain_cass.main([*small, '--cnn', 'test_resnet', '--vit', 'test_vit', '--bs', '16', '--limit-train', '32',
                    *MONITOR, '--out', 'cass'])
pretrain_dino.main([*small, '--arch', 'test_vit', '--bs', '8', '--limit-train', '16', '--local-size', '16',
                    '--local-crops', '2', '--out-dim', '256', '--hidden-dim', '64', '--bottleneck-dim', '32',
                    *MONITOR, '--out', 'dino'])
finetune.main([*small, '--arch', 'test_vit', '--weights', 'cass/vit.safetensors', '--bs', '16',
               '--label-frac', '0.1', '--out', 'ft'])
attention_maps.main(['--data', 'synthetic', '--img-size', '32', '--arch', 'test_vit',
                     '--weights', 'ft/best.safetensors', '--n', '2', '--out', 'maps'])
check_data.main(['--data', 'synthetic', '--json', 'check.json'])
loaded = sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in {ABOVE!r}}})
print(json.dumps({{'helps': helps, 'above': loaded}}))
"""


@pytest.mark.slow
def test_a_copied_script_runs_with_the_shared_modules_and_the_layers_below(tmp_path):
    for f in (*SCRIPTS, *SHARED):
        shutil.copy(ROOT / f, tmp_path / f)
    for d in LAYERS:
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", CHAIN], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"helps": {s.removesuffix(".py"): 0 for s in SCRIPTS}, "above": []}
    for made in ("cass/cnn.safetensors", "cass/vit.safetensors", "dino/backbone.safetensors", "ft/metrics.json",
                 "check.json"):
        assert (tmp_path / made).is_file(), made
    assert any((tmp_path / "maps").rglob("*.png"))


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_only_the_study_engine_and_the_benchmarks_import_them():
    below = [p for p in ROOT.glob("*.py")] + [p for d in LAYERS for p in (ROOT / d).glob("*.py")]
    offenders = {str(p.relative_to(ROOT)): m for p in below for m in _imports(p) if m.split(".")[0] in ABOVE}
    assert offenders == {}


def test_layers_only_look_down():
    """runtime/ imports no other layer of the project, pipeline/ only runtime/, evaluation/ only those two
    (and no script or shared module: those stand above every folder)."""
    allowed = {"runtime": {"runtime"}, "pipeline": {"runtime", "pipeline"},
               "evaluation": {"runtime", "pipeline", "evaluation"}}
    project = {p.stem for p in ROOT.glob("*.py")} | {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()}
    wrong = {}
    for layer, ok in allowed.items():
        for p in (ROOT / layer).glob("*.py"):
            bad = {m for m in _imports(p) if m.split(".")[0] in project and m.split(".")[0] not in ok}
            if bad:
                wrong[f"{layer}/{p.name}"] = sorted(bad)
    assert wrong == {}
