"""precision=bf16 on CPU: a bf16 compute copy of the UNet, fp32 master weights and optimizer state
(train/precision.py). The loss falls like fp32's, and resume is bitwise."""

import json
import shutil

import torch
from safetensors.torch import load_file
from test_train_loop import assert_bitwise, dataset, run, weights

from latentforge.models import UNet
from latentforge.config import PRESETS
from latentforge.train.precision import LowPrecisionCompute

STEPS = ["max_steps=12", "lr=3e-3", "lr_schedule=constant", "warmup_steps=0", "checkpoint_every=6",
         "caption_dropout=0.0"]


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_cpu_trains_with_fp32_masters_and_resumes_bitwise(tmp_path):
    ds = dataset("none", n=8)
    run(tmp_path / "fp32", STEPS, ds=ds)
    run(tmp_path / "bf16", STEPS + ["precision=bf16"], ds=ds)
    l32, l16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    print("fp32 losses", [round(x, 4) for x in l32], "\nbf16 losses", [round(x, 4) for x in l16])
    assert sum(l16[-3:]) < 0.8 * sum(l16[:3])  # it learns
    assert abs(l16[-1] - l32[-1]) <= 0.1 * l32[-1]  # like fp32 does
    model, ema = weights(tmp_path / "bf16", 12)
    opt = load_file(str(tmp_path / "bf16" / "checkpoints" / "step-12" / "optimizer.safetensors"))
    for what, tensors in (("weights", model), ("EMA", ema), ("AdamW state", opt)):  # fp32 masters and moments
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float32}, what
    assert len(opt) > len(model)
    a, b = weights(tmp_path / "fp32", 12)[0], model
    assert not torch.equal(a["conv_in.weight"], b["conv_in.weight"])  # bf16 compute is not the fp32 run
    part = tmp_path / "resumed"
    part.mkdir()
    shutil.copytree(tmp_path / "bf16" / "checkpoints" / "step-6", part / "checkpoints" / "step-6")
    assert run(part, STEPS + ["precision=bf16"], ds=ds, resume=True).step == 12
    for x, y in zip(weights(part, 12), weights(tmp_path / "bf16", 12)):
        assert_bitwise(x, y, "bf16 resumed at 6:")
    assert losses(part) == l16[6:]


def test_compute_copy_rounds_the_masters_and_hands_fp32_grads_back():
    torch.manual_seed(0)
    master = UNet(PRESETS["tiny"].unet)
    lowp = LowPrecisionCompute(master)
    assert all(p.dtype == torch.bfloat16 for p in lowp.compute.parameters())
    for m, c in zip(master.parameters(), lowp.compute.parameters()):
        assert torch.equal(c, m.detach().to(torch.bfloat16))
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([3, 500])
    ctx = torch.randn(2, 6, master.config.cross_attention_dim, dtype=torch.bfloat16)
    lowp.compute(x, t, ctx).float().square().mean().backward()
    lowp.grads_to_master()
    grads = [p.grad for p in master.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(p.grad is None for p in lowp.compute.parameters())
    with torch.no_grad():
        for p in master.parameters():
            p.add_(1e-2)
    lowp.weights_to_compute()
    for m, c in zip(master.parameters(), lowp.compute.parameters()):
        assert torch.equal(c, m.detach().to(torch.bfloat16))


def test_bf16_uses_the_compute_copy_on_every_device_and_bf16_autocast_does_not(tmp_path, monkeypatch):
    """precision=bf16 builds the compute copy whatever the device (the loop no longer asks which: CUDA trains as
    the CPU does); precision=bf16-autocast trains the fp32 module under torch.autocast, with no copy, and its
    first loss is the autocast step's on the same batch and draws."""
    from latentforge.train import loop
    from latentforge.train.step import train_step

    built = []
    monkeypatch.setattr(loop, "LowPrecisionCompute", lambda m, dtype: built.append(dtype) or LowPrecisionCompute(m, dtype))
    ds = dataset("none", n=8)
    run(tmp_path / "fp32", ["max_steps=1"], ds=ds)
    assert built == []  # fp32: none
    run(tmp_path / "copy", ["max_steps=1", "precision=bf16"], ds=ds)
    assert built == [torch.bfloat16]
    calls = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **kw: calls.append(kw.get("compute_dtype")) or real(*a, **kw))
    run(tmp_path / "autocast", ["max_steps=1", "precision=bf16-autocast"], ds=ds)
    assert built == [torch.bfloat16] and calls == [None]  # no compute copy, fp32 weights
    assert losses(tmp_path / "autocast")[0] != losses(tmp_path / "fp32")[0]  # it did compute in bf16
    assert train_step is real
