"""PNG files that remember how they were made: a `parameters` tEXt chunk in the AUTOMATIC1111 layout,
which Stable Diffusion tools (A1111, ComfyUI, Civitai, InvokeAI importers) read:

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 5, Seed: 1, Size: 64x64, Model: shapes

Writing is deterministic (no timestamps), so the same image and parameters give the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from PIL import Image, PngImagePlugin

from .io import save_image


def format_parameters(prompt: str, negative_prompt: Optional[str], settings: Dict[str, object]) -> str:
    """The A1111 text: prompt, optional 'Negative prompt:' line, then 'Key: value, ...' settings."""
    lines = [prompt or ""]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_fmt(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"  # A1111 writes "CFG scale: 5", "Denoising strength: 0.6"
    return str(v).replace(",", " ").replace("\n", " ")  # a comma would split the setting


def parse_parameters(text: str) -> Dict[str, str]:
    """Inverse of `format_parameters` (for tests and tools): prompt, negative_prompt and the settings."""
    lines = text.split("\n")
    out = {"prompt": lines[0], "negative_prompt": ""}
    for line in lines[1:-1]:
        if line.startswith("Negative prompt: "):
            out["negative_prompt"] = line[len("Negative prompt: "):]
    for item in lines[-1].split(", "):
        key, _, value = item.partition(": ")
        out[key] = value
    return out


def save_png(image: Image.Image, path, parameters: str, exclusive: bool = False) -> Path:
    """Write `image` as PNG with its `parameters` chunk, atomically (a kill never leaves a truncated PNG);
    `exclusive`: FileExistsError instead of replacing a file of that name."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return save_image(image, Path(path), exclusive, format="PNG", pnginfo=info)


def read_parameters(path) -> Optional[str]:
    with Image.open(path) as im:
        return im.text.get("parameters")
