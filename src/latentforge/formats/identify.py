"""What kind of folder is this? One phrase for an error message when a folder is passed in the wrong place
(`--vae` given a text encoder, `--model` given a run folder, `--cache` given a data folder …).

    describe("runs/x/model/text_encoder")  # "a transformers text model (CLIPTextModel)"

Only file names and small JSON headers are read; nothing is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.images import IMAGE_EXTENSIONS

IMAGE_SUFFIXES = tuple(IMAGE_EXTENSIONS)  # what data.sources.scan reads as images


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(folder) -> str:
    """A short phrase naming what `folder` holds ("a latent cache", "a diffusers AutoencoderKL folder", …)."""
    folder = Path(folder)
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return f"a file ({folder.suffix or 'no suffix'}), not a folder"
    names = {p.name for p in folder.iterdir()}
    if "model_index.json" in names:
        return "a whole model folder (model_index.json)"
    config = _json(folder / "config.json") if "config.json" in names else {}
    if config.get("_class_name"):
        return f"a diffusers {config['_class_name']} folder"
    if config.get("architectures") or config.get("model_type"):
        arch = (config.get("architectures") or [config.get("model_type")])[0]
        return f"a transformers model folder ({arch}; a text encoder, not a diffusers component)"
    if "scheduler_config.json" in names:
        return "a scheduler folder (scheduler_config.json)"
    if "tokenizer_config.json" in names or "vocab.txt" in names or "vocab.json" in names:
        return "a tokenizer folder"
    manifest = _json(folder / "manifest.json") if "manifest.json" in names else {}
    if manifest.get("format") == "latentforge-latent-cache":
        return "a latent cache (made by `latentforge cache`)"
    if "config.toml" in names and ("checkpoints" in names or "metrics.jsonl" in names):
        has_model = (folder / "model" / "model_index.json").is_file()
        return "a training run folder" + (" (its model is in model/)" if has_model else " (no model/ yet)")
    images = sum(1 for n in names if n.lower().endswith(IMAGE_SUFFIXES))
    if images:
        return f"a folder of {images} image(s) (a data folder)"
    weights = sorted(n for n in names if n.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")))
    if weights:
        return f"a folder of weight files ({weights[0]}, no config.json)"
    return "an empty folder" if not names else f"a folder latentforge does not recognise (e.g. {sorted(names)[0]!r})"
