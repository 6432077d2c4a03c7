"""`adapter=lora lora.text_encoder=true`: adapters on the CLIP text model's attention and MLP, trained with the
UNet's on the captions (re-encoded every step). Oracle: diffusers' `load_lora_weights` on our trained diffusers
file and our kohya file draws the same image as latentforge's pipeline with the same LoRA (1e-3, scale 1.0 and
0.5); a fresh text adapter changes nothing (bitwise); the base text model stays bitwise; --resume is bitwise;
--merge writes a model/ that draws what base + LoRA draws. Tiny random models made in the test."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentforge import adapters as A
from latentforge.config import load_train_config
from latentforge.errors import UserError
from latentforge.models import AutoencoderKL
from latentforge.pipelines import Pipeline
from latentforge.text import TextEncoder
from latentforge.train import adapter, loop
from latentforge.train.data import InMemoryLatents
from latentforge.train.init import init_base, read_init
from test_lora_files import _diffusers, _draw
from test_pipelines import _folder
from tolerance import assert_same_function, sampling_evaluations

CAPTIONS = ["lower newer", "wider", "lowest", "low", "newer wider", "lower", "wider lowest", "newer"]
OPTS = ["batch_size=4", "lr=3e-2", "warmup_steps=0", "lr_schedule=constant", "log_every=1", "sample_every=0",
        "checkpoint_every=2", "keep_checkpoints=0", "caption_dropout=0.25", "val_fraction=0", "ema_decay=0.5",
        "adapter=lora", "lora.rank=2", "lora.alpha=4", "lora.targets=attention+ff", "lora.text_encoder=true"]


def dataset(text: TextEncoder) -> InMemoryLatents:
    context, mask = text.encode(CAPTIONS)
    null_context, null_mask = text.encode([""])
    latents = torch.randn(len(CAPTIONS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return InMemoryLatents(latents, context, mask, ids=[f"{i}.png" for i in range(len(CAPTIONS))],
                           null_context=null_context[0], null_mask=null_mask[0], captions=CAPTIONS)


def config(folder, overrides=()):
    return load_train_config(None, OPTS + list(overrides), base=init_base(read_init(str(folder))), init=True)


def _digest(folder):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _base_weights(model):
    """The plain weights under any adapters, by their plain names."""
    return {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items()
            if "lora_" not in k and not k.endswith(".alpha")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_te")
    folder = _folder(tmp, "m")
    before = _digest(folder)
    text = TextEncoder.from_pretrained(str(folder))
    plain = _base_weights(text.model)
    ds = dataset(text)
    run = tmp / "run"
    loop.train(config(folder, ["max_steps=4", "lora.merge=true"]), ds, run, text_encoder=text,
               vae=AutoencoderKL.from_pretrained(folder), progress=False)
    assert _digest(folder) == before  # the --init model's files are untouched
    after = _base_weights(text.model)
    assert after.keys() == plain.keys() and all(torch.equal(after[k], v) for k, v in plain.items())
    return folder, run, ds


def test_run_writes_text_encoder_keys_in_both_formats(trained):
    _, run, _ = trained
    diff = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    kohya = load_file(str(run / "lora" / "run.safetensors"))
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in diff
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha" in kohya
    te_up = [v for k, v in kohya.items() if k.startswith("lora_te_") and "lora_up" in k]
    assert len(te_up) == 2 * 6 and all(v.abs().max() > 0 for v in te_up)  # 2 layers x (q, k, v, out, fc1, fc2)
    from latentforge.formats.lora import read

    assert read(run / "lora" / "run.safetensors").metadata["ss_network_train_unet_only"] == "False"
    assert "on attention+ff + text encoder:" in (run / "report.md").read_text()
    ckpt = run / "checkpoints" / "step-4"
    weights = load_file(str(ckpt / "text_encoder.safetensors"))
    assert weights.keys() == load_file(str(ckpt / "text_encoder_ema.safetensors")).keys()
    assert weights and all(".lora_" in k for k in weights)  # the checkpoint holds the adapter only


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_diffusers_load_lora_weights_draws_the_same_image(trained, fmt, scale):
    folder, run, _ = trained
    file = run / "lora" / ("pytorch_lora_weights.safetensors" if fmt == "diffusers" else "run.safetensors")
    got = _draw(Pipeline.from_pretrained(folder, device="cpu").with_lora(file, scale))
    unet_only = Pipeline.from_pretrained(folder, device="cpu").with_lora(file, scale)
    A.remove(unet_only.text_encoder.model)
    unet_only._adaptable()  # drop the cached prompts
    assert (got - _draw(unet_only)).abs().max() > 1e-2  # the text encoder's adapter changes the image
    torch.testing.assert_close(got, _diffusers(folder, file, scale), atol=1e-3, rtol=0)


def test_merged_model_folder_draws_what_base_plus_lora_draws(trained, tmp_path):
    """--merge's model/, and `latentforge merge` with the kohya file, = base + the LoRA (UNet and text encoder)."""
    from latentforge.cli import main

    folder, run, _ = trained
    merged = _draw(Pipeline.from_pretrained(run / "model", device="cpu"))
    adapted = _draw(Pipeline.from_pretrained(folder, device="cpu").with_lora(run / "lora"))
    # merged weights vs base + adapter terms: the same function summed in another order, 4 DDIM steps at CFG 5
    same = lambda a, b: assert_same_function(a, b, Pipeline.from_pretrained(folder).unet,  # noqa: E731
                                             positions=8 * 8, evaluations=sampling_evaluations(4, 5.0))
    same(merged, adapted)
    assert (merged - _draw(Pipeline.from_pretrained(folder, device="cpu"))).abs().max() > 1e-3
    assert main(["merge", "--model", str(folder), "--lora", f"{run / 'lora' / 'run.safetensors'}:1.0",
                 "--out", str(tmp_path / "cli")]) == 0
    same(_draw(Pipeline.from_pretrained(tmp_path / "cli", device="cpu")), merged)


def test_a_fresh_text_adapter_changes_nothing(trained):
    folder, _, _ = trained
    text = TextEncoder.from_pretrained(str(folder))
    before = text.encode(CAPTIONS)[0]
    model = adapter.attach_text(config(folder), text)
    assert len(list(A.adapters(model))) == 12 and all(p.requires_grad for p in A.adapter_parameters(model))
    assert not any(p.requires_grad for k, p in model.named_parameters() if "lora_" not in k)
    assert torch.equal(text.encode(CAPTIONS)[0], before)


def test_resume_is_bitwise(trained, tmp_path):
    folder, run, ds = trained
    part = tmp_path / "part"
    shutil.copytree(run / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    text = TextEncoder.from_pretrained(str(folder))
    loop.train(config(folder, ["max_steps=4", "lora.merge=true"]), ds, part, text_encoder=text, resume=True,
               progress=False)
    for name in ("model", "ema", "text_encoder", "text_encoder_ema", "optimizer"):
        a, b = (load_file(str(d / "checkpoints" / "step-4" / f"{name}.safetensors")) for d in (part, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_text_encoder_settings_are_one_line(trained, tmp_path):
    folder, _, ds = trained
    text = TextEncoder.from_pretrained(str(folder))
    uncaptioned = InMemoryLatents(ds.latents, ds.contexts, ds.masks, null_context=ds.null_context,
                                  null_mask=ds.null_mask)
    cases = [(["lora.dora=true"], ds, text, "lora.text_encoder=true: DoRA on the text encoder is not read"),
             (["train_text_encoder=true"], ds, text, "lora.text_encoder=true: train_text_encoder=true trains the"),
             (["train_text_encoder=true", "lora.text_encoder=false"], ds, text,
              "train_text_encoder=true: with adapter=lora the lora/ files hold adapters only"),
             ([], uncaptioned, text, "lora.text_encoder=true: the cache holds no captions"),
             ([], ds, None, "lora.text_encoder=true: needs the cache's text encoder .*SDXL's two encoders")]
    for overrides, data, te, message in cases:
        with pytest.raises(UserError, match=message) as e:
            loop.train(config(folder, ["max_steps=1"] + overrides), data, tmp_path / "bad", text_encoder=te,
                       progress=False)
        assert "\n" not in str(e.value)
