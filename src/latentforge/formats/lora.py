"""Adapter files, both ways: diffusers/PEFT format and kohya/A1111 (LyCORIS) format.

diffusers (`pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(folder)` reads):
    unet.<module path>.lora_A.weight (r, in[, kh, kw])   unet.<module path>.lora_B.weight (out, r[, 1, 1])
    unet.<module path>.lora_magnitude_vector (DoRA)     text_encoder.<module path>.… likewise
  There is no alpha key: we write lora_B · α/r, so the file means the same with diffusers' default α = r.
kohya / A1111 / ComfyUI (`<name>.safetensors`):
    lora_unet_<path with _ for .>.lora_down.weight / .lora_up.weight / .alpha   (LoRA, LoCon)
    ….hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b / .alpha                       (LoHa, LyCORIS)
    ….lokr_w1 / lokr_w2_a / lokr_w2_b / .alpha                                     (LoKr, LyCORIS)
    ….dora_scale (out, 1[, 1, 1])                                                  (DoRA, LyCORIS)
  plus `ss_*` metadata (ss_network_dim, ss_network_alpha, ss_sd_model_name, ss_steps, ss_resolution, …).

The kohya names are diffusers module paths with "." -> "_", so they are decoded against the model
(the table of its own layer names), not by guessing where the dots were.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..adapters.inject import adapters, attach, merge, remove
from ..adapters.layers import KINDS, Adapter, LoKr, LoRA, plain_layer
from ..errors import UserError
from ..io import atomic_path

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
# component -> (diffusers prefix, kohya prefix); SDXL kohya files name the two text encoders lora_te1_/lora_te2_
PREFIX = {"unet": ("unet.", "lora_unet_"), "text_encoder": ("text_encoder.", "lora_te_"),
          "text_encoder_2": ("text_encoder_2.", "lora_te2_")}
_KOHYA_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2"}
_TO_DIFFUSERS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
                 "dora_scale": "lora_magnitude_vector"}
_FROM_DIFFUSERS = {v: k for k, v in _TO_DIFFUSERS.items()}
_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a",
             "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class AdapterFile:
    """One file, decoded: per (component, module path) the tensors under our suffix names."""

    path: Path
    format: str  # "diffusers" | "kohya"
    entries: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    first_key: Dict[Tuple[str, str], str] = field(default_factory=dict)  # the file key, for error messages


# --------------------------------------------------------------------------- writing


def _component_state(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """module path -> {suffix: tensor} of the outermost adapters, DoRA magnitude reshaped per layer type."""
    out = {}
    for path, a in adapters(model):
        state = {k: v.detach().float().contiguous() for k, v in a.state_dict().items()
                 if not k.startswith("base.") and k in _SUFFIXES}
        if isinstance(a, LoRA) and a.dora_scale is not None:
            state["dora_scale"] = state["dora_scale"].view(-1, *([1] * (a.layer.weight.ndim - 1)))  # (out, 1[, 1, 1])
        out[path] = state
    return out


def save_diffusers(path, components: Dict[str, nn.Module], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (into `path` if it is a folder). LoRA/DoRA only."""
    tensors = {}
    for comp, model in components.items():
        for mpath, state in _component_state(model).items():
            a = model.get_submodule(mpath)
            if not isinstance(a, LoRA):
                raise UserError(f"adapter={a.kind}: diffusers' LoRA format holds LoRA/DoRA only — use the kohya "
                                "file (lora/<name>.safetensors), which A1111/ComfyUI read")
            pre = PREFIX[comp][0] + _alias(comp, model) + mpath + "."
            scale = float(state["alpha"]) / a.rank
            tensors[pre + "lora_A.weight"] = state["lora_down.weight"]
            tensors[pre + "lora_B.weight"] = state["lora_up.weight"] * scale if scale != 1.0 else state["lora_up.weight"]
            if "dora_scale" in state:  # PEFT: (out,) for Linear, (1, out, 1, 1) for Conv2d
                m = state["dora_scale"].flatten()
                tensors[pre + "lora_magnitude_vector"] = m if a.layer.weight.ndim == 2 else m.view(1, -1, 1, 1)
    return _write(Path(path) / DIFFUSERS_NAME if Path(path).is_dir() else Path(path), tensors, metadata)


def _alias(comp: str, model: nn.Module) -> str:
    """"text_model." for a CLIP text model that transformers ≥ 5 builds without that level: files (A1111,
    ComfyUI, diffusers) name CLIP layers text_model.encoder.layers.N…, so we write and read that spelling."""
    config = getattr(model, "config", None)
    clip = getattr(config, "model_type", "") in ("clip_text_model", "clip")
    return "text_model." if comp.startswith("text_encoder") and clip and not hasattr(model, "text_model") else ""


def kohya_name(component: str, module_path: str) -> str:
    return PREFIX[component][1] + module_path.replace(".", "_")


def save_kohya(path, components: Dict[str, nn.Module], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the kohya/LyCORIS layout (LoRA, LoCon, LoHa, LoKr, DoRA) with its `ss_*` metadata."""
    tensors = {}
    for comp, model in components.items():
        for mpath, state in _component_state(model).items():
            for k, v in state.items():
                tensors[f"{kohya_name(comp, _alias(comp, model) + mpath)}.{k}"] = v
    return _write(Path(path), tensors, metadata)


def _write(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]]) -> Path:
    from safetensors.torch import save_file

    if not tensors:
        raise UserError(f"{path}: the model carries no adapter to save — inject or load one first")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    return path


def kohya_metadata(model_name: str, kind: str, rank: int, alpha: float, steps: int, resolution: int,
                   dora: bool = False, text_encoder: bool = False) -> Dict[str, str]:
    """The header fields A1111's and ComfyUI's LoRA browsers show (kohya sd-scripts' names)."""
    module = "networks.lora" if kind == "lora" and not dora else "lycoris.kohya"
    args = {} if module == "networks.lora" else {"algo": "lora" if kind == "lora" else kind, "dora_wd": dora}
    return {
        "ss_network_module": module, "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(args), "ss_sd_model_name": model_name, "ss_base_model_version": "sd_v1",
        "ss_steps": str(steps), "ss_resolution": f"({resolution}, {resolution})",
        "ss_network_train_unet_only": str(not text_encoder), "ss_training_comment": "latentforge",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": Path(model_name).name or "lora",
    }


# --------------------------------------------------------------------------- reading


def read(path) -> AdapterFile:
    """Open a diffusers or kohya adapter file (or a folder holding `pytorch_lora_weights.safetensors`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_NAME
    if not path.is_file():
        raise UserError(f"--lora {path}: no such file — pass a .safetensors LoRA file or a folder with {DIFFUSERS_NAME}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--lora {path}: not a readable safetensors file ({e}) — pass a LoRA .safetensors") from None
    kohya = any(k.startswith(tuple(_KOHYA_COMPONENT)) for k in tensors)
    out = AdapterFile(path, "kohya" if kohya else "diffusers", metadata=metadata)
    for key, value in tensors.items():
        comp, module, suffix = (_split_kohya if kohya else _split_diffusers)(path, key)
        out.entries.setdefault((comp, module), {})[suffix] = value
        out.first_key.setdefault((comp, module), key)
    if not out.entries:
        raise UserError(f"--lora {path}: holds no LoRA tensors — pass a LoRA file")
    return out


def _split_kohya(path: Path, key: str) -> Tuple[str, str, str]:
    prefix = next((p for p in _KOHYA_COMPONENT if key.startswith(p)), None)
    name, _, suffix = key.partition(".")
    if prefix is None or suffix not in _SUFFIXES:
        raise UserError(f"--lora {path}: unsupported key {key} — latentforge reads LoRA, LoCon, LoHa, LoKr and DoRA")
    comp = _KOHYA_COMPONENT[prefix]  # module: the kohya name in our spelling, resolved against the model in apply()
    return comp, PREFIX[comp][1] + name[len(prefix):], suffix


def _split_diffusers(path: Path, key: str) -> Tuple[str, str, str]:
    for comp, (pre, _) in PREFIX.items():
        if key.startswith(pre):
            for theirs, ours in _FROM_DIFFUSERS.items():
                if key.endswith("." + theirs):
                    return comp, key[len(pre):-len(theirs) - 1], ours
    raise UserError(f"--lora {path}: unsupported key {key} — expected unet./text_encoder. …lora_A/lora_B.weight "
                    "(diffusers) or lora_unet_… (kohya)")


def apply(adapter_file: AdapterFile, components: Dict[str, nn.Module], multiplier: float = 1.0) -> List[Adapter]:
    """Stack the file's adapters on the matching layers of `components` ({"unet": …, "text_encoder": …}).

    Every key is checked against the model before any layer is touched: the first that does not fit
    (no such layer, or other shapes) is a UserError naming it."""
    plan = [(_resolve(adapter_file, components, key), key) for key in adapter_file.entries]
    made = []
    for (model, mpath, factory), _ in plan:
        a = attach(model, mpath, factory)
        a.multiplier = float(multiplier)
        made.append(a)
    return made


def _layer_table(comp: str, model: nn.Module) -> Dict[str, str]:
    """kohya name -> module path, for every layer an adapter can sit on (outermost adapters included)."""
    inside = [p + "." for p, _ in adapters(model)]
    alias = _alias(comp, model)
    return {kohya_name(comp, alias + name): name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, Adapter)) and not any(name.startswith(p) for p in inside)}


def _kind(entry: Dict[str, torch.Tensor]) -> Tuple[str, int]:
    if "lora_down.weight" in entry:
        return "lora", entry["lora_down.weight"].shape[0]
    if "hada_w1_b" in entry:
        return "loha", entry["hada_w1_b"].shape[0]
    if "lokr_w2_b" in entry:
        return "lokr", entry["lokr_w2_b"].shape[0]
    if "lokr_w2" in entry:  # full factors: LyCORIS and ComfyUI apply them at scale 1 (alpha/rank = 1)
        entry["alpha"] = torch.tensor(1.0)
        return "lokr", 1
    raise ValueError(f"incomplete adapter (keys {sorted(entry)})")


def _resolve(f: AdapterFile, components: Dict[str, nn.Module], key: Tuple[str, str]):
    """(model, module path, factory(base) -> loaded adapter) for one entry, or a UserError naming its key."""
    comp, name = key
    file_key = f.first_key[key]

    def bad(why: str) -> UserError:
        return UserError(f"--lora {f.path}: key {file_key} does not fit this model ({why}) — use a LoRA trained "
                         "on this base model (same architecture)")

    model = components.get(comp)
    if model is None:
        raise bad(f"the model has no {comp.replace('_', ' ')}")
    alias = _alias(comp, model)
    mpath = _layer_table(comp, model).get(name) if f.format == "kohya" else (
        name[len(alias):] if alias and name.startswith(alias) else name)
    try:
        module = model.get_submodule(mpath) if mpath else None
    except AttributeError:
        module = None
    if not isinstance(module, (nn.Linear, nn.Conv2d, Adapter)):
        raise bad("no such layer")
    entry = dict(f.entries[key])
    try:
        kind, rank = _kind(entry)
        alpha = float(entry.pop("alpha", torch.tensor(float(rank))))
        options = {"dora": "dora_scale" in entry} if kind == "lora" else {}
        if kind == "lokr":
            options.update(factors=tuple(entry["lokr_w1"].shape), full="lokr_w2" in entry)
        probe = KINDS[kind](plain_layer(module), rank, alpha, **options)  # shapes this layer needs
    except (ValueError, KeyError) as e:
        raise bad(str(e)) from None
    own = {k: v for k, v in probe.state_dict().items() if not k.startswith("base.") and k != "alpha"}
    if set(own) != set(entry):
        raise bad(f"keys {sorted(entry)} are not a {kind} adapter's {sorted(own)}")
    for k, v in entry.items():
        if v.numel() != own[k].numel() or (k != "dora_scale" and tuple(v.shape) != tuple(own[k].shape)):
            raise bad(f"{k} has shape {tuple(v.shape)}, the layer {tuple(plain_layer(module).weight.shape)} "
                      f"needs {tuple(own[k].shape)}")
    values = {k: v.reshape(own[k].shape).to(own[k].dtype) for k, v in entry.items()}

    def factory(base: nn.Module) -> Adapter:
        a = KINDS[kind](base, rank, alpha, **options)
        a.load_state_dict(values, strict=False)
        return a

    return model, mpath, factory


# --------------------------------------------------------------------------- merging into a folder


def merge_model_folder(model_dir, loras: List[Tuple[Path, float]], out) -> Path:
    """Copy the model folder to `out` with every (file, scale) folded into the UNet (and text encoder)."""
    import shutil

    from ..pipelines import Pipeline  # late: pipelines imports this module (Pipeline.with_lora)

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not empty — choose a new folder (nothing is overwritten)")
    pipe = Pipeline.from_pretrained(model_dir, device="cpu")
    for file, scale in loras:
        pipe.with_lora(file, scale)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    for comp, model in pipe._adaptable().items():
        touched = bool(list(adapters(model)))
        merge(model)
        remove(model)
        if touched and comp == "unet":
            model.save_pretrained(tmp / "unet")
        elif touched:
            model.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return out
