"""The pipeline encodes each prompt once and keeps its embeddings (not evaluate.py): the second call
with a prompt runs no text encoder, its images are the same as an uncached pipeline's, and applying
an adapter drops the cache."""

import torch
from test_pipelines import _folder

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
