"""The commands in the README and docs/ run as written: every `python SCRIPT.py` or `python -m MODULE`
names a file or module of the project, every flag it passes is one that command's --help lists, and
every `bash run_all.sh MODE` names a mode that exists."""

import re
from collections import defaultdict

import pytest

from conftest import ROOT, run_script

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_OURS = {"pytest", "venv", "pip", "torch.distributed.run"}
COMMAND = re.compile(r"(?:python3?|\.venv/bin/python) (-m [\w.]+|[\w/.-]+\.py)([^`#|\n]*)")


def _lines(text):
    return text.replace("\\\n", " ").splitlines()  # (a command continued over lines with \ is one line)


def documented_commands():
    found = defaultdict(set)  # target -> flags, over every doc
    for doc in DOCS:
        for line in _lines(doc.read_text()):
            for target, rest in COMMAND.findall(line):
                target = target.removeprefix("-m ")
                if target in NOT_OURS or target.startswith("tests/"):
                    continue
                found[target] |= {f.split("=")[0] for f in re.findall(r"(?<!\S)--[\w-]+", rest)}
    return found


COMMANDS = documented_commands()


def test_the_docs_name_commands_at_all():
    assert {"pretrain_cass.py", "finetune.py", "study.tables", "benchmarks.bench"} <= set(COMMANDS)


@pytest.mark.parametrize("target", sorted(COMMANDS))
def test_a_documented_command_exists_and_takes_its_flags(target, tmp_path):
    if target.endswith(".py"):
        assert (ROOT / target).is_file(), f"{target}: no such script"
    else:
        assert (ROOT / (target.replace(".", "/") + ".py")).is_file(), f"python -m {target}: no such module"
    proc = run_script(target, "--help", cwd=ROOT)
    missing = sorted(f for f in COMMANDS[target] if f not in proc.stdout)
    assert missing == [], f"{target}: the docs pass {missing}, which its --help does not list"


def test_documented_run_all_modes_exist():
    from study import profiles
    modes = set(profiles.PROFILES) | {"paper"}
    written = {m for doc in DOCS for m in re.findall(r"bash run_all\.sh ([a-z][\w-]*)", doc.read_text())}
    assert written and written <= modes, sorted(written - modes)
