"""SDXL single files (sgm's layout, what A1111 and ComfyUI read and write) ⇄ our models.

    model.diffusion_model.*                 the UNet (LDM layout; `label_emb.0` = our `add_embedding`)
    first_stage_model.*                     the VAE (as SD 1.x/2.x; latent scale 0.13025)
    conditioner.embedders.0.transformer.*   CLIP ViT-L/14, transformers' key names (as SD 1.x)
    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG/14: all its blocks, q/k/v fused into in_proj,
                                            `text_projection` (hidden, proj) = our Linear weight transposed

The architecture comes from the shapes (single_file.infer_*), with what shapes cannot tell from
sgm's sd_xl_base.yaml: 64-channel heads, GroupNorm of 32, the scaled-linear 0.00085–0.012 schedule,
ε-prediction; the micro-conditioning width is (label_emb input − pooled width) / 6. A single file
holds no tokenizers: `--tokenizer` names an SDXL model root (with tokenizer/ and tokenizer_2/).
The key maps are data in ldm_keys.py; diffusers' converters are the oracle (tests/test_single_file_sdxl.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import UNetConfig, replace
from ..errors import UserError
from ..text import DualTextEncoder
from . import ldm_keys as K
from . import single_file as sf

SDXL_SCALING_FACTOR = 0.13025  # sgm's sd_xl_base.yaml scale_factor (diffusers' SDXL vae/config.json)


def sdxl_unet_config(unet, channels, layers, attention, per_level, context_dim, pooled_dim, path) -> UNetConfig:
    """UNetConfig of an SDXL UNet from its shapes (`per_level`: transformer depth, 0 where no attention)."""
    try:
        in_dim = int(unet["label_emb.0.0.weight"].shape[1])
        mid = len(sf._indices(unet, "middle_block.1.transformer_blocks."))
    except KeyError as e:
        raise UserError(f"{path}: an SDXL UNet without its micro-conditioning MLP (missing {e}) — the file may be "
                        "damaged; download it again") from None
    time_dim, rest = divmod(in_dim - (pooled_dim or 0), 6)
    depths = tuple(d or 1 for d in per_level)  # an attention-free level's depth is unused; SDXL's config says 1
    if rest or time_dim < 1 or mid != depths[-1]:
        raise UserError(f"{path}: not SDXL-base's UNet (micro-conditioning input {in_dim} for pooled text "
                        f"{pooled_dim}, mid depth {mid} vs last level {depths[-1]}) — not supported")
    return UNetConfig(
        in_channels=int(unet["input_blocks.0.0.weight"].shape[1]), out_channels=int(unet["out.2.weight"].shape[0]),
        channels=channels, layers_per_level=layers, attention=attention, num_heads=None, head_dim=64,
        transformer_layers=depths if len(set(depths)) > 1 else depths[0], cross_attention_dim=context_dim,
        use_linear_projection=True, norm_groups=32, mid_attention=True, sample_size=128,  # 1024 px / 8
        addition_time_embed_dim=time_dim, addition_input_dim=in_dim)


# --------------------------------------------------------------------------- file -> ours


def _transpose_projection(state: Dict[str, Any]) -> Dict[str, Any]:
    """OpenCLIP computes x @ P with P (hidden, proj); transformers' Linear weight is Pᵀ (proj, hidden). Its own
    inverse, so export uses it too."""
    key = K.SDXL_OPENCLIP_PREFIX + "text_projection"
    return {k: (v.T.contiguous() if k == key else v) for k, v in state.items()}


def _text_model(state, cls, layout: str, rules: K.KeyMap, file_prefix: str, path):
    """One transformers text model from the file's keys under `file_prefix`."""
    ours = sf._component(state, rules, file_prefix, path)
    model = cls(sf.infer_text_config(ours, layout, path))
    prefix = "" if sf._text_prefixed(model) else sf.TEXT_MODEL  # transformers ≥ 5: no `text_model.` level
    ours = {(k[len(prefix):] if k.startswith(sf.TEXT_MODEL) else k): v for k, v in ours.items()}
    sf._load_into(model, ours, rules, path, meta=False, rule_prefix=prefix)
    return model.eval()


def text_models(state, path):
    """-> (CLIPTextModel, CLIPTextModelWithProjection) from an SDXL file."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first = _text_model(state, CLIPTextModel, "clip", K.clip_rules(K.SDXL_CLIP_PREFIX), K.SDXL_CLIP_PREFIX, path)
    blocks = sf._indices(state, K.SDXL_OPENCLIP_PREFIX + "transformer.resblocks.")
    rules = K.openclip_rules(len(blocks), K.SDXL_OPENCLIP_PREFIX, projection=True)
    second = _text_model(sf._split_qkv(_transpose_projection(state)), CLIPTextModelWithProjection, "openclip", rules,
                         K.SDXL_OPENCLIP_PREFIX, path)
    return first, second


def load_tokenizers(tokenizer):
    """(tokenizer, tokenizer_2) from an SDXL model root holding tokenizer/ and tokenizer_2/ (or None, None)."""
    if tokenizer is None or not isinstance(tokenizer, (str, Path)):
        return tokenizer, None
    root = Path(tokenizer)
    if not (root / "tokenizer_2").is_dir():
        raise UserError(f"--tokenizer {tokenizer}: no tokenizer_2/ — an SDXL file needs both of SDXL's tokenizers: "
                        "pass an SDXL model root (with tokenizer/ and tokenizer_2/)")
    return sf.load_tokenizer(root / "tokenizer"), sf.load_tokenizer(root / "tokenizer_2")


def load_sdxl(path: Path, state: Dict[str, Any], family, tokenizer, prediction_type):
    """SDXL: one UNet, one VAE, two CLIP text models (single_file.LOADERS["sdxl"]). `tokenizer` is what
    --tokenizer gave, unread (this family needs two)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        raise UserError(f"{path}: an SDXL file needs both of SDXL's tokenizers — pass --tokenizer SDXL_MODEL_ROOT")
    schedule = sf.infer_schedule(state, family, prediction_type, path)
    first, second = text_models(state, path)
    unet = sf._unet_from(state, family, schedule.prediction_type == "v_prediction", path,
                         pooled_dim=int(second.config.projection_dim))
    vae = sf._vae_from(state, path, SDXL_SCALING_FACTOR)
    vae.config = replace(vae.config, sample_size=1024)  # sd_xl_base.yaml: 1024 px (diffusers' SDXL vae/config.json)
    tok, tok_2 = load_tokenizers(tokenizer)
    return sf.SingleFile(path, family.name, unet.eval(), vae.eval(), first, tok, schedule, text_model_2=second,
                         tokenizer_2=tok_2)


def dual_text_encoder(single, max_length: Optional[int] = None):
    """A SingleFile's two text models + tokenizers as a text.DualTextEncoder."""
    if single.tokenizer is None or single.tokenizer_2 is None:
        raise UserError(f"{single.path}: a single file holds no tokenizers — pass --tokenizer DIR (tokenizer=DIR): an "
                        "SDXL model root with tokenizer/ and tokenizer_2/")
    return DualTextEncoder([single.text_model, single.text_model_2], [single.tokenizer, single.tokenizer_2],
                           max_length, source=str(single.path))


# --------------------------------------------------------------------------- ours -> file


def _check_exportable(unet, vae, text, where: str) -> None:
    c = unet.config
    heads = [h for h, a in zip(c.level_heads(), c.attention) if a]
    want = [ch // 64 for ch, a in zip(c.channels, c.attention) if a]
    problems = [
        (c.addition_input_dim is None, "the UNet is not micro-conditioned (not SDXL) but there are two text encoders"),
        (not c.mid_attention or c.num_class_embeds is not None, "the UNet is not SDXL-shaped (mid attention, no classes)"),
        (c.norm_groups != 32 or vae.config.norm_groups != 32, "GroupNorm groups are not 32"),
        (heads != want or c.channels[-1] % 64, f"the UNet's heads {heads} are not SDXL's 64-channel heads"),
        (any(m.config.hidden_size % 64 or m.config.num_attention_heads != m.config.hidden_size // 64
             for m in text.models), "a text encoder's heads are not 64 channels"),
        (vae.config.shift_factor is not None, "the VAE has a shift_factor (not an SDXL VAE)"),
    ]
    for bad, why in problems:
        if bad:
            raise UserError(f"{where}: {why} — cannot write it as an SDXL single file; keep the diffusers folder")


def sdxl_text_parts(unet, vae, text, where: str) -> List[tuple]:
    """(state, rules, post) of SDXL's two text encoders for single_file.single_file_state."""
    _check_exportable(unet, vae, text, where)
    first, second = text.models
    rules = K.openclip_rules(second.config.num_hidden_layers, K.SDXL_OPENCLIP_PREFIX, projection=True)
    return [(sf._text_state(first), K.clip_rules(K.SDXL_CLIP_PREFIX), None),
            (sf._text_state(second), rules, lambda mapped: _transpose_projection(sf._fuse_qkv(mapped)))]
