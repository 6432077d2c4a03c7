"""The single-file key map against the complete key-and-shape lists of full-size SD 1.5, SD 2.1 and SDXL-base
files as diffusers' own repo scripts write them (tests/fixtures/ldm_keys/*.json.gz; how they were made:
tests/fixtures/make_ldm_key_lists.py — `scripts/convert_diffusers_to_original_stable_diffusion.py` and
`scripts/convert_diffusers_to_original_sdxl.py` of github.com/huggingface/diffusers at the commit each file names,
run on full-size diffusers models built on the meta device).

Those scripts, like the CompVis code, A1111 and ComfyUI, name the VAE resnets' channel-changing shortcut
`nin_shortcut`; diffusers' in-library converter accepts either spelling, so it could not catch a wrong one. Here
every name and shape must match exactly, both ways: the list -> our reader (on the meta device: no weights) ->
our writer gives back the list, and the architecture read from the shapes is the real model's.
"""

import gzip
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from latentforge.config import PRESETS, UNetConfig
from latentforge.formats import single_file as SF

FIXTURES = Path(__file__).parent / "fixtures" / "ldm_keys"
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
# SD 2.1 (v2-inference-v.yaml): SD 1.5's UNet with 64-channel heads, linear projections, 1024-wide OpenCLIP context.
SD21_UNET = UNetConfig(num_heads=None, head_dim=64, cross_attention_dim=1024, use_linear_projection=True,
                       sample_size=96)
TEXT = {"sd15": [(768, 12)], "sd21": [(1024, 23)], "sdxl": [(768, 12), (1280, 32)]}  # (width, layers) per encoder


def _fixture(name: str) -> dict:
    return json.loads(gzip.decompress((FIXTURES / f"{name}.json.gz").read_bytes()))


def _meta_state(keys: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def _read(name: str, keys: dict):
    """Our reader on the listed keys and shapes, every tensor (and every model built) on the meta device."""
    state = _meta_state(keys)
    family = SF.identify(name, list(state))
    assert family.name == FAMILY[name]
    with torch.device("meta"):
        return SF.LOADERS[family.name](Path(name), state, family, None, None)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_key_list_of_the_diffusers_script_reads_and_writes_back_exactly(name):
    doc = _fixture(name)
    assert doc["script"].startswith("scripts/convert_diffusers_to_original_") and len(doc["diffusers_commit"]) == 40
    keys = doc["keys"]
    assert sum("nin_shortcut" in k for k in keys) == 8  # 128→256→512 in the encoder, back in the decoder; w + b
    sf = _read(name, keys)
    want_unet = {"sd15": PRESETS["sd15"].unet, "sd21": SD21_UNET, "sdxl": PRESETS["sdxl"].unet}[name]
    assert sf.unet.config == want_unet
    assert sf.vae.config == (PRESETS["sdxl"] if name == "sdxl" else PRESETS["sd15"]).vae
    texts = [sf.text_model] + ([sf.text_model_2] if sf.text_model_2 is not None else [])
    assert [(t.config.hidden_size, t.config.num_hidden_layers) for t in texts] == TEXT[name]
    text = SimpleNamespace(models=texts) if name == "sdxl" else sf.text_model
    written = SF.ldm_state(sf.unet, sf.vae, text, where=name)
    assert sorted(set(written) - set(keys)) == [] and sorted(set(keys) - set(written)) == []
    assert {k: list(v.shape) for k, v in written.items()} == keys


# --------------------------------------------------------------------------- ComfyUI's loader on the same lists

# Keys ComfyUI's text-encoder classes have that no SD file of these families holds, so it reports them missing for
# every such file (the real v1-5 / v2-1 / sd_xl_base files too) and keeps its own values: the contrastive
# `logit_scale`, the projection SD 1.x's CLIP-L and SD 2.x's ViT-H files do not carry, and SD 2.x's 24th OpenCLIP
# block, which diffusers' script (and so our writer) leaves out as SD 2.x samples from the 23rd (penultimate) layer.
COMFY_OWN = ("clip_l.logit_scale", "clip_g.logit_scale", "clip_h.logit_scale", "clip_l.transformer.text_projection.",
             "clip_h.transformer.text_projection.", "clip_h.transformer.text_model.encoder.layers.23.")
COMFY_CLASS = {"sd15": "SD15", "sd21": "SD20", "sdxl": "SDXL"}


def _keys_sha256(keys: dict) -> str:
    """As tests/fixtures/make_comfy_loads.keys_sha256: one digest of a {key: shape} list."""
    return hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in keys.items())).encode()).hexdigest()


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_comfyui_loads_what_we_write_without_missing_or_unexpected_keys(name):
    """tests/fixtures/comfy_loads.json: ComfyUI's checkpoint loader (comfy/model_detection.py, supported_models.py,
    its UNet, VAE and CLIP classes, at the commit it names) run on the key list whose digest it records. Our writer's
    list has that digest, so ComfyUI reads our files as it read that list: the right model class, no UNet or VAE
    key missing or unexpected (before the nin_shortcut fix it reported 8 VAE keys missing), and the text encoders
    missing only what it supplies itself (COMFY_OWN)."""
    comfy = json.loads((Path(__file__).parent / "fixtures" / "comfy_loads.json").read_text())
    assert len(comfy["comfyui_commit"]) == 40
    got = comfy["families"][name]
    sf = _read(name, _fixture(name)["keys"])
    text = SimpleNamespace(models=[sf.text_model, sf.text_model_2]) if name == "sdxl" else sf.text_model
    written = {k: list(v.shape) for k, v in SF.ldm_state(sf.unet, sf.vae, text, where=name).items()}
    assert _keys_sha256(written) == got["keys_sha256"]
    assert got["detected"] == COMFY_CLASS[name]
    for part in ("unet", "vae"):
        assert got[part]["missing"] == [] and got[part]["unexpected"] == [], part
    assert got["clip"]["unexpected"] == []
    assert [k for k in got["clip"]["missing"] if not k.startswith(COMFY_OWN)] == []


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_comfyui_maps_every_kohya_lora_name_we_write(name):
    """tests/fixtures/comfy_lora_names.json.gz: every kohya-style name comfy/lora.py (model_lora_keys_unet /
    model_lora_keys_clip, at the commit it names) maps onto the full-size models ComfyUI loads from these files.
    Every name our kohya writer gives a full-size model's layers (the UNet with `lora.targets=all`, the largest set;
    SD 1.x/2.x's text encoder with attention+ff; SDXL trains no text encoder) is among them, so ComfyUI applies
    every tensor of our LoRA/LoCon/LoHa/LoKr files instead of dropping it."""
    from latentforge.adapters.inject import target_paths
    from latentforge.formats.lora import _alias, kohya_name

    comfy = json.loads(gzip.decompress((Path(__file__).parent / "fixtures" / "comfy_lora_names.json.gz").read_bytes()))
    assert len(comfy["comfyui_commit"]) == 40
    known = set(comfy["families"][name])
    sf = _read(name, _fixture(name)["keys"])
    ours = [kohya_name("unet", p) for p in target_paths(sf.unet, "all")]
    if name != "sdxl":
        ours += [kohya_name("text_encoder", _alias("text_encoder", sf.text_model) + p)
                 for p in target_paths(sf.text_model, "attention+ff", text=True)]
    assert len(ours) > 100 and [n for n in ours if n not in known] == []
