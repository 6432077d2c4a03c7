"""What the loop needs before its first step: the config completed from the data, the optimizer,
the precision, and the null condition used for caption dropout / classifier-free guidance."""

from __future__ import annotations

import dataclasses

import torch

from ..config import TRAIN_PRECISIONS
from ..errors import UserError
from .optimizers import make_optimizer  # noqa: F401 (the loop's setup; one definition, in optimizers.py)


# The settings that `resolve_for_data` and `validation.held_out_split` fill in from the data (math_dict keys): a
# check made before the cache exists (resume.check_first) cannot know them and leaves them to `resume.prepare`.
FROM_DATA = frozenset({"conditioning", "val_fraction", "unet.in_channels", "unet.out_channels", "unet.sample_size",
                       "unet.cross_attention_dim", "unet.num_class_embeds", "unet.mid_attention",
                       "unet.addition_input_dim"})


def resolve_for_data(cfg, dataset):
    """Complete the UNet config from the cache: latent channels and side, conditioning kind,
    text-context width, number of classes. The result is what `config.toml` records.

    Class-conditional models get one extra class embedding, the last one, as the null class
    (caption dropout trains it; classifier-free guidance uses it as the unconditional branch).
    """
    if len(dataset) == 0:
        raise UserError("data: the latent cache is empty — add images to the data folder and rebuild the cache")
    item = dataset[0]
    C, h, w = tuple(torch.as_tensor(item["latent"]).shape)
    has_text = item.get("context") is not None
    has_label = item.get("label") is not None and int(item["label"]) >= 0
    cond = cfg.conditioning
    if cond == "auto":
        cond = "text" if has_text else "class" if has_label else "none"
    if cond == "text" and not has_text:
        raise UserError("conditioning=text: the cache holds no text embeddings — cache captioned data, "
                        "or use conditioning=none")
    if cond == "class" and not has_label:
        raise UserError("conditioning=class: the cache holds no class labels — use one sub-folder per class, "
                        "or conditioning=none")
    h = getattr(dataset, "latent_side", None) or h  # bucketed caches: the square bucket's side
    unet = dataclasses.replace(cfg.unet, in_channels=C, out_channels=C, sample_size=h)
    if cond == "text":
        unet = dataclasses.replace(unet, cross_attention_dim=int(torch.as_tensor(item["context"]).shape[-1]),
                                   num_class_embeds=None)
    elif cond == "class":
        unet = dataclasses.replace(unet, cross_attention_dim=None, mid_attention=False,
                                   num_class_embeds=num_classes(dataset) + 1)
    else:
        unet = dataclasses.replace(unet, cross_attention_dim=None, mid_attention=False, num_class_embeds=None)
    if unet.addition_time_embed_dim is not None:
        unet = _micro_conditioning(unet, item, cond, cfg.model)
    return dataclasses.replace(cfg, conditioning=cond, unet=unet)


def _micro_conditioning(unet, item, cond: str, model: str):
    """An SDXL-style UNet needs the pooled text (P,) and the size/crop ids (K,) of every item:
    addition_input_dim = P + K · addition_time_embed_dim."""
    if cond != "text" or item.get("pooled") is None:
        raise UserError(f"model={model}: this UNet is micro-conditioned (SDXL) and needs pooled text embeddings — "
                        "cache captioned data with an SDXL model's two text encoders (--text-encoder or --init "
                        "pointing at a folder with text_encoder_2/)")
    if item.get("time_ids") is None:
        raise UserError(f"model={model}: the cache records no original size / crop of its images (an older cache) — "
                        "re-run latentforge cache on it (it reuses every latent and adds them)")
    pooled, k = int(torch.as_tensor(item["pooled"]).shape[-1]), int(torch.as_tensor(item["time_ids"]).shape[-1])
    return dataclasses.replace(unet, addition_input_dim=pooled + k * unet.addition_time_embed_dim)


def num_classes(dataset) -> int:
    n = getattr(dataset, "num_classes", None)
    if n is None:  # no metadata: read every label once
        n = max(int(dataset[i]["label"]) for i in range(len(dataset))) + 1
    return int(n)


def null_condition(cfg, dataset, text_encoder=None):
    """(null_context (L, D), null_mask (L,), null_label, null_pooled (P,)) for `apply_dropout`; Nones where unused."""
    if cfg.conditioning == "class":
        return None, None, cfg.unet.num_class_embeds - 1, None
    if cfg.conditioning != "text":
        return None, None, None, None
    pooled = getattr(dataset, "null_pooled", None)
    if pooled is None and text_encoder is not None and getattr(text_encoder, "pooled_dim", None) is not None:
        pooled = text_encoder.null_pooled()[2][0]  # (P,)
    context = getattr(dataset, "null_context", None)
    mask = getattr(dataset, "null_mask", None)
    if context is None:
        if text_encoder is None:
            raise UserError("caption_dropout: the cache has no null (empty-caption) context and no text encoder was "
                            "given — rebuild the cache, or set caption_dropout=0")
        context, mask = text_encoder.null_context()
        context, mask = context[0], mask[0]
    context = torch.as_tensor(context).float()
    mask = torch.ones(context.shape[0], dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    return context, mask, None, None if pooled is None else torch.as_tensor(pooled).float()


def autocast_dtype(precision: str):
    return None if precision == "fp32" else getattr(torch, TRAIN_PRECISIONS[precision])


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision=fp16: needs a CUDA device (gradient scaling) — use precision=bf16 or fp32 on CPU")
