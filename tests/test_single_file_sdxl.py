"""SDXL single files (formats/sdxl_file.py): the `conditioner.embedders.0/1` layout, with diffusers' own converters
(`diffusers.loaders.single_file_utils`) as the oracle, on a tiny random StableDiffusionXLPipeline folder with
SDXL's conventions (64-channel heads, GroupNorm of 32, an attention-free first level, depth 1 then 2).

Export: folder -> our file -> diffusers' converters give back exactly the source state dicts. Import: our file ->
our pipeline samples the same image as diffusers' pipeline on the source folder. Round trip file -> folder -> file."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.formats.single_file import load_single_file
from latentforge.pipelines import Pipeline
from sdxl_kit import VOCAB, write_clip
from test_single_file import _assert_same_state  # state dicts equal up to the CLIP key level


def _randomize(module, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def _text(with_projection: bool, seed: int):
    cfg = CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, bos_token_id=26, eos_token_id=27,
                         pad_token_id=27, projection_dim=32, hidden_act="gelu" if with_projection else "quick_gelu")
    return _randomize((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg), seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl_file")
    write_clip(tmp / "tok", 0, with_projection=False)  # only the tokenizers are used from here
    write_clip(tmp / "tok", 1, with_projection=True, pad="!")
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
                                transformer_layers_per_block=(1, 2), use_linear_projection=True,
                                cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = DAutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         scaling_factor=0.13025)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_randomize(vae, 2), unet=_randomize(unet, 1, 0.05), scheduler=sched,
                                     text_encoder=_text(False, 3), text_encoder_2=_text(True, 4),
                                     tokenizer=AutoTokenizer.from_pretrained(tmp / "tok" / "tokenizer"),
                                     tokenizer_2=AutoTokenizer.from_pretrained(tmp / "tok" / "tokenizer_2"))
    pipe.save_pretrained(tmp / "sdxl")
    path = tmp / "sdxl.safetensors"
    assert main(["export", "--model", str(tmp / "sdxl"), "--single-file", str(path), "--dtype", "fp32"]) == 0
    return {"tmp": tmp, "folder": tmp / "sdxl", "file": path}


def test_export_converts_back_with_diffusers_converters(world):
    ckpt, folder = load_file(str(world["file"])), world["folder"]
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_") for k in ckpt)
    assert "model.diffusion_model.label_emb.0.0.weight" in ckpt and "v_pred" not in ckpt
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = DAutoencoderKL.from_pretrained(folder / "vae")
    text, text_2 = (CLIPTextModel.from_pretrained(folder / "text_encoder"),
                    CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"))
    _assert_same_state(sfu.convert_ldm_unet_checkpoint(ckpt, unet.config), unet.state_dict(), "unet")
    _assert_same_state(sfu.convert_ldm_vae_checkpoint(ckpt, vae.config), vae.state_dict(), "vae")
    _assert_same_state(sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer."),
                       text.state_dict(), "text_encoder")
    _assert_same_state(sfu.convert_open_clip_checkpoint(text_2, ckpt, prefix="conditioner.embedders.1.model."),
                       text_2.state_dict(), "text_encoder_2")


def test_import_samples_like_diffusers_sdxl_pipeline(world):
    sf = load_single_file(world["file"], tokenizer=world["folder"])
    assert sf.family == "sdxl" and sf.vae.config.scaling_factor == 0.13025
    c = sf.unet.config
    assert (c.transformer_layers, c.attention, c.addition_time_embed_dim, c.addition_input_dim) == (
        (1, 2), (False, True), 8, 80)
    ours = Pipeline.from_pretrained(world["file"], device="cpu", tokenizer=world["folder"])
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(world["folder"])
    ref_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ref_pipe("lower newer", negative_prompt="wider", latents=latents, num_inference_steps=4, guidance_scale=4.0,
                   height=16, width=16, output_type="pt").images
    got = ours.text2img("lower newer", negative_prompt="wider", sampler="euler", steps=4, cfg=4.0, size=(16, 16),
                        latents=latents, output="pt")
    assert ref.std() > 0.02
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_round_trip_file_folder_file(world, tmp_path):
    folder, again = tmp_path / "folder", tmp_path / "again.safetensors"
    assert main(["export", "--model", str(world["file"]), "--diffusers", str(folder), "--tokenizer",
                 str(world["folder"])]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    StableDiffusionXLPipeline.from_pretrained(folder)  # diffusers loads the converted folder
    assert main(["export", "--model", str(folder), "--single-file", str(again), "--dtype", "fp32"]) == 0
    a, b = load_file(str(world["file"])), load_file(str(again))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_file_needs_both_tokenizers(world, tmp_path):
    with pytest.raises(UserError, match="no tokenizer_2/"):
        load_single_file(world["file"], tokenizer=world["folder"] / "tokenizer")
    with pytest.raises(UserError, match="tokenizer/ and tokenizer_2/"):
        load_single_file(world["file"]).text_encoder()


def test_damaged_sdxl_file_is_one_line(world, tmp_path, capsys):
    from safetensors.torch import save_file

    state = load_file(str(world["file"]))
    del state["model.diffusion_model.label_emb.0.0.weight"]
    path = tmp_path / "damaged.safetensors"
    save_file(state, str(path))
    code = main(["sample", "--model", str(path), "--tokenizer", str(world["folder"]), "--prompt", "x",
                 "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "micro-conditioning MLP" in err, err


def test_init_from_an_sdxl_file_trains(world, tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("lower newer")
    run = tmp_path / "run"
    assert main(["train", "--init", str(world["file"]), "--tokenizer", str(world["folder"]), "--data", str(data),
                 "--out", str(run), "--quiet", "batch_size=2", "max_steps=1", "sample_every=0",
                 "checkpoint_every=1", "image_size=32"]) == 0  # (an SDXL file's VAE says 1024 px)
    assert json.loads((run / "init" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    StableDiffusionXLPipeline.from_pretrained(run / "model")  # the fine-tuned SDXL folder loads in diffusers
