"""Packaging: pyproject.toml declares ranges (a library must not replace a user's torch), constraints.txt
pins the exact tested set inside them, and the Makefile installs with it."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_dependencies_are_ranges_not_pins():
    for req in _requirements():
        ops = {spec.operator for spec in req.specifier}
        assert ops and not ops & {"==", "===", "~="}, f"{req}: declare a range (>=low,<next-major)"
        assert "<" in ops, f"{req}: give an upper bound (the next major release is untested)"


def test_constraints_pin_every_dependency_inside_its_range():
    pins = _pins()
    assert pins["torch"] == Version("2.13.0")
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name}: missing from constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt {name}=={pins[name]} is outside {req}"


def test_makefile_installs_with_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt .*-e '\.\[test\]'", make)
    assert re.search(r"^\$\(STAMP\): .*constraints\.txt", make, re.M)
