"""Training SDXL-style models: `train --init SDXL_FOLDER` against diffusers' SDXL training recipe, and the
`sdxl-tiny` preset from scratch on the shapes data.

The oracle is examples/text_to_image/train_text_to_image_sdxl.py: VAE latents × scaling_factor, both text
encoders' penultimate hidden states concatenated + text_encoder_2's pooled output, `add_time_ids` =
original_size + crop_top_left + target_size per image, DDPMScheduler.add_noise, MSE to ε — on the same
weights, images, captions, noise and timesteps as our first step. The images are 16 px wide and 20–24 px
tall, so the shorter side needs no resampling and the micro-conditioning is not trivial.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.cli import main
from latentforge.config import load_train_config
from sdxl_kit import write_diffusers_sdxl, write_text_encoders

RES, B = 16, 4
CAPTIONS = ["lower newer", "wider", "lowest newer wider", "lower", "newer lower", "wider wider"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_sdxl")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        h = (RES, 20, 24)[i % 3]
        size = (RES, h) if i % 2 == 0 else (h, RES)  # (W, H): tall and wide, cropped in the middle
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption)
    return {"root": root, "data": data, "model": write_diffusers_sdxl(root / "sdxl")}


def rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def diffusers_sdxl_recipe_loss(model: Path, data: Path, ids, noise, timesteps) -> float:
    """One batch's loss as train_text_to_image_sdxl.py computes it (center crop, no flip; latents: the posterior
    mode, as our cache stores them, instead of a sample)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    vae, unet = AutoencoderKL.from_pretrained(model / "vae"), UNet2DConditionModel.from_pretrained(model / "unet")
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    encoders = [CLIPTextModel.from_pretrained(model / "text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2")]
    tokenizers = [AutoTokenizer.from_pretrained(model / "tokenizer"), AutoTokenizer.from_pretrained(model / "tokenizer_2")]
    pixels, time_ids = [], []
    for i in ids:
        image = Image.open(data / i).convert("RGB")  # shorter side = RES already: train_resize is the identity
        original_size = (image.height, image.width)
        y1, x1 = max(0, int(round((image.height - RES) / 2.0))), max(0, int(round((image.width - RES) / 2.0)))
        image = image.crop((x1, y1, x1 + RES, y1 + RES))
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
        time_ids.append(torch.tensor([list(original_size + (y1, x1) + (RES, RES))]))  # compute_time_ids
    latents = vae.encode(torch.stack(pixels)).latent_dist.mode() * vae.config.scaling_factor
    captions = [(data / i).with_suffix(".txt").read_text().strip() for i in ids]
    embeds = []
    for tokenizer, encoder in zip(tokenizers, encoders):  # the script's encode_prompt
        input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
        out = encoder(input_ids, output_hidden_states=True, return_dict=False)
        pooled, embeds = out[0], embeds + [out[-1][-2]]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = {"time_ids": torch.cat(time_ids), "text_embeds": pooled}
    pred = unet(noisy, timesteps, torch.cat(embeds, dim=-1), added_cond_kwargs=added, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean").item()


def test_init_sdxl_matches_the_diffusers_sdxl_recipe_and_exports(world):
    from diffusers import StableDiffusionXLPipeline

    from latentforge.data.cache import LatentDataset
    from latentforge.train.data import Stream
    from latentforge.train.step import draw

    run = world["root"] / "run"
    assert main(["train", "--init", str(world["model"]), "--data", str(world["data"]), "--out", str(run), "--quiet",
                 f"batch_size={B}", "max_steps=2", "caption_dropout=0", "log_every=1", "sample_every=0",
                 "checkpoint_every=2", "warmup_steps=0", "lr=1e-3", f"image_size={RES}"]) == 0
    cfg = load_train_config(run / "config.toml")
    assert (cfg.unet.addition_time_embed_dim, cfg.unet.addition_input_dim) == (8, 24 + 6 * 8)

    ds, positions = LatentDataset(str(run / "cache")), list(range(B))
    tall = next(e for e in ds.entries if e["id"] == "02.png")  # 16 x 24: cropped 4 px from the top
    assert (tall["original_size"], tall["crop_top_left"], tall["target_size"]) == ([24, 16], [4, 0], [16, 16])
    ids = [ds[Stream(ds, cfg.seed).index(p)]["id"] for p in positions]
    d = draw(cfg, positions, (4, RES // 2, RES // 2), cfg.schedule.num_train_timesteps)
    theirs = diffusers_sdxl_recipe_loss(world["model"], world["data"], ids, d.noise, d.t)
    print("first-step loss: ours", rows(run)[0]["loss"], "diffusers' SDXL recipe", theirs)
    assert abs(rows(run)[0]["loss"] - theirs) < 1e-5, (rows(run)[0]["loss"], theirs)

    pipe = StableDiffusionXLPipeline.from_pretrained(run / "model")  # model/ is an SDXL folder again
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert json.loads((run / "model" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_sdxl_tiny_preset_learns_the_shapes(world, tmp_path):
    """From scratch: model=sdxl-tiny with the tiny SDXL folder's VAE and two text encoders; the loss falls."""
    data = tmp_path / "shapes"
    assert main(["shapes", "--out", str(data), "--n", "16", "--size", str(RES), "--seed", "0"]) == 0
    text = write_text_encoders(tmp_path / "text")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--vae", str(world["model"]), "--text-encoder", str(text),
                 "--out", str(run), "--quiet", "model=sdxl-tiny", "batch_size=8", "max_steps=120", "lr=2e-3",
                 "warmup_steps=10", "log_every=1", "sample_every=0", "checkpoint_every=120"]) == 0
    losses = [r["loss"] for r in rows(run)]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    print(f"sdxl-tiny loss (mean of 15 steps) {first:.4f} -> {last:.4f}: -{1 - last / first:.0%}")
    assert last <= 0.7 * first, (first, last)
    cfg = load_train_config(run / "config.toml")
    assert cfg.unet.transformer_layers == (1, 2) and cfg.unet.cross_attention_dim == 64


def test_micro_conditioned_model_without_pooled_text_is_one_line(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(world["data"]), "--vae", str(world["model"]), "--out", str(run), "--quiet",
                 "model=sdxl-tiny", "max_steps=1", f"image_size={RES}"]) == 2
    assert "needs pooled text embeddings" in capsys.readouterr().err


def test_sdxl_lora_from_init_samples_like_diffusers_with_the_lora(world):
    """adapter=lora on an SDXL --init: the adapter file, loaded by diffusers' load_lora_weights into its SDXL
    pipeline, gives the image our pipeline gives with it (and not the base model's)."""
    import diffusers

    from latentforge.pipelines import Pipeline

    run = world["root"] / "lora_run"
    assert main(["train", "--init", str(world["model"]), "--data", str(world["data"]), "--out", str(run), "--quiet",
                 "adapter=lora", f"batch_size={B}", "max_steps=3", "lr=3e-2", "warmup_steps=0", "sample_every=0",
                 "checkpoint_every=3", f"image_size={RES}"]) == 0
    ours = Pipeline.from_pretrained(world["model"], device="cpu")
    latents = torch.randn(1, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(1))
    kw = dict(sampler="euler", steps=3, cfg=3.0, size=(RES, RES), latents=latents, output="pt")
    base = ours.text2img("lower newer", **kw)
    got = ours.with_lora(next((run / "lora").glob("*.safetensors"))).text2img("lower newer", **kw)
    ref_pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(world["model"])
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.load_lora_weights(str(run / "lora"))
    ref = ref_pipe("lower newer", latents=latents, num_inference_steps=3, guidance_scale=3.0, height=RES, width=RES,
                   output_type="pt").images
    assert (got - base).abs().max() > 1e-3  # the adapter was trained and matters
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
