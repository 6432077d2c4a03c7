"""The pipeline encodes each prompt once and keeps its embeddings (not evaluate.py): the second call
with a prompt runs no text encoder, its images are the same as an uncached pipeline's, and applying
an adapter drops the cache."""

import json

import pytest
import torch
from test_pipelines import _folder, _image

import latentforge


def _counting(pipe):
    calls = []
    real = pipe.text_encoder.encode
    pipe.text_encoder.encode = lambda captions: (calls.append(list(captions)), real(captions))[1]
    return calls


def test_prompt_embeddings_cached_per_prompt(tmp_path):
    folder = _folder(tmp_path, "m")
    pipe = latentforge.load(folder, device="cpu")
    calls = _counting(pipe)
    kw = dict(sampler="ddim", steps=2, cfg=3.0, seed=5, output="pt")
    a = pipe.text2img("lowest", n=2, **kw)
    assert calls == [["lowest"], [""]]  # one row per prompt (and the empty negative), not n
    b = pipe.text2img("lowest", n=2, **kw)
    pipe.text2img("newer", n=1, **kw)
    assert calls == [["lowest"], [""], ["newer"]]  # "lowest" and "" came from the cache
    assert torch.equal(a, b)
    fresh = latentforge.load(folder, device="cpu")
    fresh_calls = _counting(fresh)
    c = fresh.text2img("lowest", n=2, **kw)
    assert torch.equal(a, c) and len(fresh_calls) == 2
    pipe._adaptable()  # what with_lora / without_lora go through
    pipe.text2img("lowest", n=1, **kw)
    assert calls[-2:] == [["lowest"], [""]]  # encoded again after an adapter could have changed the encoder


def test_bf16_inference_option_is_close_to_fp32(tmp_path):
    """`compute_in(bfloat16)`: the UNet in bf16, sampler and VAE in fp32; the images differ by a small, reported amount."""
    pipe = latentforge.load(_folder(tmp_path, "m"), device="cpu")
    kw = dict(sampler="dpmpp-2m", steps=4, cfg=3.0, seed=2, n=2, output="pt")
    ref = pipe.text2img("lowest", **kw)
    low = pipe.compute_in(torch.bfloat16).text2img("lowest", **kw)
    diff = (low - ref).abs().max().item()
    print(f"bf16 vs fp32 image: max abs difference {diff:.3g} (images in [0, 1])")
    assert low.dtype == torch.float32 and 0 < diff < 0.1
    assert torch.equal(pipe.compute_in(torch.float32).text2img("lowest", **kw), ref)  # back to fp32: the same images


@pytest.mark.parametrize("force_upcast", [True, False])
def test_bf16_inference_runs_the_vae_in_float32_exactly_when_force_upcast(tmp_path, force_upcast):
    """`compute_in(bfloat16)`: a VAE whose config.json says force_upcast (diffusers' key) decodes and encodes in
    float32, one that says false in bf16: the images equal that VAE's own decode in that dtype, bit for bit."""
    folder = _folder(tmp_path, "m")
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": force_upcast}))
    pipe = latentforge.load(folder, device="cpu")
    fp32 = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    kw = dict(sampler="ddim", steps=2, cfg=3.0, seed=2)
    pipe.compute_in(torch.bfloat16)
    latents = pipe.text2img("lowest", output="latent", **kw)
    images = pipe.text2img("lowest", output="pt", **kw)
    want = torch.float32 if force_upcast else torch.bfloat16
    assert pipe.vae.dtype == want and pipe.unet.dtype == torch.bfloat16

    def decoded(dtype):
        vae = latentforge.models.AutoencoderKL(pipe.vae.config)
        vae.load_state_dict(fp32)
        with torch.no_grad():
            return (vae.to(dtype).decode(latents.to(dtype)).float() / 2 + 0.5).clamp(0, 1)

    assert torch.equal(images, decoded(want))
    assert not torch.equal(images, decoded(torch.bfloat16 if force_upcast else torch.float32))
    assert pipe.img2img(_image(), prompt="lowest", strength=0.5, output="pt", **kw).dtype == torch.float32
    pipe.compute_in(torch.float32)
    assert all(torch.equal(v, fp32[k]) for k, v in pipe.vae.state_dict().items())  # back: the float32 weights
