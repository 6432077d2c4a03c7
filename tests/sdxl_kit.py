"""Tiny random SDXL parts made in the test (nothing downloaded): two CLIP text models + tokenizers,
and a whole diffusers StableDiffusionXLPipeline folder around them.

Shapes follow SDXL-base, shrunk: text_encoder/ is a CLIPTextModel (hidden 32), text_encoder_2/ a
CLIPTextModelWithProjection (hidden 32, projection 24) whose tokenizer pads with "!" as OpenCLIP's does;
the UNet cross-attends to 32 + 32 = 64 and is micro-conditioned on 24 + 6 × 8 = 72 numbers.
"""

import json
from pathlib import Path

import torch

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "c", "!", "lo", "l</w>", "w</w>", "r</w>",
         "t</w>", "a</w>", "e</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
         "<|startoftext|>", "<|endoftext|>"]
HIDDEN, PROJECTION, TIME_DIM = 32, 24, 8
PROMPTS = ["lower newer wider", "a red circle at the top left", ""]


def write_clip(folder: Path, seed: int, with_projection: bool, pad: str = "<|endoftext|>", hidden: int = HIDDEN):
    """A tiny random CLIP text model (+ projection) at folder/text_encoder*, its tokenizer at folder/tokenizer*."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sub = "_2" if with_projection else ""
    tok_dir, model_dir = Path(folder) / f"tokenizer{sub}", Path(folder) / f"text_encoder{sub}"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), unk_token="<unk>", pad_token=pad,
                        model_max_length=77)
    tok.save_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=26, eos_token_id=27,
                         pad_token_id=VOCAB.index(pad), projection_dim=PROJECTION, hidden_act="gelu")
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)
    model.save_pretrained(model_dir)
    return model_dir


def write_text_encoders(root: Path) -> Path:
    """text_encoder/ + tokenizer/ and text_encoder_2/ + tokenizer_2/ under `root`."""
    write_clip(root, 0, with_projection=False)
    write_clip(root, 1, with_projection=True, pad="!")
    return Path(root)


def unet_kwargs(sample_size: int = 8) -> dict:
    """A tiny SDXL-shaped UNet2DConditionModel config (attention-free first level, depth 1 then 2)."""
    return dict(sample_size=sample_size, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=2 * HIDDEN,
                addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_DIM)


def write_diffusers_sdxl(root: Path, scheduler: str = "EulerDiscreteScheduler") -> Path:
    """A whole tiny random StableDiffusionXLPipeline folder, saved by diffusers itself."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(root)
    write_text_encoders(root / "_text")
    torch.manual_seed(2)
    unet = UNet2DConditionModel(**unet_kwargs())
    with torch.no_grad():
        for p in unet.parameters():  # off the default init (zeros) so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                        sample_size=16, scaling_factor=0.13025)
    sched = getattr(diffusers, scheduler)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=sched,
        text_encoder=CLIPTextModel.from_pretrained(root / "_text" / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "_text" / "text_encoder_2"),
        tokenizer=AutoTokenizer.from_pretrained(root / "_text" / "tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(root / "_text" / "tokenizer_2"))
    pipe.save_pretrained(root / "model", safe_serialization=True)
    return root / "model"
