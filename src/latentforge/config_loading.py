"""Resolving, writing and hashing training configs: TOML files, `key=value` overrides, type coercion.

    load_train_config(path, ["lr=3e-4", ...])   preset (`model=`) <- situational defaults <- TOML <- overrides
    to_toml(cfg)                                the full resolved config, re-runnable with --config
    config_hash(cfg) / math_dict(cfg)           the settings that change what training computes

The dataclasses, presets and the choices/ranges of every setting are config.py's; this module only reads them
(`field_choices`, `field_range`). Unknown keys, wrong types, values outside a setting's choices or range are one
`UserError` naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
import typing
from typing import Optional, Tuple, Union

from .config import (
    PRESETS, SITUATION_DEFAULTS, TrainConfig, VAETrainConfig, field_choices, field_range, situation,
)
from . import textfile
from .errors import UserError

# Keys that do not change what the run computes: they may differ on --resume. Everything else
# (including keys added later) is part of the config hash.
NON_MATH_KEYS = frozenset({
    "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompts", "sample_count", "sample_steps",
    "sample_guidance", "sample_seed", "log_every", "nan_max_consecutive", "device",
    "gradient_checkpointing", "compile", "vae_path", "text_encoder", "image_size", "holdout",
    "buckets", "bucket_step", "init", "val_every", "merge", "force_upcast",
})


def load_train_config(path=None, overrides=(), cls=None, base=None, init: bool = False):
    """Resolve a training config: defaults <- `base` <- TOML file <- `key=value` overrides.

    `cls` is TrainConfig (default) or VAETrainConfig; for TrainConfig, SITUATION_DEFAULTS (from-scratch on a
    small preset, or fine-tuning with `init`) sit between the defaults and the file. Unknown keys and wrong types raise a
    `UserError` naming the key and where it came from.
    """
    cls = cls or TrainConfig
    raw = _raw_settings(path, overrides)  # flat "section.key" -> (value, source)
    cfg = base if base is not None else cls()
    name, src = raw.pop("model", (cfg.model, "default"))
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"{src}: model={name!r} is not a preset — choose one of {', '.join(PRESETS)}")
    if cls is TrainConfig and (base is None or init):
        chosen = situation(name, init, raw.get("adapter", ("none",))[0] != "none")
        for key, value in (SITUATION_DEFAULTS[chosen][0] if chosen else {}).items():
            raw.setdefault(key, (value, f"default for this situation ({chosen})"))
    cfg = _with_preset(cfg, name)
    top, nested = {}, {}
    valid = list(_keys(cfg))
    for key, (value, src) in raw.items():
        section, _, sub = key.partition(".")
        if key not in valid:
            raise UserError(f"{src}: unknown key {key!r} — {_hint(key, valid, cls)}")
        owner = type(getattr(cfg, section)) if sub else cls
        value = _checked(owner, sub or key, value, key, src)
        (nested.setdefault(section, {}) if sub else top)[sub or key] = value
    for section, changes in nested.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **changes)
    return dataclasses.replace(cfg, **top)


def _with_preset(cfg, name: str):
    """A new preset replaces the model sections (unet, schedule, vae) wholesale."""
    if name == cfg.model:
        return cfg
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    return dataclasses.replace(cfg, model=name, **{k: getattr(PRESETS[name], k) for k in sections
                                                   if hasattr(PRESETS[name], k)})


def _hint(key: str, valid: list, cls) -> str:
    near = difflib.get_close_matches(key, valid, n=3)
    return f"did you mean {' or '.join(near)}?" if near else f"`latentforge {_cmd(cls)} --print-config` lists every key"


def _checked(owner, name: str, value, key: str, src: str):
    """`value` coerced to the type of field `name` of dataclass `owner`, inside its choices and range."""
    value = _coerce(value, typing.get_type_hints(owner)[name], key, src)
    choices = field_choices(owner, name)
    if choices is not None and value not in choices:
        raise UserError(f"{src}: {key}={value!r} — choose one of {', '.join(choices)}")
    low, high = field_range(owner, name)
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        raise UserError(f"{src}: {key}={value!r} is not a finite number — give a real value")
    if (low is not None and value < low) or (high is not None and value > high):
        want = f"at least {low}" if high is None else f"between {low} and {high}"
        raise UserError(f"{src}: {key}={value!r} is out of range — use a value {want}")
    return value


def _raw_settings(path, overrides) -> dict:
    """Flat {"section.key": (value, where it came from)}: the TOML file, then the key=value overrides."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:  # a BOM (Notepad's "UTF-8 with BOM", UTF-16) is read, not a TOML error
                data = tomllib.loads(textfile.decode(f.read()))
        except FileNotFoundError:
            raise UserError(f"--config {path}: file not found — pass an existing TOML file")
        except textfile.TextFileError as e:
            raise UserError(f"--config {path}: cannot read it as text ({e})")
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"--config {path}: not valid TOML ({e}) — fix the file")
        for key, value in _flatten(data):
            raw[key] = (value, str(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value (e.g. lr=3e-4) — fix the argument")
        key, text = item.split("=", 1)
        raw[key.strip()] = (_parse_value(text.strip()), f"override {item!r}")
    return raw


def config_to_dict(cfg) -> dict:
    """Nested plain dict (tuples -> lists, None -> "none") ready for TOML or JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = config_to_dict(v) if dataclasses.is_dataclass(v) else _plain(v)
    return out


def to_toml(cfg, notes: Optional[dict] = None) -> str:
    """The full resolved config as TOML (re-runnable with `--config`); `notes` = {key: comment} are written
    as `# comment` lines above their keys."""
    d = config_to_dict(cfg)
    notes = notes or {}
    lines = [f"# {notes['']}"] if "" in notes else []
    for k, v in d.items():
        if not isinstance(v, dict):
            lines += [f"# {notes[k]}"] if k in notes else []
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def math_dict(cfg) -> dict:
    """The flat `key -> value` of every setting that changes what training computes."""
    flat = dict(_flatten(config_to_dict(cfg)))
    if flat.get("lr_schedule") == "constant":
        flat.pop("max_steps", None)  # a constant-LR run may be extended on resume
    return {k: v for k, v in flat.items() if k.split(".")[-1] not in NON_MATH_KEYS}


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(math_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _cmd(cls) -> str:
    return "train-vae" if cls is VAETrainConfig else "train"


def _keys(cfg):
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            yield from (f"{f.name}.{g.name}" for g in dataclasses.fields(sub))
        else:
            yield f.name


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _parse_value(text: str):
    """A TOML value (1e-4, true, [32, 64], "x"); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(value, tp, key, src):
    """Check `value` against the dataclass field type `tp`; convert lists to tuples."""
    def fail():
        raise UserError(f"{src}: {key}={value!r} is not {_type_name(tp)} — fix the value")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if type(None) in args and value in ("none", "None"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, src)
            except UserError:
                pass
        fail()
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        return tuple(_coerce(v, args[0], key, src) for v in value)
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail()
    if tp is str:
        return value if isinstance(value, str) else fail()
    fail()


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, Tuple):
        return "a list of " + {int: "integers", float: "numbers", bool: "true/false", str: "strings"}[args[0]]
    if origin is Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or none" if type(None) in args else "")
    return {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}.get(
        tp.__name__, tp.__name__)


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return "none" if v is None else v


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # a TOML basic string is a JSON string for our values
