"""SD3's text stack: CLIP-L, CLIP-G and T5, run as diffusers' StableDiffusion3Pipeline.encode_prompt runs them.

Esser et al. 2024, §5.2 ("Improved text encoders") and Fig. 2a: two CLIP models give per-token features (their
penultimate hidden states, concatenated along features: 768 + 1280 = 2048 for SD3) and a pooled vector (both
projected pooled outputs concatenated: 768 + 1280 = 2048), and T5-XXL gives per-token features of width 4096.
The context is [CLIP features zero-padded to T5's width ; T5 features] along the sequence:

    context (B, 77 + t5_length, D)    pooled (B, P1 + P2)

Without T5 (SD3 can drop it at inference, §5.3.3) its part is zeros of the transformer's context width.
No attention masks are passed to any encoder (as the pipeline); the mask returned marks the positions the
tokenizers filled (CLIP's: either tokenizer's; T5's: its own; none for an absent T5). The null context of
classifier-free guidance is the encoded "" (SD3 has no zeroed null context).
"""

from __future__ import annotations

import hashlib
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import UserError
from .text import MAX_LENGTH, CaptionLength, _check_safetensors, _model_hash, check_tokenizer, quiet_transformers

T5_LENGTH = 256  # diffusers' default max_sequence_length for SD3
PARTS = ("", "_2", "_3")  # the folder suffixes of CLIP-L, CLIP-G and T5 in a model root


def _load_part(root: str, sub: str, model_cls):
    """(model, tokenizer) from root/text_encoder{sub} and root/tokenizer{sub}; UserError naming what is wrong."""
    from transformers import AutoTokenizer

    model_dir, tok_dir = os.path.join(root, "text_encoder" + sub), os.path.join(root, "tokenizer" + sub)
    for folder in (model_dir, tok_dir):
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: no such folder — an SD3 model root needs text_encoder/, tokenizer/, "
                            "text_encoder_2/, tokenizer_2/ (and text_encoder_3/, tokenizer_3/ for T5)")
    _check_safetensors(model_dir)
    try:
        model = model_cls.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # transformers raises many kinds; all mean "this folder is not usable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"text encoder {model_dir}: cannot load it as {model_cls.__name__} ({first}) — "
                        "pass an SD3 model root") from None
    check_tokenizer(tokenizer, tok_dir)
    return model.float(), tokenizer


def _context_width(root: str) -> int:
    """Without T5, the zeros' width is the transformer's `joint_attention_dim` (as the pipeline takes it)."""
    import json

    path = os.path.join(root, "transformer", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            width = json.load(f).get("joint_attention_dim", 4096)
    except (OSError, ValueError):
        raise UserError(f"{path}: cannot read it — an SD3 root without text_encoder_3/ (T5) needs the transformer's "
                        "config for the context width; add text_encoder_3/ or transformer/config.json") from None
    return int(width)


class SD3TextEncoder(CaptionLength):
    """CLIP-L + CLIP-G (`CLIPTextModelWithProjection` both) and an optional T5 (`T5EncoderModel`), frozen.

    `max_length` is the CLIP length (77, what a caption is cut to for CLIP); `t5_length` the T5 length
    (diffusers' `max_sequence_length`); the context has `context_length` = max_length + t5_length positions.
    `context_dim` is needed only without T5 (the zeros' width; otherwise T5's d_model).
    """

    is_clip = True

    def __init__(self, clips, clip_tokenizers, t5=None, t5_tokenizer=None, max_length: Optional[int] = None,
                 t5_length: int = T5_LENGTH, context_dim: Optional[int] = None, source: str = ""):
        self.models = [m.eval().requires_grad_(False) for m in clips]
        self.tokenizers = list(clip_tokenizers)
        self.t5 = None if t5 is None else t5.eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.max_length = int(max_length or min(self.tokenizers[0].model_max_length, MAX_LENGTH))
        self.t5_length, self.source = int(t5_length), source
        self.dim = int(t5.config.d_model) if t5 is not None else int(context_dim or 0)
        clip_dim = sum(int(m.config.hidden_size) for m in self.models)
        if self.dim < clip_dim:
            raise ValueError(f"SD3TextEncoder: context width {self.dim} is below the CLIP features' {clip_dim} "
                             "(without T5, pass context_dim: the transformer's joint_attention_dim)")

    @classmethod
    def from_pretrained(cls, root, max_length: Optional[int] = None, t5_length: int = T5_LENGTH,
                        device: str | torch.device = "cpu") -> "SD3TextEncoder":
        """From an SD3 model root: text_encoder/ + tokenizer/ (CLIP-L), _2 (CLIP-G), and _3 (T5) if present."""
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        quiet_transformers()
        root = os.fspath(root)
        clips = [_load_part(root, sub, CLIPTextModelWithProjection) for sub in PARTS[:2]]
        t5, t5_tok, width = None, None, None
        if os.path.isdir(os.path.join(root, "text_encoder_3")):
            t5, t5_tok = _load_part(root, "_3", T5EncoderModel)
            t5 = t5.to(device)
        else:
            width = _context_width(root)
        return cls([m.to(device) for m, _ in clips], [t for _, t in clips], t5, t5_tok, max_length, t5_length,
                   width, source=root)

    @property
    def context_length(self) -> int:
        return self.max_length + self.t5_length

    @property
    def pooled_dim(self) -> int:
        return sum(int(m.config.projection_dim) for m in self.models)

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def to(self, device) -> "SD3TextEncoder":
        for m in self.models + ([self.t5] if self.t5 is not None else []):
            m.to(device)
        return self

    def _clip(self, captions: List[str]):
        """-> CLIP features zero-padded to the context width (b, 77, D), their mask (b, 77), pooled (b, P1 + P2)."""
        hidden, pooled, mask = [], [], None
        for tokenizer, model in zip(self.tokenizers, self.models):
            tok = tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                            return_tensors="pt")
            out = model(tok.input_ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())  # (b, 77, D_i): the penultimate layer
            pooled.append(out.text_embeds.float())  # (b, P_i): the projected pooled output
            m = tok.attention_mask.to(self.device).bool()
            mask = m if mask is None else mask | m
        features = torch.cat(hidden, dim=-1)  # (b, 77, D1 + D2)
        return F.pad(features, (0, self.dim - features.shape[-1])), mask, torch.cat(pooled, dim=-1)

    def _t5(self, captions: List[str]):
        """-> T5's last hidden state (b, t5_length, D) and its mask; zeros and no positions without T5."""
        if self.t5 is None:
            b = len(captions)
            return (torch.zeros(b, self.t5_length, self.dim, device=self.device),
                    torch.zeros(b, self.t5_length, dtype=torch.bool, device=self.device))
        tok = self.t5_tokenizer(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        out = self.t5(tok.input_ids.to(self.device))  # no attention mask, as the pipeline
        return out.last_hidden_state.float(), tok.attention_mask.to(self.device).bool()

    @torch.no_grad()
    def encode_pooled(self, captions: List[str], batch_size: int = 256):
        """-> context (B, 77 + t5_length, D) float32, mask (B, 77 + t5_length) bool, pooled (B, P1 + P2) float32."""
        if isinstance(captions, str):
            captions = [captions]
        self._warn_if_cut(captions)
        parts = []
        for i in range(0, len(captions), batch_size):
            chunk = list(captions[i:i + batch_size])
            clip, clip_mask, pooled = self._clip(chunk)
            t5, t5_mask = self._t5(chunk)
            parts.append((torch.cat([clip, t5], dim=1), torch.cat([clip_mask, t5_mask], dim=1), pooled))
        if not parts:
            L = self.context_length
            return torch.zeros(0, L, self.dim), torch.zeros(0, L, dtype=torch.bool), torch.zeros(0, self.pooled_dim)
        return tuple(torch.cat(p) for p in zip(*parts))

    def encode(self, captions: List[str], batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> context, mask (the TextEncoder protocol)."""
        context, mask, _ = self.encode_pooled(captions, batch_size)
        return context, mask

    def null_pooled(self):
        """The unconditional branch of CFG: the encoded "" (SD3's negative_prompt=None) -> (1, L, D), (1, L), (1, P)."""
        return self.encode_pooled([""])

    def null_context(self) -> Tuple[torch.Tensor, torch.Tensor]:
        context, mask, _ = self.null_pooled()
        return context, mask

    def _parts(self):
        """(folder suffix, model, tokenizer) of each encoder present."""
        found = list(zip(PARTS, self.models, self.tokenizers))
        return found + ([(PARTS[2], self.t5, self.t5_tokenizer)] if self.t5 is not None else [])

    def save_pretrained(self, model_root: str) -> None:
        """Write text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/ under a model root (diffusers' SD3 layout)."""
        quiet_transformers()
        for sub, model, tokenizer in self._parts():
            if sub != PARTS[2]:
                tokenizer.model_max_length = self.max_length  # the pipeline pads CLIP to this
            model.save_pretrained(os.path.join(model_root, "text_encoder" + sub), safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(model_root, "tokenizer" + sub))

    def model_index_entries(self) -> dict:
        entries = {f"{kind}{sub}": [None, None] for sub in PARTS for kind in ("text_encoder", "tokenizer")}
        for sub, model, tokenizer in self._parts():
            entries["text_encoder" + sub] = ["transformers", type(model).__name__]
            entries["tokenizer" + sub] = ["transformers", type(tokenizer).__name__]
        return entries

    def fingerprint(self) -> str:
        """sha256 of every model's weights, config and vocabulary, both lengths and the context width."""
        h = hashlib.sha256(b"sd3")
        for _, model, tokenizer in self._parts():
            _model_hash(h, model, tokenizer)
        h.update(f"{self.max_length}/{self.t5_length}/{self.dim}".encode())
        return h.hexdigest()
