"""formats/lora.py + Pipeline.with_lora: diffusers' `load_lora_weights` (PEFT) is the oracle for both our
diffusers-format and our kohya-format files, at scale 1.0 and 0.5; files round-trip exactly; a LoRA for
another architecture is one line naming the first mismatched key."""

import copy

import pytest
import torch

from latentforge import adapters as A
from latentforge.errors import UserError
from latentforge.formats import lora as F
from latentforge.pipelines import Pipeline
from test_pipelines import UNET, _folder


def _adapt(pipe, kind="lora", dora=False, seed=0, unet_targets="all", alpha=3.0, text_dora=None):
    """A 'trained' adapter: injected on UNet (targets) + text encoder, then random non-zero weights."""
    A.inject(pipe.unet, kind, rank=2, alpha=alpha, targets=unet_targets, dora=dora, seed=seed)
    A.inject(pipe.text_encoder.model, kind, rank=2, alpha=alpha, targets="attention+ff",
             dora=dora if text_dora is None else text_dora, seed=seed, text=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder.model):
            for p in A.adapter_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder.model}


@pytest.fixture(scope="module")
def model_and_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    folder = _folder(tmp, "m")
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    comps = _adapt(pipe)
    (tmp / "diffusers").mkdir()
    files = {"diffusers": F.save_diffusers(tmp / "diffusers", comps),
             "kohya": F.save_kohya(tmp / "kohya" / "shapes.safetensors", comps,
                                   F.kohya_metadata("m", "lora", 2, 3.0, steps=7, resolution=32))}
    return folder, files


def _ours(folder, file, scale):
    pipe = Pipeline.from_pretrained(folder, device="cpu").with_lora(file, scale)
    return _draw(pipe)


def _draw(pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return pipe.text2img("lower newer", negative_prompt="wider", sampler="ddim", steps=4, cfg=5.0, seed=3,
                         size=(32, 32), latents=latents, output="pt")


def _diffusers(folder, file, scale):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(file.parent), weight_name=file.name)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return ref("lower newer", negative_prompt="wider", guidance_scale=5.0, num_inference_steps=4, height=32,
               width=32, latents=latents, output_type="pt", cross_attention_kwargs={"scale": scale}).images


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_diffusers_load_lora_weights_draws_the_same_image(model_and_files, fmt, scale):
    folder, files = model_and_files
    got, ref = _ours(folder, files[fmt], scale), _diffusers(folder, files[fmt], scale)
    base = _draw(Pipeline.from_pretrained(folder, device="cpu"))
    assert (got - base).abs().max() > 0.02  # the LoRA changes the image
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_dora_in_diffusers_format_matches_diffusers(tmp_path):
    folder = _folder(tmp_path, "m")
    # DoRA on the UNet; diffusers 0.42.1 + transformers 5.24 do not load a CLIP text encoder's DoRA
    # magnitudes (its loader expects other key names), so the text encoder gets plain LoRA here.
    comps = _adapt(Pipeline.from_pretrained(folder, device="cpu"), dora=True, unet_targets="attention+ff",
                   text_dora=False)
    file = F.save_diffusers(tmp_path, comps)
    torch.testing.assert_close(_ours(folder, file, 1.0), _diffusers(folder, file, 1.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind,dora", [("lora", True), ("loha", False), ("lokr", False)])
def test_kohya_file_round_trips_bitwise(tmp_path, kind, dora):
    folder = _folder(tmp_path, "m")
    adapted = Pipeline.from_pretrained(folder, device="cpu")
    comps = _adapt(adapted, kind, dora, alpha=2.0)
    file = F.save_kohya(tmp_path / "a.safetensors", comps, F.kohya_metadata("m", kind, 2, 2.0, 5, 32, dora))
    meta = F.read(file).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("2", "2", "5")
    loaded = Pipeline.from_pretrained(folder, device="cpu").with_lora(file)
    assert torch.equal(_draw(loaded), _draw(adapted))
    base = Pipeline.from_pretrained(folder, device="cpu")
    assert torch.equal(_draw(loaded.without_lora()), _draw(base))


def test_with_lora_leaves_base_weights_untouched_and_stacks(model_and_files):
    folder, files = model_and_files
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    before = copy.deepcopy(pipe.unet.state_dict())
    one = _draw(pipe.with_lora(files["kohya"], 0.5))
    two = _draw(pipe.with_lora(files["kohya"], 0.5))  # stacked: the same file twice = scale 1.0
    torch.testing.assert_close(two, _ours(folder, files["kohya"], 1.0), atol=1e-5, rtol=0)
    assert (two - one).abs().max() > 1e-3
    pipe.without_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_lora_for_another_architecture_names_the_first_mismatched_key(tmp_path, model_and_files):
    from latentforge.config import replace
    from latentforge.models import UNet

    other = UNet(replace(UNET, channels=(8, 32)))
    A.inject(other, "lora", rank=2, alpha=2, targets="all")  # level 0 has 8 channels here, 16 in the base
    file = F.save_kohya(tmp_path / "other.safetensors", {"unet": other})
    folder, _ = model_and_files
    pipe = Pipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(UserError, match=r"key lora_unet_down_blocks_0_resnets_0_conv1\.alpha does not fit this model "
                                        r"\(lora_down.weight has shape \(2, 8, 3, 3\).* needs \(2, 16, 3, 3\)\)"):
        pipe.with_lora(file)
    assert not list(A.adapters(pipe.unet))  # nothing applied
    with pytest.raises(UserError, match=r"--lora .*missing.safetensors: no such file"):
        pipe.with_lora(tmp_path / "missing.safetensors")


def test_lycoris_full_lokr_factors_are_read_at_scale_one(tmp_path):
    """A LyCORIS LoKr key set with a full w2 (`lokr_w1`, `lokr_w2`): ΔW = w1 ⊗ w2 at scale 1, as ComfyUI
    applies it (its alpha is ignored without a decomposed factor)."""
    from safetensors.torch import save_file

    from latentforge.models import UNet

    torch.manual_seed(0)
    unet = UNet(UNET).eval()
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"  # (32, 32)
    w1, w2 = torch.randn(4, 4), torch.randn(8, 8) * 0.1
    name = F.kohya_name("unet", path)
    file = tmp_path / "lokr.safetensors"
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2, f"{name}.alpha": torch.tensor(7.0)}, str(file))
    expect = unet.get_submodule(path).weight + torch.kron(w1, w2)
    F.apply(F.read(file), {"unet": unet})
    torch.testing.assert_close(unet.get_submodule(path).weight, expect)


def test_two_text_encoders_use_kohya_te1_te2_and_clip_text_model_names(tmp_path):
    """SDXL's second text encoder: lora_te2_ (kohya) / text_encoder_2. (diffusers); CLIP layers are written as
    text_model.encoder.layers.N…; kohya's lora_te1_ spelling of the first encoder is read too."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    def clip(seed):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(vocab_size=30, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=8)).eval()

    one, two = clip(0), clip(1)
    for m in (one, two):
        A.inject(m, "lora", rank=2, alpha=2, targets="attention", text=True)
        with torch.no_grad():
            for p in A.adapter_parameters(m):
                p.normal_(0, 0.2)
    file = F.save_kohya(tmp_path / "xl.safetensors", {"text_encoder": one, "text_encoder_2": two})
    keys = list(load_file(str(file)))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    te1 = tmp_path / "te1.safetensors"  # the same file in the lora_te1_ spelling
    save_file({k.replace("lora_te_", "lora_te1_"): v for k, v in load_file(str(file)).items()}, str(te1))
    ids = torch.tensor([[1, 4, 5, 2]])
    for f in (file, te1):
        fresh = {"text_encoder": clip(0), "text_encoder_2": clip(1)}
        F.apply(F.read(f), fresh)
        with torch.no_grad():
            for name, m in (("text_encoder", one), ("text_encoder_2", two)):
                assert torch.equal(fresh[name](ids).last_hidden_state, m(ids).last_hidden_state)
