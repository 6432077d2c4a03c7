"""Held-out validation inside the training loop: the held-out images never reach a training batch (ids
recorded at the model's input), the loss is the same after a resume (bitwise), and it is logged, plotted and
summarised; unet.freeze and train_text_encoder in the loop."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentforge.config import load_train_config
from latentforge.train import loop
from latentforge.train.data import InMemoryLatents
from latentforge.train.validation import held_out_ids
from tolerance import assert_runs_match

N, B = 24, 4
BASE = ["model=tiny", f"batch_size={B}", "lr=1e-3", "warmup_steps=0", "log_every=1", "sample_every=0",
        "checkpoint_every=2", "keep_checkpoints=0", "caption_dropout=0.25", "val_fraction=0.25", "val_every=2",
        "val_timesteps=3", "ema_decay=0.9"]


def dataset(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return InMemoryLatents(torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 6, 32, generator=g),
                           torch.ones(n, 6, dtype=torch.bool), ids=[f"{i:03d}.png" for i in range(n)],
                           null_context=torch.zeros(6, 32), null_mask=torch.ones(6, dtype=torch.bool))


def run(out, overrides=(), ds=None, **kw):
    cfg = load_train_config(None, BASE + list(overrides))
    return loop.train(cfg, ds if ds is not None else dataset(), out, progress=False, **kw)


def val_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


def test_held_out_ids_never_reach_a_training_batch(tmp_path, monkeypatch):
    seen = []
    real = loop.train_step

    def spy(model, batch, *args, **kw):  # what the model is trained on
        seen.extend(batch.ids)
        return real(model, batch, *args, **kw)

    monkeypatch.setattr(loop, "train_step", spy)
    ds = dataset()
    run(tmp_path, ["max_steps=12"], ds)  # 48 samples: every training image at least twice
    held = set(held_out_ids(ds.ids, 0.25, seed=0))
    assert 2 <= len(held) <= 12
    assert not held & set(seen)
    assert set(seen) == set(ds.ids) - held  # everything else is trained on
    rows = val_rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10, 12]
    assert all(r["val_images"] == len(held) for r in rows)
    report = (tmp_path / "report.md").read_text()
    best = min(rows, key=lambda r: r["val_loss"])
    assert f"{best['val_loss']:.5g} at step {best['step']}" in report
    assert "validation loss (EMA weights), lowest" in report
    assert load_train_config(tmp_path / "config.toml").val_fraction == 0.25


def test_validation_loss_is_bitwise_the_same_after_resume(tmp_path):
    full = tmp_path / "full"
    run(full, ["max_steps=6"])
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    run(part, ["max_steps=6"], resume=True)
    ours = [(r["step"], r["val_loss"], r["val_loss_ema"]) for r in val_rows(part)]
    theirs = [(r["step"], r["val_loss"], r["val_loss_ema"]) for r in val_rows(full) if r["step"] > 2]
    assert ours == theirs and len(ours) == 2  # steps 4 and 6, bit for bit
    assert val_rows(full)[0]["val_loss"] != val_rows(full)[-1]["val_loss"]  # it does change with training


def test_auto_fraction_and_off(tmp_path):
    run(tmp_path / "small", ["max_steps=2", "val_fraction=-1"])  # 24 images < 100: no held-out split
    assert val_rows(tmp_path / "small") == []
    assert load_train_config(tmp_path / "small" / "config.toml").val_fraction == 0.0


def test_freeze_in_the_loop_keeps_frozen_weights_bitwise(tmp_path):
    from latentforge.models import UNet
    from latentforge.train.step import mix

    run(tmp_path, ["max_steps=2", "val_fraction=0", 'unet.freeze=["*", "!*attn2*"]'])
    trained = load_file(str(tmp_path / "checkpoints" / "step-2" / "model.safetensors"))
    cfg = load_train_config(tmp_path / "config.toml")
    torch.manual_seed(mix(cfg.seed, "init"))  # the loop's initial weights
    init = UNet(cfg.unet).state_dict()
    changed = {k for k in init if not torch.equal(init[k], trained[k])}
    assert changed == {k for k in init if "attn2" in k}  # only the cross-attention layers trained


def _tiny_clip(folder: Path):
    """A tiny random CLIP text model + a letter-level BPE tokenizer (nothing downloaded)."""
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latentforge.text import TextEncoder

    folder.mkdir(parents=True)
    vocab = ["<unk>", "<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + \
        [c + "</w>" for c in string.ascii_lowercase]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<unk>", pad_token="<|endoftext|>",
                  model_max_length=16).save_pretrained(folder)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=2)).save_pretrained(folder)
    return TextEncoder.from_pretrained(str(folder))


def test_train_text_encoder(tmp_path):
    """The first loss equals the cached-context one, the text model trains, resumes bitwise, is exported."""
    from latentforge.config import PRESETS
    from latentforge.models import AutoencoderKL

    words = ["red", "blue", "green", "box", "disc", "star"]
    captions = [f"{words[i % 3]} {words[3 + i % 4 % 3]}" for i in range(16)]
    text = _tiny_clip(tmp_path / "clip")
    original = {k: v.clone() for k, v in text.model.state_dict().items()}
    context, mask = text.encode(captions)
    null_context, null_mask = text.encode([""])
    ds = InMemoryLatents(torch.randn(16, 4, 8, 8), context, mask, ids=[f"{i}.png" for i in range(16)],
                         null_context=null_context[0], null_mask=null_mask[0], captions=captions)
    vae = AutoencoderKL(PRESETS["tiny"].vae)
    args = ["val_fraction=0", "max_steps=4", "caption_dropout=0.25"]
    run(tmp_path / "frozen", args, ds, text_encoder=text)
    full = tmp_path / "full"
    run(full, args + ["train_text_encoder=true"], ds, text_encoder=_tiny_clip(tmp_path / "clip2"), vae=vae)
    losses = [[json.loads(l)["loss"] for l in (p / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
              for p in (tmp_path / "frozen", full)]
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-6)  # same weights at step 0: same loss
    assert losses[0][1:] != losses[1][1:]  # then the text model has moved
    trained = load_file(str(full / "checkpoints" / "step-4" / "text_encoder.safetensors"))
    assert any(not torch.equal(trained[k], original[k]) for k in trained)
    exported = load_file(str(full / "model" / "text_encoder" / "model.safetensors"))
    for k, v in trained.items():  # model/ carries the trained text encoder
        assert torch.equal(exported.get(k, exported.get(k.removeprefix("text_model."))), v), k
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    run(part, args + ["train_text_encoder=true"], ds, text_encoder=_tiny_clip(tmp_path / "clip3"), resume=True)
    again = load_file(str(part / "checkpoints" / "step-4" / "text_encoder.safetensors"))
    assert all(torch.equal(again[k], trained[k]) for k in trained)


def _captioned(text):
    """16 captioned latents (fixed seed), their contexts from `text` (what a cache of them would hold)."""
    words = ["red", "blue", "green", "box", "disc", "star"]
    captions = [f"{words[i % 3]} {words[3 + i % 4 % 3]}" for i in range(16)]
    context, mask = text.encode(captions)
    null_context, null_mask = text.encode([""])
    return InMemoryLatents(torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(3)), context, mask,
                           ids=[f"{i}.png" for i in range(16)], null_context=null_context[0], null_mask=null_mask[0],
                           captions=captions)


TEXT_DDP = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train_validation import _captioned, run
from latentforge.text import TextEncoder
text = TextEncoder.from_pretrained(sys.argv[2])
print("done", run(sys.argv[1], sys.argv[3:], _captioned(text), text_encoder=text).step, flush=True)
"""


@pytest.mark.slow  # a torchrun pair (~25 s on one core)
def test_train_text_encoder_two_processes_equal_one(tmp_path):
    """train_text_encoder=true under torchrun (2 gloo processes, 2 images each) = 1 process (4 images), within the bound tests/tolerance.py derives:
    the losses, the UNet and the text model after 3 steps."""
    import os
    import subprocess
    import sys

    from latentforge.text import TextEncoder

    clip = tmp_path / "clip"
    _tiny_clip(clip)
    opts = ["val_fraction=0", "max_steps=3", "checkpoint_every=3", "caption_dropout=0.25", "lr=1e-4",
            "adam_eps=1e-3", "train_text_encoder=true"]  # adam_eps: AdamW's step Lipschitz in g (tolerance.py)
    one, two = tmp_path / "one", tmp_path / "two"
    text = TextEncoder.from_pretrained(str(clip))
    run(one, opts, _captioned(text), text_encoder=text)
    script = tmp_path / "text_ddp.py"
    script.write_text(TEXT_DDP.format(tests=str(Path(__file__).parent)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(two), str(clip), *opts]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    print(assert_runs_match(one, two, 3, ("model", "text_encoder"), lr=1e-4, adam_eps=1e-3, positions=4 * 8 * 8,
                            what="2 processes vs 1"))
    start = TextEncoder.from_pretrained(str(clip)).model.state_dict()
    trained = load_file(str(two / "checkpoints" / "step-3" / "text_encoder.safetensors"))
    moved = sum(not torch.equal(trained[k], start[k]) for k in trained if k in start)
    assert moved > 0  # the text model did train in both
