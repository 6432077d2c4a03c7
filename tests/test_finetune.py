"""`latentforge train --init MODEL`: fine-tuning a tiny random diffusers StableDiffusionPipeline folder.

The oracle is diffusers' own training recipe (examples/text_to_image/train_text_to_image.py): VAE latents
× scaling_factor, DDPMScheduler.add_noise, the CLIP text encoder's last hidden state, the UNet, MSE to the
scheduler's target — on the same weights, images, captions, noise and timesteps as our first step."""

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.cli import main
from latentforge.config import load_train_config
from latentforge.errors import UserError
from tolerance import assert_same_function

SIZE = 32  # pixels; the VAE downsamples 4x -> 8x8 latents
B = 4


def tiny_sd_folder(out: Path, prediction_type="v_prediction", beta_schedule="linear", seed=0, sd_file=False) -> Path:
    """A random StableDiffusionPipeline (UNet, VAE, DDPM schedule, CLIP text encoder + BPE tokenizer), saved.
    sd_file: sizes a single SD file can hold (GroupNorm 32, 64-channel CLIP heads, a 2x VAE)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = out.parent / f"{out.name}-tokenizer"
    tok_dir.mkdir(parents=True)
    vocab = ["<unk>", "<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + \
        [c + "</w>" for c in string.ascii_lowercase]  # no merges: every word is spelt letter by letter
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), unk_token="<unk>",
                              pad_token="<|endoftext|>", model_max_length=77)
    width, groups, vae_channels = (64, 32, (32, 64)) if sd_file else (32, 8, (16, 32, 32))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=width // 16 if not sd_file else 1,
                                        max_position_embeddings=77, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
                                attention_head_dim=8 if sd_file else 2, norm_num_groups=groups)
    vae = AutoencoderKL(block_out_channels=vae_channels, down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), latent_channels=4,
                        norm_num_groups=groups, layers_per_block=1, sample_size=SIZE,
                        scaling_factor=0.18215 if sd_file else 0.5)  # a single file holds SD's factor only
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012) if sd_file else dict(
        beta_schedule=beta_schedule, beta_start=0.0001, beta_end=0.02)  # single files hold SD's schedule only
    scheduler = DDPMScheduler(**betas,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    assert main(["shapes", "--out", str(root / "data"), "--n", "24", "--size", str(SIZE), "--seed", "0"]) == 0
    return {"root": root, "data": root / "data", "model": tiny_sd_folder(root / "sd")}


def rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def diffusers_recipe_loss(model: Path, data: Path, ids, noise, timesteps) -> float:
    """The loss of one batch as diffusers' train_text_to_image.py computes it (latents: the posterior mode,
    as our cache stores them, instead of a sample)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(model / "vae")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    text, tokenizer = CLIPTextModel.from_pretrained(model / "text_encoder"), CLIPTokenizer.from_pretrained(model / "tokenizer")
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(data / i).convert("RGB"), dtype=np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for i in ids])  # (B, 3, H, W) in [-1, 1]
    latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    captions = [(data / i).with_suffix(".txt").read_text().strip() for i in ids]
    input_ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                          return_tensors="pt").input_ids
    encoder_hidden_states = text(input_ids, return_dict=False)[0]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean").item()


def assert_first_loss_is_diffusers(run, cfg, model, data):
    from latentforge.data.cache import LatentDataset
    from latentforge.train.data import Stream
    from latentforge.train.step import draw

    ds, positions = LatentDataset(str(run / "cache")), list(range(B))
    stream = Stream(ds, cfg.seed)
    ids = [ds[stream.index(p)]["id"] for p in positions]
    d = draw(cfg, positions, tuple(ds[0]["latent"].shape), cfg.schedule.num_train_timesteps)
    theirs = diffusers_recipe_loss(model, data, ids, d.noise, d.t)
    print("first-step loss: ours", rows(run)[0]["loss"], "diffusers' recipe", theirs)
    assert abs(rows(run)[0]["loss"] - theirs) < 1e-5, (rows(run)[0]["loss"], theirs)


def test_init_from_a_diffusers_folder_matches_the_diffusers_recipe_and_exports(world):
    from diffusers import StableDiffusionPipeline

    import latentforge

    run = world["root"] / "run"
    assert main(["train", "--init", str(world["model"]), "--data", str(world["data"]), "--out", str(run), "--quiet",
                 f"batch_size={B}", "max_steps=2", "caption_dropout=0", "log_every=1", "sample_every=0",
                 "checkpoint_every=2", "warmup_steps=0", "lr=1e-3"]) == 0
    cfg = load_train_config(run / "config.toml")
    assert (cfg.init, cfg.schedule.prediction_type, cfg.schedule.beta_schedule) == (
        str(world["model"]), "v_prediction", "linear")  # the schedule is the model's, not the preset's
    assert cfg.vae_path == cfg.text_encoder == str(world["model"])  # its own encoders made the cache

    # the first step's batch, noise and timesteps, through diffusers' recipe
    assert_first_loss_is_diffusers(run, cfg, world["model"], world["data"])

    # model/ is a complete SD folder: diffusers and latentforge load it, the text encoder is the model's
    pipe = StableDiffusionPipeline.from_pretrained(run / "model")
    source = StableDiffusionPipeline.from_pretrained(world["model"])
    for a, b in zip(pipe.text_encoder.state_dict().values(), source.text_encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe.tokenizer.get_vocab() == source.tokenizer.get_vocab()
    assert not torch.equal(pipe.unet.conv_in.weight, source.unet.conv_in.weight)  # it was trained
    ours = latentforge.load(run / "model")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert_same_function(ours.unet(x, t, ctx), pipe.unet(x, t, ctx).sample, ours.unet, positions=8 * 8)


def test_validation_loss_falls_on_shapes(world, tmp_path):
    """Fine-tuning on the shapes data with a quarter of the images held out: the held-out loss falls."""
    run = tmp_path / "run"
    assert main(["train", "--init", str(world["model"]), "--data", str(world["data"]), "--out", str(run), "--quiet",
                 "batch_size=6", "max_steps=30", "lr=2e-3", "log_every=5", "sample_every=0", "checkpoint_every=30",
                 "val_fraction=0.25", "val_every=10", "val_timesteps=4"]) == 0
    val = [r for r in rows(run) if "val_loss" in r]
    print("validation loss by step:", [(r["step"], round(r["val_loss"], 4), round(r["val_loss_ema"], 4)) for r in val])
    assert [r["step"] for r in val] == [0, 10, 20, 30] and val[0]["val_images"] >= 3
    assert val[-1]["val_loss"] < 0.8 * val[0]["val_loss"]
    assert val[-1]["val_loss_ema"] < val[0]["val_loss_ema"]
    assert "validation loss (EMA weights), lowest" in (run / "report.md").read_text()


def test_init_from_a_single_file_trains_like_the_source_folder(world, tmp_path, capsys):
    """folder -> our single-file export -> --init FILE: converted into RUN/init, first loss = diffusers' recipe
    on the source folder."""
    source = tiny_sd_folder(tmp_path / "sd1", prediction_type="epsilon", sd_file=True, seed=3)
    file = tmp_path / "sd1.safetensors"
    assert main(["export", "--model", str(source), "--single-file", str(file), "--dtype", "fp32"]) == 0
    run = tmp_path / "run"
    common = ["--data", str(world["data"]), "--out", str(run), "--quiet", f"batch_size={B}", "max_steps=1",
              "caption_dropout=0", "log_every=1", "sample_every=0", f"image_size={SIZE}"]
    assert main(["train", "--init", str(file), *common]) == 2  # a single file holds no tokenizer
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["train", "--init", str(file), "--tokenizer", str(source / "tokenizer"), *common]) == 0
    cfg = load_train_config(run / "config.toml")
    assert cfg.init == cfg.vae_path == cfg.text_encoder == str(run / "init")
    assert cfg.schedule.prediction_type == "epsilon"
    assert_first_loss_is_diffusers(run, cfg, source, world["data"])


def test_init_bad_input_is_one_line(world, tmp_path, capsys):
    model, data = str(world["model"]), str(world["data"])

    def fails(*argv, data=data, needles=()):
        capsys.readouterr()
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--quiet", "max_steps=1", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and all(n in err for n in needles), err

    fails("--init", str(tmp_path / "nope"), needles=["--init", "no such file or folder"])
    fails("--init", data, needles=["not a diffusers model folder"])
    fails("--init", model, "unet.channels=[16, 32]", needles=["unet.channels=[16, 32]", "unet/config.json"])
    fails("--init", model, "model=tiny", needles=["model=tiny", "cannot be combined with --init"])
    uncaptioned = tmp_path / "plain"
    uncaptioned.mkdir()
    for p in world["data"].glob("*.png"):
        (uncaptioned / p.name).write_bytes(p.read_bytes())
    fails("--init", model, data=uncaptioned, needles=["is text-conditional but the data has no captions"])
    assert not (tmp_path / "r" / "checkpoints").exists()
    # a cache made with another VAE is refused, as without --init
    from latentforge.config import PRESETS
    from latentforge.models import AutoencoderKL

    AutoencoderKL(PRESETS["tiny"].vae).save_pretrained(tmp_path / "other_vae")
    assert main(["cache", "--data", data, "--vae", str(tmp_path / "other_vae"), "--out", str(tmp_path / "cache"),
                 "--text-encoder", model, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--init", model, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "c"),
                 "--quiet", "max_steps=1"]) == 2
    assert "encoded with a different VAE" in capsys.readouterr().err


def test_without_init_nothing_changes(world, tmp_path, capsys):
    """No --init: the preset's UNet and schedule; with it, the model's, below explicit settings."""
    from latentforge.config import PRESETS

    assert main(["train", "--print-config"]) == 0
    cfg = load_train_config(None, [])
    assert (cfg.unet, cfg.schedule, cfg.init) == (PRESETS["small"].unet, PRESETS["small"].schedule, "")
    assert 'init = ""' in capsys.readouterr().out
    assert main(["train", "--init", str(world["model"]), "--print-config", "schedule.prediction_type=epsilon"]) == 0
    printed = capsys.readouterr().out
    assert 'prediction_type = "epsilon"' in printed and "channels = [32, 64]" in printed  # explicit keys win
    assert "lr = 1e-05" in printed and 'lr_schedule = "constant"' in printed  # the fine-tuning defaults
