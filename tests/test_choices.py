"""Choices are declared once: each set of names (prediction types, beta schedules, samplers, optimizers, adapters,
precisions, image extensions, ...) has one owner constant; validation, the CLI's help and the code that implements
the choices use it. A second literal copy anywhere in src/ (a tuple, list, set or data dict with the same names, or
a string listing them all, e.g. a help text "a | b | c") fails here."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from latentforge import config, demo_budgets, samplers, schedule
from latentforge.adapters.inject import TEXT_TARGETS, UNET_TARGETS
from latentforge.adapters.layers import KINDS
from latentforge.cli import build_parser
from latentforge.config_loading import load_train_config
from latentforge.data import images, sources
from latentforge.errors import UserError
from latentforge.train import optimizers, setup

SRC = Path(__file__).resolve().parents[1] / "src" / "latentforge"

# (owner module file, constant name) -> its names
OWNERS = {
    **{("config.py", name): tuple(getattr(config, name)) for name in (
        "PREDICTION_TYPES", "BETA_SCHEDULES", "PRECISIONS", "TRAIN_PRECISIONS", "OPTIMIZERS", "ADAPTERS", "LORA_TARGETS",
        "LR_SCHEDULES", "TIMESTEP_SAMPLINGS", "CONDITIONINGS", "DEVICES", "RECON_LOSSES", "BUCKET_LEFTOVERS",
        "SAMPLER_NAMES", "SPACINGS", "LABELS", "PRESETS")},
    ("data/images.py", "IMAGE_EXTENSIONS"): tuple(images.IMAGE_EXTENSIONS),
    ("demo_budgets.py", "PRECISIONS"): demo_budgets.PRECISIONS,
    ("demo_budgets.py", "BUDGETS"): tuple(demo_budgets.BUDGETS),
}
SETS = {frozenset(v): f"{file}:{name}" for (file, name), v in OWNERS.items()}
SELECTIONS_OK = {"config.py:PRESETS"}  # a named part of the presets (config.SMALL_PRESETS) is a setting of its own
_SEPARATED = re.compile(r"[\w.+-]+(?:\s*(?:\||,|/|\bor\b)\s*[\w.+-]+)+")
_SEPARATOR = re.compile(r"\s*(?:\||,|/|\bor\b)\s*")


def _config_classes():
    seen, todo = [], [config.TrainConfig, config.VAETrainConfig]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo += [type(getattr(cls(), f.name)) for f in dataclasses.fields(cls)
                     if dataclasses.is_dataclass(getattr(cls(), f.name))]
    return seen


def _owned_values(tree: ast.Module, rel: str) -> set:
    """ids of the AST values that are an owner's own definition (module-level `NAME = ...` in its file)."""
    names = {name for file, name in OWNERS if file == rel}
    return {id(node.value) for node in tree.body if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id in names for t in node.targets)}


def _literal_names(node) -> frozenset | None:
    """The strings of a literal tuple/list/set of string constants, or of a dict literal with string keys and
    constant values (a data table; a dispatch table whose values are code is checked below instead)."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        elts = node.elts
    elif isinstance(node, ast.Dict) and all(isinstance(v, ast.Constant) for v in node.values):
        elts = node.keys
    else:
        return None
    if len(elts) >= 2 and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
        return frozenset(e.value for e in elts)
    return None


def _listed_in_text(text: str):
    """Every choice set a string spells out in full ("a | b | c", "a, b or c")."""
    for run in _SEPARATED.finditer(text):
        names = frozenset(_SEPARATOR.split(run.group()))
        for choice_set, owner in SETS.items():
            if len(choice_set) >= 3 and choice_set <= names:
                yield owner


def copies_in(source: str, rel: str) -> list:
    """The second copies of owner constants in `source` (the file src/latentforge/`rel`)."""
    tree = ast.parse(source)
    owned = _owned_values(tree, rel)
    found = []
    for node in ast.walk(tree):
        if id(node) in owned:
            continue
        names = _literal_names(node)
        if names in SETS:
            found.append(f"{rel}:{node.lineno}: a literal copy of {SETS[names]}")
        elif names is not None and len(names) >= 3:  # a part of a list, copied, falls behind it just the same
            found += [f"{rel}:{node.lineno}: a literal part of {owner}" for choice_set, owner in SETS.items()
                      if names < choice_set and owner not in SELECTIONS_OK]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{rel}:{node.lineno}: a string listing {owner}" for owner in _listed_in_text(node.value)]
    return found


def test_no_second_list_of_any_choices():
    found = [c for path in sorted(SRC.rglob("*.py")) for c in copies_in(path.read_text(), path.relative_to(SRC).as_posix())]
    assert not found, "use the owner's constant instead:\n" + "\n".join(found)


def test_the_scan_finds_a_copy():
    """The scan itself: a copied tuple, a data dict, a part of a list and a help string are each found; the owner
    and a pair (too common to tell) are not."""
    probe = ('X = ("epsilon", "v_prediction", "sample")\nD = {"fp32": "a", "bf16": "b", "fp16": "c"}\n'
             'P = {".png", ".jpg", ".webp"}\n'
             'H = "use ddpm | ddim | euler | euler-a | heun | dpmpp-2m"\nOK = ("epsilon", "sample")\n')
    found = copies_in(probe, "probe.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "a literal copy of config.py:PREDICTION_TYPES", "a literal copy of config.py:PRECISIONS",
        "a literal part of data/images.py:IMAGE_EXTENSIONS", "a string listing config.py:SAMPLER_NAMES"], found
    assert copies_in((SRC / "config.py").read_text(), "config.py") == []


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_refusal_lists_exactly_the_fields_choices(cls):
    """Every setting with choices is checked against its field's own list, and the one-line error names all."""
    section = {config.ScheduleConfig: "schedule.", config.LoRAConfig: "lora."}.get(cls, "")
    loader = config.VAETrainConfig if cls is config.VAETrainConfig else config.TrainConfig
    fields = [f for f in dataclasses.fields(cls) if "choices" in f.metadata]
    assert fields or cls in (config.UNetConfig, config.VAEConfig)
    for f in fields:
        assert f.metadata["choices"] in {v for v in OWNERS.values()}, f.name  # one of the owner constants
        with pytest.raises(UserError) as e:
            load_train_config(None, [f"{section}{f.name}=zzz"], cls=loader)
        assert str(e.value).endswith(f"— choose one of {', '.join(f.metadata['choices'])}"), str(e.value)
        for value in f.metadata["choices"]:  # and each choice is accepted
            got = load_train_config(None, [f"{section}{f.name}={value}"], cls=loader)
            assert getattr(getattr(got, section[:-1]) if section else got, f.name) == value


def test_the_implementations_cover_exactly_the_choices():
    assert set(KINDS) == set(config.ADAPTERS) - {"none"}
    assert tuple(samplers.SAMPLERS) == config.SAMPLER_NAMES  # the table, in the order the help lists them
    assert samplers.SPACINGS is config.SPACINGS and sources.LABELS is config.LABELS
    assert set(UNET_TARGETS) == set(TEXT_TARGETS) == set(config.LORA_TARGETS)
    assert optimizers.OPTIMIZERS is config.OPTIMIZERS
    assert schedule.PREDICTION_TYPES is config.PREDICTION_TYPES and schedule.BETA_SCHEDULES is config.BETA_SCHEDULES
    for name in config.BETA_SCHEDULES:
        assert schedule.make_betas(name, 10).shape == (10,)
    with pytest.raises(UserError, match="beta_schedule"):
        schedule.make_betas("zzz", 10)
    assert {p: setup.autocast_dtype(p) for p in config.TRAIN_PRECISIONS} == {
        "fp32": None, "bf16": torch.bfloat16, "bf16-autocast": torch.bfloat16, "fp16": torch.float16}
    assert config.PRECISIONS.items() <= config.TRAIN_PRECISIONS.items()


def test_cli_help_lists_the_owners_choices():
    """The flags' help is made from the owner constants (so it cannot fall behind them)."""
    def help_of(command: str, flag: str) -> str:
        parser = build_parser(command).commands[command]
        return next(a.help for a in parser._actions if flag in a.option_strings) % {"default": ""}

    assert " | ".join(config.SAMPLER_NAMES) in help_of("sample", "--sampler")
    assert " | ".join(config.SAMPLER_NAMES) in help_of("eval", "--sampler")
    assert " | ".join(config.SPACINGS) in help_of("img2img", "--spacing")
    assert " | ".join(config.PREDICTION_TYPES) in help_of("export", "--prediction-type")
    assert " | ".join(config.PRECISIONS) in help_of("export", "--dtype")
    labels = next(a for a in build_parser("cache").commands["cache"]._actions if "--labels" in a.option_strings)
    assert labels.choices is config.LABELS
    demo_flags = {a.dest: a.choices for a in build_parser("demo").commands["demo"]._actions}
    assert demo_flags["precision"] is demo_budgets.PRECISIONS and demo_flags["budget"] == tuple(demo_budgets.BUDGETS)
