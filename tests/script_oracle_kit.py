"""Tiny seeded SD 1.x / 2.x / SDXL diffusers folders in the shapes diffusers' repo conversion scripts take, and
the per-tensor digests their single files are compared by. Used by tests/fixtures/make_script_outputs.py (which
ran the scripts on these folders) and tests/test_script_oracles.py (which rebuilds the same folders).

The scripts' key tables are written for SD's structure: 4 levels of 2 resnets (SDXL: 3), cross-attention on
the first 3 levels (SDXL: the last 2), a 4-level VAE of 2 resnets, and an SD 2.x text encoder recognised by its
23rd layer. So the models keep that structure and shrink only the widths: channels 32–128 (GroupNorm of 32),
SD 1.x's 8 heads, SD 2.x's and SDXL's 64-channel heads, text width 64. Every parameter is drawn from one
generator per model, in sorted-name order, so the same torch gives the same tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import torch

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "c", "!", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
         "a</w>", "e</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>",
         "<|endoftext|>"]
BOS, EOS = VOCAB.index("<|startoftext|>"), VOCAB.index("<|endoftext|>")
SD_LEVELS = dict(layers_per_block=2, norm_num_groups=32, sample_size=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
UNETS = {
    "sd1": dict(SD_LEVELS, block_out_channels=(32, 32, 64, 64), attention_head_dim=8, cross_attention_dim=64),
    "sd2": dict(SD_LEVELS, block_out_channels=(64, 64, 128, 128), attention_head_dim=(1, 1, 2, 2),
                use_linear_projection=True, cross_attention_dim=64),
    "sdxl": dict(layers_per_block=2, norm_num_groups=32, sample_size=8, block_out_channels=(64, 64, 128),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8),
}
VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=32,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TEXT = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_attention_heads=1,
            max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, projection_dim=32)
TEXT_LAYERS = {"clip": (2, "quick_gelu"), "openclip": (23, "gelu"), "bigg": (2, "gelu")}  # SD 2.x: 23 layers


def randomize(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def file_digests(state: Dict[str, torch.Tensor]) -> Dict[str, list]:
    """key -> [shape, sha256 of the fp32 values]: what a single file is compared by."""
    return {k: [list(v.shape), tensor_digest(v)] for k, v in sorted(state.items())}


def write_tokenizer(folder: Path, pad: str = "<|endoftext|>") -> Path:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<unk>", pad_token=pad,
                  model_max_length=77).save_pretrained(folder)
    return folder


def _text(kind: str, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    layers, act = TEXT_LAYERS[kind]
    cls = CLIPTextModelWithProjection if kind == "bigg" else CLIPTextModel
    return randomize(cls(CLIPTextConfig(num_hidden_layers=layers, hidden_act=act, **TEXT)), seed, 0.1)


def _with_text_model_level(folder: Path) -> None:
    """Rewrite text_encoder/model.safetensors with the `text_model.` key level transformers 4 wrote (the layout of
    SD's diffusers folders; the SD 2.x script finds OpenCLIP by `text_model.encoder.layers.22`)."""
    from safetensors.torch import load_file, save_file

    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def write_folder(root: Path, name: str) -> Path:
    """The tiny diffusers folder `name` ("sd1" | "sd2" | "sdxl") under root/name, saved by diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    unet = randomize(UNet2DConditionModel(in_channels=4, out_channels=4, **UNETS[name]), 1, 0.05)
    vae = randomize(AutoencoderKL(**VAE), 2, 0.05)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(root / f"{name}-tokenizer")))
    if name == "sdxl":
        tok_2 = CLIPTokenizer.from_pretrained(str(write_tokenizer(root / f"{name}-tokenizer_2", pad="!")))
        pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=sched, text_encoder=_text("clip", 3),
                                         text_encoder_2=_text("bigg", 4), tokenizer=tok, tokenizer_2=tok_2)
    else:
        pipe = StableDiffusionPipeline(vae=vae, unet=unet, scheduler=sched,
                                       text_encoder=_text("clip" if name == "sd1" else "openclip", 3), tokenizer=tok,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / name)
    _with_text_model_level(root / name)
    return root / name


def source_digest(folder: Path) -> str:
    """One sha256 over every weight file of the folder, by name: the seeded models are the ones a fixture saw."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        for k, v in sorted(load_file(str(path)).items()):
            h.update(f"{path.parent.name}/{k}".encode())
            h.update(tensor_digest(v).encode())
    return h.hexdigest()


def _candidates(folder: Path) -> Dict[str, torch.Tensor]:
    """digest -> tensor, for every weight of the folder as it is, transposed (2-D), and q/k/v concatenated (the
    fused in_proj of OpenCLIP): every tensor a single file of the folder can hold, found by its values."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        state = load_file(str(path))
        for k, v in state.items():
            out[tensor_digest(v)] = v
            if v.ndim == 2:
                out[tensor_digest(v.T)] = v.T
            if ".q_proj." in k:
                fused = torch.cat([v, state[k.replace(".q_proj.", ".k_proj.")], state[k.replace(".q_proj.", ".v_proj.")]])
                out[tensor_digest(fused)] = fused
    return out


def rebuild_file(folder: Path, digests: Dict[str, list]) -> Dict[str, torch.Tensor]:
    """The script's single file, rebuilt from the folder and the fixture alone (no key map of ours): each key gets
    the folder's tensor with its recorded values, in its recorded shape."""
    pool = _candidates(folder)
    missing = [k for k, (_, d) in digests.items() if d not in pool]
    assert not missing, f"no tensor of {folder} has the values of {missing[:3]}"
    return {k: pool[d].reshape(shape).contiguous() for k, (shape, d) in digests.items()}


PROBES = 4  # random directions a weight change is compared along (see probe)


def probe(name: str, delta: torch.Tensor) -> Dict[str, object]:
    """A weight change in a few numbers: its norm and its inner products with PROBES Gaussian directions seeded by
    the weight's name. Two changes d, d' give probes that differ by ⟨d - d', r⟩ ~ N(0, ‖d - d'‖²) each: a real
    difference (a wrong scale, a missing or transposed term: ‖d - d'‖ ~ ‖d‖) shows in every probe, rounding
    (‖d - d'‖ ≪ ‖d‖) in none."""
    import zlib

    flat = delta.detach().double().flatten()
    seed = zlib.crc32(name.encode())
    dirs = [torch.randn(flat.numel(), generator=torch.Generator().manual_seed(seed + j), dtype=torch.float64)
            for j in range(PROBES)]
    return {"norm": float(flat.norm()), "probes": [float(flat @ r) for r in dirs]}


def folder_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """{component/key: tensor} of a diffusers folder; CLIP keys without the `text_model.` level, which only
    transformers 4 wrote."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(folder).glob("*/*.safetensors")):
        for k, v in load_file(str(path)).items():
            out[f"{path.parent.name}/{k.removeprefix('text_model.')}"] = v
    return out
