"""`latentforge --help` and `latentforge COMMAND --help` load no torch (about 1.5 s of CPU on every start).

Measured as a user runs it: a fresh `python -X importtime -m latentforge ... --help`, whose stderr lists every
module imported (`import time: self | cumulative | name`, a child indented under its parent, printed before it).
The commands come from the CLI's own parser, so a new command is covered without touching this file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from latentforge.cli import build_parser

SRC = Path(__file__).resolve().parents[1] / "src"
_ROW = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|( *)(\S+)$")


def imported(stderr: str) -> list[tuple[int, str]]:
    """(depth, module) of each row of `-X importtime` output, in the order printed (children before parents)."""
    return [(len(m.group(1)), m.group(2)) for line in stderr.splitlines() if (m := _ROW.match(line))]


def who_imported(rows: list[tuple[int, str]], name: str) -> list[str]:
    """The chain that first loaded `name`: the module itself, then each parent up to the top-level import."""
    for i, (depth, module) in enumerate(rows):
        if module == name:
            chain = [module]
            for d, parent in rows[i + 1:]:  # a parent is printed after its children, one level less deep
                if d < depth:
                    chain.append(parent)
                    depth = d
            return chain
    return []


def test_the_reading_finds_torch_and_who_loaded_it():
    """The parser itself, on a fresh `import latentforge.samplers` (it needs torch): torch is found, with the
    chain up to the module imported."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import latentforge.samplers"], capture_output=True,
                       text=True, check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    chain = who_imported(imported(p.stderr), "torch")
    assert chain[0] == "torch" and chain[-1] == "latentforge.samplers", chain


@pytest.mark.parametrize("command", [None, *build_parser().commands], ids=lambda c: c or "latentforge")
def test_help_loads_no_torch(command):
    argv = [sys.executable, "-X", "importtime", "-m", "latentforge", *([command] if command else []), "--help"]
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert p.returncode == 0 and "usage: latentforge" in p.stdout, p.stderr[-2000:]
    rows = imported(p.stderr)
    assert any(m == "latentforge.cli" for _, m in rows)  # the reading saw the CLI load: it would see torch too
    chain = who_imported(rows, "torch")
    assert not chain, f"`{' '.join(argv[3:])}` imports torch through " + " <- ".join(chain)
