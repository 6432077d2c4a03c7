"""Adapters in bf16: LoRA training with precision=bf16 (a bf16 compute copy, fp32 masters: train/precision.py)
against the same run in fp32, and inference with `Pipeline.compute_in(bf16)` + `with_lora` against float32 and
against the adapter merged into the weights.

bf16 bounds: each rounding to bf16 has relative error at most eps = 2^-7 (torch.finfo(torch.bfloat16).eps,
7 stored mantissa bits); D roundings in a row, independent, add in quadrature (Higham, "Accuracy and Stability
of Numerical Algorithms", 2002, §2.8: the rule-of-thumb √D instead of the worst case D), so

    |bf16 − fp32| ≤ scale · eps · √D

with D an over-count of the rounded layers between input and output: every Conv2d and Linear of the model
(the longest path holds fewer). Each test also checks that what it guards (the adapter's effect) is larger
than its bound can hide, so that losing the adapter in bf16 fails it."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from test_lora_files import _adapt
from test_lora_train import LORA, init_folder, run
from test_pipelines import _folder

from latentforge.adapters import merge, remove
from latentforge.formats import lora as F
from latentforge.models import UNet
from latentforge.pipelines import Pipeline

EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2^-7


def rounded_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules())


# ----------------------------------------------------------------------------- training

def test_bf16_lora_training_takes_the_fp32_step_within_bf16_rounding(tmp_path):
    """One optimizer step of a LoRA run, precision=bf16 vs fp32, same seed and batch. With adam_eps = 1e3 far
    above every gradient entry, AdamW's first step is −lr · g / (|g| + adam_eps) ≈ −(lr / adam_eps) · g (relative
    nonlinearity |g| / adam_eps < 1e-3), so the step *is* the adapter's gradient, and the two runs' lora_up
    (zero before the step) compare the bf16 and the fp32 gradient directly. The gradient goes forward and back
    through the model: D = 2 × its rounded layers. lora_down has no gradient at lora_up = 0: bitwise equal."""
    folder = init_folder(tmp_path)
    opts = ["max_steps=1", "lr_schedule=constant", "warmup_steps=0", "lr=1", "adam_eps=1e3", "weight_decay=0",
            "grad_clip=0"]
    after = {}
    for precision in ("fp32", "bf16"):
        run(tmp_path / precision, folder, opts + [f"precision={precision}"])
        after[precision] = load_file(str(tmp_path / precision / "checkpoints" / "step-1" / "model.safetensors"))
    up = sorted(k for k in after["fp32"] if "lora_up" in k)
    down = sorted(k for k in after["fp32"] if "lora_down" in k)
    assert up and down and after["fp32"].keys() == after["bf16"].keys()
    assert all(torch.equal(after["fp32"][k], after["bf16"][k]) for k in down)
    step32 = torch.cat([after["fp32"][k].flatten() for k in up])
    step16 = torch.cat([after["bf16"][k].flatten() for k in up])
    assert after["bf16"][up[0]].dtype == torch.float32  # the fp32 masters are what is checkpointed
    depth = 2 * rounded_layers(UNet.from_pretrained(folder / "unet"))
    bound = EPS_BF16 * math.sqrt(depth)  # relative to the gradient's norm (the scale)
    rel = float((step16 - step32).norm() / step32.norm())
    print(f"bf16 vs fp32 LoRA step: relative difference {rel:.4f} (bound {bound:.4f}, D = {depth})")
    assert step32.norm() > 0 and rel < bound


# ----------------------------------------------------------------------------- inference

@pytest.fixture(scope="module")
def model_and_lora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_bf16")
    folder = _folder(tmp, "m")
    comps = _adapt(Pipeline.from_pretrained(folder, device="cpu"))
    return folder, F.save_kohya(tmp / "k.safetensors", comps, F.kohya_metadata("m", "lora", 2, 3.0, steps=1, resolution=32))


def _load(folder):
    return Pipeline.from_pretrained(folder, device="cpu")


def _images(pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return pipe.text2img("lower newer", sampler="ddim", steps=3, cfg=4.0, latents=latents, output="pt")


def test_with_lora_and_compute_in_commute_and_go_back_to_float32(model_and_lora):
    """with_lora then compute_in(bf16) and compute_in(bf16) then with_lora are one model, bit for bit; back in
    float32 it is with_lora's float32 model again, and without_lora gives the base model. Before, the last two
    raised (the float32 weights kept by compute_in had no adapter keys, or only adapter keys), and an adapter
    put on in bf16 kept bf16-rounded weights."""
    folder, file = model_and_lora
    first = _load(folder).with_lora(file).compute_in(torch.bfloat16)
    then = _load(folder).compute_in(torch.bfloat16).with_lora(file)
    a, b = first.unet.state_dict(), then.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert then.unet.dtype == torch.bfloat16 and torch.equal(_images(first), _images(then))
    fp32 = _images(_load(folder).with_lora(file))
    assert torch.equal(_images(then.compute_in(torch.float32)), fp32)
    base = _images(_load(folder))
    assert torch.equal(_images(first.without_lora().compute_in(torch.float32)), base)
    assert (fp32 - base).abs().max() > 1e-2  # the adapter changes the images: the checks above can tell


def test_bf16_with_lora_is_the_fp32_and_the_merged_model_within_bf16_rounding(model_and_lora):
    """One UNet evaluation (the sampler's unit): compute_in(bf16) + with_lora against float32 + with_lora, and
    the adapter merged into the float32 weights then cast to bf16 (`latentforge merge`'s model) against the
    same float32 reference. scale = max |fp32 output|; D = the UNet's Conv2d + Linear layers (adapters'
    own included)."""
    folder, file = model_and_lora
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700]), torch.randn(2, 6, 32, generator=g)

    def output(pipe):
        with torch.no_grad():
            return pipe._unet_fn()(x, t, context=ctx)  # (2, 4, 8, 8) float32, inputs cast to the UNet's dtype

    ref = output(_load(folder).with_lora(file))
    lora16 = output(_load(folder).with_lora(file).compute_in(torch.bfloat16))
    merged = _load(folder).with_lora(file)
    merge(merged.unet)
    remove(merged.unet)  # the merged weights stay, the adapter layers go
    merged16 = output(merged.compute_in(torch.bfloat16))
    adapted = _load(folder).with_lora(file).unet
    bound = float(ref.abs().max()) * EPS_BF16 * math.sqrt(rounded_layers(adapted))
    effect = float((ref - output(_load(folder))).abs().max())
    d_lora, d_merged = float((lora16 - ref).abs().max()), float((merged16 - ref).abs().max())
    print(f"bf16 + LoRA vs fp32: {d_lora:.4f}; merged in bf16 vs fp32: {d_merged:.4f}; bound {bound:.4f}; "
          f"the adapter's own effect {effect:.4f}")
    assert d_lora < bound and d_merged < bound
    # bf16 without the adapter would be at least effect − bound from the reference, more than the bound:
    assert effect > 2 * bound
