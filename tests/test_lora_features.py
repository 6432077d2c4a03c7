"""The training features every run has, in adapter runs (adapter=lora on a tiny random --init model): the NaN
guard skips a poisoned step (adapter, adapter EMA and base bitwise unchanged, forensics written), the held-out
loss is logged and bitwise after --resume (with lora.dropout), --resume is bitwise with every optimizer and in
bf16, gradient checkpointing and accumulation give the same adapter as the plain large batch (with dropout and
min-SNR). SIGTERM is in test_lora_train.py::test_kill_9_then_resume_is_bitwise."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentforge.models import UNet
from latentforge.train import loop
from test_lora_train import dataset, init_folder, run
from test_train_loop import assert_bitwise
from tolerance import assert_runs_match


def _files(run_dir, step, names=("model", "ema")):
    d = Path(run_dir) / "checkpoints" / f"step-{step}"
    return [load_file(str(d / f"{n}.safetensors")) for n in names]


def _rows(run_dir, key):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def _resumed(tmp_path, ref, folder, opts, at=2):
    """A copy of `ref`'s checkpoint at step `at`, resumed to the end."""
    part = tmp_path / "part"
    shutil.copytree(ref / "checkpoints" / f"step-{at}", part / "checkpoints" / f"step-{at}")
    run(part, folder, opts, resume=True)
    return part


def test_nan_guard_skips_the_step_and_leaves_adapter_ema_and_base_bitwise(tmp_path, monkeypatch):
    folder = init_folder(tmp_path)
    states = []
    real = loop.build_state
    monkeypatch.setattr(loop, "build_state", lambda *a, **k: states.append(real(*a, **k)) or states[-1])
    ds = dataset()
    ds.latents[5] = float("nan")  # one poisoned latent
    res = run(tmp_path / "run", folder, ["max_steps=4", "checkpoint_every=1", "ema_decay=0.9"], ds=ds)
    assert res.skipped == 1
    record = json.loads(next((tmp_path / "run" / "forensics").glob("step-*.json")).read_text())
    assert "000005" in [s["id"] for s in record["samples"]]
    k = record["step"]  # the skipped optimizer step: checkpoints k and k + 1 hold the same adapter and EMA
    for a, b in zip(_files(tmp_path / "run", k), _files(tmp_path / "run", k + 1)):
        assert a and all(".lora_" in key for key in a)
        assert_bitwise(a, b, f"step {k} skipped:")
    after = {key.replace(".base.", "."): v for key, v in states[0].part.module.state_dict().items()
             if "lora_" not in key and not key.endswith(".alpha")}
    base = UNet.from_pretrained(folder).state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[key], v) for key, v in base.items())


def test_validation_loss_is_logged_and_bitwise_after_resume(tmp_path):
    folder = init_folder(tmp_path)
    opts = ["max_steps=4", "val_fraction=0.25", "val_every=2", "val_timesteps=2", "ema_decay=0.9",
            "lora.dropout=0.3"]
    ref = tmp_path / "ref"
    run(ref, folder, opts)
    rows = _rows(ref, "val_loss")
    assert [r["step"] for r in rows] == [0, 2, 4] and all(r["val_images"] >= 1 for r in rows)
    assert rows[0]["val_loss"] != rows[2]["val_loss"] != rows[1]["val_loss"]  # the adapter trains
    assert rows[0]["val_loss"] == rows[0]["val_loss_ema"]  # nothing trained yet, no dropout in validation
    again = _rows(_resumed(tmp_path, ref, folder, opts), "val_loss")
    assert again[-1] == rows[-1]  # step 4: the same held-out loss, bit for bit (floats compared exactly)


@pytest.mark.parametrize("optimizer,precision", [("adamw8bit", "fp32"), ("prodigy", "fp32"), ("adafactor", "fp32"),
                                                 ("adamw", "bf16")])
def test_resume_is_bitwise_with_each_optimizer_and_in_bf16(tmp_path, optimizer, precision):
    folder = init_folder(tmp_path)
    opts = ["max_steps=4", f"optimizer={optimizer}", f"precision={precision}", "lr_schedule=constant",
            "lr=1.0" if optimizer == "prodigy" else "lr=1e-2", "lora.dropout=0.2"]
    ref = tmp_path / "ref"
    run(ref, folder, opts)
    losses = [r["loss"] for r in _rows(ref, "loss")]
    assert len(losses) == 4 and all(l == l and abs(l) < 1e3 for l in losses) and len(set(losses)) == 4
    part = _resumed(tmp_path, ref, folder, opts)
    names = ("model", "ema", "optimizer")
    for name, a, b in zip(names, _files(part, 4, names), _files(ref, 4, names)):
        assert_bitwise(a, b, f"{optimizer} {precision} {name}:")
    assert any(v.abs().max() > 0 for key, v in _files(ref, 4)[0].items() if "lora_up" in key)


def test_checkpointing_and_accumulation_give_the_large_batch_adapter(tmp_path):
    """batch 4 = 2 micro-batches of 2 = the same with gradient checkpointing (dropout masks and min-SNR
    weights are per sample, so all three see the same samples the same way)."""
    folder = init_folder(tmp_path)
    # adam_eps near the gradients' element size keeps AdamW's step Lipschitz in the gradient (tolerance.adamw_tol)
    opts = ["max_steps=2", "lr=1e-3", "adam_eps=1e-3", "lora.dropout=0.3", "min_snr_gamma=5", "caption_dropout=0"]
    variants = {"big": ["batch_size=4"], "accum": ["batch_size=2", "grad_accum=2"],
                "ckpt": ["batch_size=2", "grad_accum=2", "gradient_checkpointing=true"]}
    for name, extra in variants.items():
        run(tmp_path / name, folder, opts + extra)
    base = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for name in ("accum", "ckpt"):
        seen = assert_runs_match(tmp_path / "big", tmp_path / name, 2, ("model",), lr=1e-3, adam_eps=1e-3,
                                 positions=4 * 8 * 8, net_state=base, what=name)
        print(name, seen)
    big = _files(tmp_path / "big", 2)[0]
    plain = tmp_path / "nodrop"
    run(plain, folder, ["max_steps=2", "lr=1e-3", "adam_eps=1e-3", "min_snr_gamma=5", "caption_dropout=0",
                        "batch_size=4"])
    assert max((big[k] - v).abs().max() for k, v in _files(plain, 2)[0].items()) > 1e-3  # dropout was on
