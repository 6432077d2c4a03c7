"""SD3's text stack (CLIP-L + CLIP-G + T5) equal to diffusers' StableDiffusion3Pipeline.encode_prompt on tiny random
encoders and tokenizers made in the test (nothing downloaded): prompts, negative prompts, the empty prompt, T5's
truncation, and T5 absent (zeros)."""

import json
import os
from pathlib import Path

import pytest
import torch

from latentforge.errors import UserError
from latentforge.text import TextEncoder
from latentforge.text_sd3 import SD3TextEncoder
from sdxl_kit import PROMPTS, write_clip

T5_WIDTH, T5_LENGTH = 80, 12  # the context width (CLIP's 32 + 40 = 72 features are zero-padded to it)
NEGATIVES = ["lower", "", "wider a red circle"]
LONG = "a red circle at the top left a red circle at the top left lower newer"  # > 12 T5 tokens: truncated
T5_PIECES = ["▁a", "▁red", "▁circle", "▁at", "▁the", "▁top", "▁left", "▁lower", "▁",
             *"aerdclowntsiphgkbf"]


def write_t5(root: Path, seed: int = 2) -> None:
    """A tiny T5 encoder (d_model 80) at root/text_encoder_3 and a Unigram T5 tokenizer at root/tokenizer_3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(i)) for i, p in enumerate(T5_PIECES, 1)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=512).save_pretrained(root / "tokenizer_3")
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(pieces), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(root / "text_encoder_3")


def write_sd3_text(root: Path, t5: bool = True) -> Path:
    """CLIP-L (hidden 32) and CLIP-G (hidden 40, pads with "!"), both with a 24-wide projection, and T5."""
    for sub, seed, pad, hidden in (("", 0, "<|endoftext|>", 32), ("_2", 1, "!", 40)):
        write_clip(root / f"_clip{sub}", seed, with_projection=True, pad=pad, hidden=hidden)
        for kind in ("text_encoder", "tokenizer"):
            os.rename(root / f"_clip{sub}" / f"{kind}_2", root / f"{kind}{sub}")
    if t5:
        write_t5(root)
    return root


def diffusers_pipeline(root: Path, t5: bool = True):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    load = lambda cls, sub: cls.from_pretrained(root / sub)  # noqa: E731
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                        caption_projection_dim=16, pooled_projection_dim=48, pos_embed_max_size=8)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=load(CLIPTextModelWithProjection, "text_encoder"), tokenizer=load(AutoTokenizer, "tokenizer"),
        text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2"),
        tokenizer_2=load(AutoTokenizer, "tokenizer_2"),
        text_encoder_3=load(T5EncoderModel, "text_encoder_3") if t5 else None,
        tokenizer_3=load(AutoTokenizer, "tokenizer_3") if t5 else None)


def _close(got, want, what):
    """The same transformers models on the same ids: only the dtype casts differ (none in float32), so the results
    are equal in practice (measured 0); 1e-5 is the bound the SD3 text stack is held to."""
    diff = (got - want).abs().max().item()
    assert got.shape == want.shape and diff <= 1e-5, f"{what}: {diff:.3g} (shapes {got.shape}, {want.shape})"
    return diff


@pytest.mark.parametrize("t5", [True, False], ids=["with_t5", "without_t5"])
def test_encode_prompt_equals_diffusers(tmp_path, t5):
    root = write_sd3_text(tmp_path / "text", t5)
    pipe = diffusers_pipeline(root, t5)
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    ours = TextEncoder.from_pretrained(tmp_path / "model")  # an SD3 root: the three-encoder stack
    assert isinstance(ours, SD3TextEncoder) and ours.t5_length == 256
    ours = SD3TextEncoder.from_pretrained(tmp_path / "model", t5_length=T5_LENGTH)
    prompts = PROMPTS + [LONG]
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, negative_prompt=NEGATIVES + [""],
                                                          max_sequence_length=T5_LENGTH)
        _, null, _, null_pooled = pipe.encode_prompt(prompts[:1], None, None, max_sequence_length=T5_LENGTH)
    context, mask, pooled_ours = ours.encode_pooled(prompts)
    assert context.shape == (len(prompts), 77 + T5_LENGTH, T5_WIDTH) and pooled_ours.shape == (len(prompts), 48)
    worst = max(_close(context, emb, "context"), _close(pooled_ours, pooled, "pooled"))
    n_context, _, n_pooled = ours.encode_pooled(NEGATIVES + [""])
    worst = max(worst, _close(n_context, neg, "negative context"), _close(n_pooled, neg_pooled, "negative pooled"))
    u_context, _, u_pooled = ours.null_pooled()  # negative_prompt=None: the encoded ""
    worst = max(worst, _close(u_context, null, "null context"), _close(u_pooled, null_pooled, "null pooled"))
    print(f"{'with' if t5 else 'without'} T5: max |ours − diffusers| = {worst:.3g}")
    assert mask[:, :77].any(dim=1).all() and mask[:, 77:].any().item() == t5  # T5 positions only with T5
    if not t5:
        assert torch.equal(context[:, 77:], torch.zeros_like(context[:, 77:]))


def test_save_and_reload(tmp_path):
    ours = SD3TextEncoder.from_pretrained(write_sd3_text(tmp_path / "text"), t5_length=T5_LENGTH)
    ours.save_pretrained(tmp_path / "saved")
    back = SD3TextEncoder.from_pretrained(tmp_path / "saved", t5_length=T5_LENGTH)
    assert back.fingerprint() == ours.fingerprint()
    assert torch.equal(back.encode(PROMPTS)[0], ours.encode(PROMPTS)[0])
    assert ours.model_index_entries()["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    other = SD3TextEncoder.from_pretrained(tmp_path / "saved", t5_length=T5_LENGTH + 1)
    assert other.fingerprint() != ours.fingerprint()  # a cache of other length is another cache


def test_missing_parts_are_named(tmp_path):
    root = write_sd3_text(tmp_path / "text", t5=False)
    with pytest.raises(UserError, match=r"transformer/config.json: cannot read it"):
        SD3TextEncoder.from_pretrained(root)
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps({"joint_attention_dim": 96}))
    assert SD3TextEncoder.from_pretrained(root).encode(["lower"])[0].shape == (1, 77 + 256, 96)
    os.rename(root / "tokenizer_2", root / "elsewhere")
    with pytest.raises(UserError, match=r"tokenizer_2: no such folder"):
        TextEncoder.from_pretrained(root)
