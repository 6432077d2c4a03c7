"""formats/single_file.py + `latentforge export`: the original SD layout, with diffusers' own converter
(`diffusers.loaders.single_file_utils.convert_ldm_*` / `convert_open_clip_checkpoint`) as the oracle.

Export: a tiny random diffusers StableDiffusionPipeline folder -> our single file -> diffusers'
converter gives back exactly the source state dicts. Import: a single file of fresh random tensors in
that layout -> diffusers' converter into diffusers' models (the oracle) and our import -> the same
outputs. Three UNet configs: SD 1.x-like (8 heads, conv projections, CLIP), SD 2.x-like (linear
projections, 64 channels per head, OpenCLIP, a legacy .ckpt of SD 2.0-base = ε), and an SD 2.x-v
model (v-prediction, the default for SD 2.x), sampled end to end against StableDiffusionPipeline.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.formats.single_file import load_single_file
from latentforge.pipelines import Pipeline
from tolerance import assert_same_function

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "c", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
         "a</w>", "e</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>",
         "<|endoftext|>"]
CONFIGS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, use_linear_projection=False,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                text_act="quick_gelu"),
    "sd2": dict(block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=[1, 2], use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                text_act="gelu"),
    "sd2v": dict(block_out_channels=(64, 64, 128), layers_per_block=1, attention_head_dim=[1, 1, 2],
                 use_linear_projection=True, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), text_act="gelu"),
}


def _randomize(module, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def _tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<unk>", pad_token="<|endoftext|>",
                  model_max_length=12).save_pretrained(folder)
    return folder


def _components(name):
    c = dict(CONFIGS[name])
    act = c.pop("text_act")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=64,
                                norm_num_groups=32, **c)
    vae = DAutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=12,
                                        hidden_act=act, bos_token_id=25, eos_token_id=26, pad_token_id=26))
    return _randomize(unet, 1), _randomize(vae, 2, 0.1), _randomize(text, 3, 0.1).eval()


def _save_pipeline(tmp: Path, name: str, prediction_type: str) -> Path:
    unet, vae, text = _components(name)
    tok = CLIPTokenizer.from_pretrained(str(_tokenizer(tmp / "tok")))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / name)
    return tmp / name


def _plain(state):
    """transformers 5's CLIPTextModel has no `text_model.` key level; the converter (and transformers 4) do."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def _assert_same_state(converted, source, what):
    source, converted = _plain(source), _plain(converted)
    assert sorted(converted) == sorted(source), what
    for k, v in source.items():
        assert torch.equal(converted[k].float(), v.float()), f"{what}: {k}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (diffusers folder, our exported single file (fp32))."""
    tmp = tmp_path_factory.mktemp("sf")
    out = {}
    for name, pred in (("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2v", "v_prediction")):
        folder = _save_pipeline(tmp, name, pred)
        path = tmp / f"{name}.safetensors"
        assert main(["export", "--model", str(folder), "--single-file", str(path), "--dtype", "fp32"]) == 0
        out[name] = (folder, path)
    return out


# --------------------------------------------------------------------------- export: diffusers' converter as oracle


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd2v"])
def test_export_converts_back_with_diffusers_converter(exported, name):
    folder, path = exported[name]
    ckpt = load_file(str(path))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = DAutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    _assert_same_state(sfu.convert_ldm_unet_checkpoint(ckpt, unet.config), unet.state_dict(), "unet")
    _assert_same_state(sfu.convert_ldm_vae_checkpoint(ckpt, vae.config), vae.state_dict(), "vae")
    if name == "sd1":
        converted = sfu.convert_ldm_clip_checkpoint(ckpt)
    else:
        converted = sfu.convert_open_clip_checkpoint(text, ckpt)
    _assert_same_state(converted, text.state_dict(), "text encoder")
    assert ("v_pred" in ckpt) == (name == "sd2v")  # ComfyUI's v-prediction marker


@pytest.mark.parametrize("name", ["sd1", "sd2v"])
def test_diffusers_from_single_file_loads_our_export(exported, name):
    """A real consumer of the layout: diffusers' StableDiffusionPipeline.from_single_file (offline, the
    configs from the source folder) reads our file into exactly the source weights."""
    folder, path = exported[name]
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                      safety_checker=None)
    source = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(loaded, part).state_dict(), getattr(source, part).state_dict(), part)


def test_export_dtype_and_refusals(exported, tmp_path):
    folder, _ = exported["sd1"]
    half = tmp_path / "half.safetensors"
    assert main(["export", "--model", str(folder), "--single-file", str(half)]) == 0  # fp16 by default
    assert {v.dtype for v in load_file(str(half)).values() if v.numel()} == {torch.float16}
    with pytest.raises(UserError, match="already exists"):
        main_raising(["export", "--model", str(folder), "--single-file", str(half)])
    with pytest.raises(UserError, match="--dtype"):
        main_raising(["export", "--model", str(folder), "--single-file", str(tmp_path / "x.safetensors"),
                      "--dtype", "int8"])


def main_raising(argv):
    """Run a sub-command's run() directly, so the UserError (the CLI's one line) can be inspected."""
    from latentforge.cli import build_parser
    from latentforge.commands import export

    return export.run(build_parser("export").parse_args(argv))


# --------------------------------------------------------------------------- import: outputs equal diffusers'


def _fresh_file(src: Path, dst: Path, seed: int, extra=None) -> dict:
    """The layout of `src` with every tensor redrawn: nothing of our export's values survives."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.1 if v.numel() else v) for k, v in load_file(str(src)).items()}
    state.update(extra or {})
    if dst.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 875000}, dst)
    else:
        save_file(state, str(dst))
    return state


def _diffusers_models(ckpt, folder, name):
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, unet.config))
    vae = DAutoencoderKL.from_config(DAutoencoderKL.load_config(folder / "vae"))
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, vae.config))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    state = sfu.convert_ldm_clip_checkpoint(ckpt) if name == "sd1" else sfu.convert_open_clip_checkpoint(text, ckpt)
    text.load_state_dict(_plain(state) if not any(k.startswith("text_model.") for k in text.state_dict()) else state)
    return unet.eval(), vae.eval(), text.eval()


@pytest.mark.parametrize("name,suffix,old_clip_keys", [("sd1", ".safetensors", False), ("sd2", ".ckpt", False),
                                                        ("sd1", ".safetensors", True)])
def test_import_outputs_equal_diffusers(exported, tmp_path, name, suffix, old_clip_keys):
    folder, path = exported[name]
    ckpt = _fresh_file(path, tmp_path / f"fresh{suffix}", seed=5)
    ref_unet, ref_vae, ref_text = _diffusers_models(ckpt, folder, name)
    if old_clip_keys:  # as transformers < 4.12 saved them: no `text_model.` level
        save_file({k.replace("transformer.text_model.", "transformer."): v for k, v in ckpt.items()},
                  str(tmp_path / f"fresh{suffix}"))
    sf = load_single_file(tmp_path / f"fresh{suffix}", tokenizer=folder / "tokenizer")
    assert sf.family == name
    # SD 1.x: ε; SD 2.x: v unless global_step 875000 (SD 2.0-base) — the .ckpt here carries that step
    assert sf.schedule_config.prediction_type == "epsilon"
    g = torch.Generator().manual_seed(0)
    x, ctx, ids = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 64, generator=g), torch.tensor([[25, 3, 26]])
    images = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        t = torch.tensor([10, 900])
        assert_same_function(sf.unet(x, t, ctx), ref_unet(x, t, ctx).sample, sf.unet, positions=2 * 8 * 8, what="unet")
        assert_same_function(sf.vae.decode(x[:1]), ref_vae.decode(x[:1] / 0.18215).sample, sf.vae,
                             positions=16 * 16, what="decode")
        post = ref_vae.encode(images).latent_dist
        assert_same_function(sf.vae.encode(images), post.mode() * 0.18215, sf.vae, positions=16 * 16, what="encode")
        assert_same_function(sf.text_model(ids).last_hidden_state, ref_text(ids).last_hidden_state, sf.text_model,
                             positions=3, what="text")


def test_v_prediction_file_samples_like_stable_diffusion_pipeline(exported, tmp_path):
    """SD 2.x without a global_step is v-prediction (diffusers' rule); text→image equals diffusers'."""
    folder, path = exported["sd2v"]
    fresh = tmp_path / "v.safetensors"
    ckpt = _fresh_file(path, fresh, seed=6, extra={})
    del ckpt["v_pred"]  # the SD 2.x default alone must give v-prediction
    save_file(ckpt, str(fresh))
    unet, vae, text = _diffusers_models(ckpt, folder, "sd2v")
    pipe = latentforge_load(fresh, folder / "tokenizer")
    assert pipe.schedule.prediction_type == "v_prediction"
    sched = DDIMScheduler.from_config(dict(pipe.scheduler.config))
    ref = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                  unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want = ref("lower", num_inference_steps=3, guidance_scale=3.0, latents=latents, height=16, width=16,
               output_type="pt").images
    got = pipe.text2img("lower", sampler="ddim", steps=3, cfg=3.0, latents=latents, size=(16, 16), output="pt",
                        progress=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def latentforge_load(path, tokenizer):
    import latentforge

    return latentforge.load(path, device="cpu", tokenizer=tokenizer)


def test_round_trip_file_folder_file(exported, tmp_path):
    """export --diffusers then --single-file gives back the same tensors; the folder loads in diffusers."""
    folder, path = exported["sd2v"]
    out = tmp_path / "back"
    assert main(["export", "--model", str(path), "--diffusers", str(out), "--tokenizer", str(folder / "tokenizer")]) == 0
    StableDiffusionPipeline.from_pretrained(out, safety_checker=None)  # a complete SD folder
    again = tmp_path / "again.safetensors"
    assert main(["export", "--model", str(out), "--single-file", str(again), "--dtype", "fp32"]) == 0
    a, b = load_file(str(path)), load_file(str(again))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler}


def _diffusers_images(pipe, sampler, latents):
    """diffusers' way to pick a sampler: the scheduler class `from_config` of the folder's scheduler config."""
    pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe("lower", num_inference_steps=3, guidance_scale=3.0, latents=latents, height=16, width=16,
                output_type="pt").images


@pytest.mark.parametrize("name", ["sd1", "sd2v"])
def test_exported_folder_samples_like_the_file_in_both_libraries(exported, tmp_path, name):
    """export --diffusers writes the scheduler config the file is sampled with (set_alpha_to_one=False, the
    spacing, the offset, ... all written out): DDIM and DPM++ images of the file and of the exported folder are
    the same in latentforge and in diffusers (the file read by diffusers' from_single_file with the source
    folder's configs). Before, DDIM on the folder went to ᾱ = 1 at its last step."""
    folder, path = exported[name]
    out = tmp_path / "folder"
    assert main(["export", "--model", str(path), "--diffusers", str(out), "--tokenizer", str(folder / "tokenizer")]) == 0
    written = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {k: written[k] for k in ("set_alpha_to_one", "steps_offset", "timestep_spacing", "final_sigmas_type")} \
        == {"set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading", "final_sigmas_type": "zero"}
    ours_file, ours_folder = latentforge_load(path, folder / "tokenizer"), latentforge_load(out, None)
    theirs_folder = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    theirs_file = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                           safety_checker=None)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for sampler in SCHEDULERS:
        kw = dict(sampler=sampler, steps=3, cfg=3.0, latents=latents, size=(16, 16), output="pt", progress=False)
        want = ours_file.text2img("lower", **kw)
        # the same fp32 weights through the same code and the same options: bit for bit
        torch.testing.assert_close(ours_folder.text2img("lower", **kw), want, atol=0, rtol=0)
        # diffusers' pipeline and schedulers on the same weights: fp32 rounding of two implementations of the
        # same steps, a few ulp of pixels in [0, 1] (measured ≤ 4e-7); the slip this catches (DDIM's last step to
        # ᾱ = 1 on the folder) moved pixels by 6e-4 (sd1) and 3e-3 (sd2v)
        for pipe in (theirs_folder, theirs_file):
            torch.testing.assert_close(_diffusers_images(pipe, sampler, latents), want, atol=1e-5, rtol=0)


def test_exported_text_encoder_takes_its_token_ids_from_the_tokenizer(exported, tmp_path):
    """A single file holds no tokenizer; the bos/eos ids written to text_encoder/config.json are the given
    tokenizer's, not a guess from the end of the vocabulary."""
    folder, path = exported["sd1"]
    tok = tmp_path / "tok"
    tok.mkdir()
    moved = VOCAB[-2:] + VOCAB[:-2]  # <|startoftext|>, <|endoftext|> first: ids 0 and 1
    (tok / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(moved)}))
    (tok / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), unk_token="<unk>", pad_token="<|endoftext|>",
                  model_max_length=12).save_pretrained(tok)
    out = tmp_path / "folder"
    assert main(["export", "--model", str(path), "--diffusers", str(out), "--tokenizer", str(tok)]) == 0
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    sf = load_single_file(path, tokenizer=tok)
    assert sf.text_model.eos_token_id == 1  # transformers' CLIP pools the first eos token by this id


# --------------------------------------------------------------------------- bad input: one line naming the file


def _tiny_file(path: Path, keys) -> Path:
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


BAD = {
    # SDXL-base is supported (tests/test_single_file_sdxl.py); the refiner's one-OpenCLIP layout is not
    "sdxl_refiner": (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                      "conditioner.embedders.0.model.positional_embedding"], "another text-encoder layout"),
    "sd3": (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
             "first_stage_model.encoder.conv_in.weight"], "Stable Diffusion 3"),
    "lora": (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"], "LoRA"),
    "vae": (["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"], "VAE-only"),
    "random": (["foo", "bar.baz"], "not a Stable Diffusion checkpoint"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_unsupported_architecture_is_one_line_naming_it(tmp_path, capsys, kind):
    keys, what = BAD[kind]
    path = _tiny_file(tmp_path / f"{kind}.safetensors", keys)
    code = main(["sample", "--model", str(path), "--prompt", "x", "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(path) in err and what in err, err


def test_truncated_and_pickled_files_are_named(exported, tmp_path, capsys):
    _, good = exported["sd1"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(3)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": Path("x")}, evil)  # a class: needs pickle code execution
    for path, what in ((cut, "truncated"), (ckpt, "truncated"), (evil, "pickle code execution")):
        with pytest.raises(UserError) as e:
            load_single_file(path)
        assert str(path) in str(e.value) and what in str(e.value) and "\n" not in str(e.value), e.value


def test_missing_tokenizer_and_incomplete_file(exported, tmp_path):
    _, good = exported["sd1"]
    with pytest.raises(UserError, match="no such file"):
        Pipeline.from_pretrained(tmp_path / "typo.safetensors", device="cpu")
    with pytest.raises(UserError, match="--tokenizer"):
        Pipeline.from_pretrained(good, device="cpu")
    state = load_file(str(good))
    del state["model.diffusion_model.middle_block.1.proj_out.weight"]
    save_file(state, str(tmp_path / "holey.safetensors"))
    with pytest.raises(UserError, match="middle_block.1.proj_out.weight"):
        load_single_file(tmp_path / "holey.safetensors")


# --------------------------------------------------------------------------- full-size shapes (meta tensors, no memory)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_architecture_is_inferred_exactly(family):
    """SD 1.5 / SD 2.1-v shapes on the meta device: our key map feeds diffusers' converter (names and shapes
    equal diffusers' UNet2DConditionModel with the published config), and the shapes give back our config."""
    from latentforge.config import PRESETS, replace
    from latentforge.formats import ldm_keys as K
    from latentforge.formats import single_file as SF
    from latentforge.formats.diffusers import unet_to_diffusers
    from latentforge.models import UNet

    cfg = PRESETS["sd15"].unet
    if family == "sd2":  # stabilityai/stable-diffusion-2-1 unet/config.json, in our terms
        cfg = replace(cfg, num_heads=None, head_dim=64, cross_attention_dim=1024, use_linear_projection=True,
                      sample_size=96)
    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
        ref = UNet2DConditionModel(**{k: v for k, v in unet_to_diffusers(cfg).items() if not k.startswith("_")})
    ldm, unmapped = K.map_state(ours, K.unet_rules(4, 2, cfg.attention), forward=True)
    assert not unmapped and len(ldm) == 686  # the UNet tensors of v1-5-pruned-emaonly.safetensors
    converted = sfu.convert_ldm_unet_checkpoint(ldm, ref.config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    inferred = SF.infer_unet_config(SF._sub(ldm, K.UNET_PREFIX), family, v_prediction=True, path="f")
    assert inferred == cfg


def test_sample_command_takes_a_single_file(exported, tmp_path, capsys):
    folder, path = exported["sd1"]
    out = tmp_path / "png"
    assert main(["sample", "--model", str(path), "--tokenizer", str(folder / "tokenizer"), "--prompt", "lower",
                 "--size", "16x16", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 1 and str(written[0]) in capsys.readouterr().out


def test_full_size_vae_and_text_encoders_map_exactly():
    """SD's VAE (ch 128, mult 1,2,4,4) and CLIP ViT-L / OpenCLIP ViT-H text towers on the meta device: our maps
    feed diffusers' converter and give diffusers' names and shapes; the shapes give back the configs."""
    from latentforge.config import PRESETS
    from latentforge.formats import ldm_keys as K
    from latentforge.formats import single_file as SF
    from latentforge.formats.diffusers import vae_to_diffusers
    from latentforge.models import AutoencoderKL

    cfg = PRESETS["sd15"].vae
    with torch.device("meta"):
        ours = AutoencoderKL(cfg).state_dict()
        ref = DAutoencoderKL(**{k: v for k, v in vae_to_diffusers(cfg).items() if not k.startswith("_")})
    ldm, unmapped = K.map_state(SF._vae_attention_to_conv(ours), K.vae_rules(4, 2), forward=True)
    assert not unmapped
    converted = sfu.convert_ldm_vae_checkpoint(ldm, ref.config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert SF.infer_vae_config(SF._sub(ldm, K.VAE_PREFIX), "f") == cfg
    for layout, hidden, layers, inner in (("clip", 768, 12, 3072), ("openclip", 1024, 23, 4096)):
        tc = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inner,
                            num_attention_heads=hidden // 64, hidden_act="gelu" if layout == "openclip" else "quick_gelu")
        with torch.device("meta"):
            text = CLIPTextModel(tc)
        rules = K.openclip_rules(layers) if layout == "openclip" else K.clip_rules()
        ldm, unmapped = K.map_state(SF._text_state(text), rules, forward=True)
        ldm = SF._fuse_qkv(ldm) if layout == "openclip" else ldm
        assert not unmapped
        conv = sfu.convert_open_clip_checkpoint(text, ldm) if layout == "openclip" else sfu.convert_ldm_clip_checkpoint(ldm)
        assert {k: tuple(v.shape) for k, v in _plain(conv).items()} == \
            {k: tuple(v.shape) for k, v in _plain(text.state_dict()).items()}
        back = SF.infer_text_config(SF._text_state(text), layout, "f")
        assert (back.hidden_size, back.num_hidden_layers, back.intermediate_size, back.num_attention_heads,
                back.hidden_act) == (hidden, layers, inner, hidden // 64, tc.hidden_act)


def test_export_refuses_what_other_tools_would_read_differently(tmp_path):
    """The single-file layout carries no architecture: heads, GroupNorm groups, the text encoder's kind and
    the schedule must be what SD tools assume, or the export is refused in one line (nothing written)."""
    from transformers import BertConfig, BertModel

    from latentforge.config import ScheduleConfig, UNetConfig, VAEConfig
    from latentforge.formats.single_file import save_single_file
    from latentforge.models import AutoencoderKL, UNet

    unet_cfg = UNetConfig(channels=(32, 64), layers_per_level=1, attention=(True, False), num_heads=8,
                          cross_attention_dim=64, norm_groups=32, sample_size=8)
    vae = AutoencoderKL(VAEConfig(channels=(32, 32), layers_per_level=1, norm_groups=32, sample_size=16))
    _, _, clip = _components("sd1")
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                intermediate_size=64))
    from latentforge.config import replace

    cases = [
        (UNet(replace(unet_cfg, num_heads=4)), clip, ScheduleConfig(), "8 heads of SD 1.x"),
        (UNet(replace(unet_cfg, norm_groups=16)), clip, ScheduleConfig(), "GroupNorm groups"),
        (UNet(unet_cfg), bert, ScheduleConfig(), "CLIP text encoder only"),
        (UNet(unet_cfg), clip, ScheduleConfig(prediction_type="sample"), "x0-prediction"),
        (UNet(unet_cfg), clip, ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), "not SD's"),
    ]
    for unet, text, schedule, why in cases:
        out = tmp_path / "x.safetensors"
        with pytest.raises(UserError, match=why):
            save_single_file(out, unet, vae, text, schedule)
        assert not out.exists()
    save_single_file(tmp_path / "ok.safetensors", UNet(unet_cfg), vae, clip, ScheduleConfig())  # the baseline
