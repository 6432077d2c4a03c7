"""The UNet loop: exact resume (mid-epoch, at an epoch boundary, after kill -9 and SIGTERM), the NaN
guard inside the loop, conditioning kinds and options. Synthetic in-memory latents.
(DDP through torchrun is tested on the real command in test_train_cli.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentforge.config import load_train_config
from latentforge.errors import UserError
from latentforge.train import checkpoint, loop
from latentforge.train.data import InMemoryLatents, Stream
from latentforge.train.nan_guard import TrainingDiverged
from tolerance import assert_runs_match

N, B = 16, 4  # 16 latents, batch 4: an epoch is 4 steps
BASE = ["model=tiny", f"batch_size={B}", "lr=1e-3", "warmup_steps=2", "log_every=1", "sample_every=0",
        "checkpoint_every=2", "keep_checkpoints=0", "caption_dropout=0.25"]


def dataset(kind="text", n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    if kind == "text":
        return InMemoryLatents(latents, torch.randn(n, 6, 32, generator=g), torch.ones(n, 6, dtype=torch.bool),
                               null_context=torch.zeros(6, 32), null_mask=torch.ones(6, dtype=torch.bool))
    if kind == "class":
        return InMemoryLatents(latents, labels=torch.arange(n) % 3)
    return InMemoryLatents(latents)


def run(out, overrides=(), ds=None, **kw):
    cfg = load_train_config(None, BASE + list(overrides))
    return loop.train(cfg, ds if ds is not None else dataset(), out, progress=False, **kw)


def weights(run_dir, step):
    d = Path(run_dir) / "checkpoints" / f"step-{step}"
    return load_file(str(d / "model.safetensors")), load_file(str(d / "ema.safetensors"))


def assert_bitwise(a, b, what=""):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} {k}: max |diff| {(a[k] - b[k]).abs().max().item():.3g}"


def test_stream_is_every_latent_once_per_epoch():
    s = Stream(dataset(), seed=3)
    for epoch in range(3):
        idx = [s.index(p) for p in range(epoch * N, (epoch + 1) * N)]
        assert sorted(idx) == list(range(N))
    assert [s.index(p) for p in range(N)] != [s.index(p) for p in range(N, 2 * N)]  # reshuffled per epoch
    # rank shares of one global batch = the single-process batch
    assert s.positions(5, 1, 2, 8, 0, 2) + s.positions(5, 1, 2, 8, 1, 2) == s.positions(5, 1, 2, 8, 0, 1)


def test_resume_mid_epoch_and_at_epoch_boundary_is_bitwise(tmp_path):
    full = tmp_path / "full"
    run(full, ["max_steps=10"])
    final = weights(full, 10)
    for k in (4, 6):  # 4: right after the epoch boundary; 6: mid-epoch
        part = tmp_path / f"from-{k}"
        part.mkdir()
        shutil.copytree(full / "checkpoints" / f"step-{k}", part / "checkpoints" / f"step-{k}")
        res = run(part, ["max_steps=10"], resume=True)
        assert res.step == 10
        for a, b in zip(weights(part, 10), final):
            assert_bitwise(a, b, f"resumed at {k}:")
        losses = [json.loads(l)["loss"] for l in (part / "metrics.jsonl").read_text().splitlines()]
        full_losses = [json.loads(l)["loss"] for l in (full / "metrics.jsonl").read_text().splitlines()]
        assert losses == full_losses[k:]
    # ... and a run that is NOT resumed from the same state differs (the comparison can fail)
    other = tmp_path / "other"
    run(other, ["max_steps=10", "seed=1"])
    assert not torch.equal(weights(other, 10)[0]["conv_in.weight"], final[0]["conv_in.weight"])


def test_resume_refuses_changed_math_and_existing_run(tmp_path):
    run(tmp_path, ["max_steps=2"])
    with pytest.raises(UserError, match=r"lr \(0.001 -> 0.0003\), max_steps \(2 -> 4\)"):
        run(tmp_path, ["max_steps=4", "lr=3e-4"], resume=True)  # with a cosine LR, max_steps is math
    with pytest.raises(UserError, match="already holds checkpoints — pass --resume"):
        run(tmp_path, ["max_steps=2"])
    const = tmp_path / "const"
    run(const, ["max_steps=2", "lr_schedule=constant"])
    # a constant-LR run may be extended, and bookkeeping keys may change
    assert run(const, ["max_steps=4", "lr_schedule=constant", "log_every=2"], resume=True).step == 4


def test_nan_guard_in_the_loop(tmp_path):
    ds = dataset()
    ds.latents[5] = float("nan")  # one poisoned latent
    res = run(tmp_path, ["max_steps=4", "checkpoint_every=1"], ds=ds)
    assert res.skipped == 1
    record = json.loads(next((tmp_path / "forensics").glob("step-*.json")).read_text())
    assert "000005" in [s["id"] for s in record["samples"]] and len(record["samples"]) == B
    step = record["step"]  # 0-based index of the skipped optimizer step -> checkpoints step and step+1
    before, after = weights(tmp_path, step), weights(tmp_path, step + 1)
    for a, b in zip(before, after):
        assert_bitwise(a, b)  # weights and EMA untouched by the skipped step
    for t in weights(tmp_path, 4)[0].values():
        assert torch.isfinite(t).all()
    ds.latents[:] = float("nan")
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        run(tmp_path / "diverged", ["max_steps=10", "nan_max_consecutive=3"], ds=ds)
    assert len(list((tmp_path / "diverged" / "forensics").glob("*.json"))) == 3


@pytest.mark.parametrize("kind, extra", [
    ("class", ["precision=bf16", "gradient_checkpointing=true"]),
    ("none", ["schedule.prediction_type=v_prediction", "min_snr_gamma=5.0", "offset_noise=0.1",
              "timestep_sampling=logit_normal", "grad_accum=2", "lr_schedule=constant"]),
    ("text", ["schedule.prediction_type=sample", "grad_clip=0.0"]),
])
def test_conditioning_kinds_and_options_train(tmp_path, kind, extra):
    res = run(tmp_path, ["max_steps=6", "lr=3e-3"] + extra, ds=dataset(kind))
    cfg = load_train_config(tmp_path / "config.toml")
    assert cfg.conditioning == kind and res.skipped == 0
    assert (cfg.unet.num_class_embeds == 4) == (kind == "class")  # 3 classes + the null class
    assert (cfg.unet.cross_attention_dim == 32) == (kind == "text")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(l == l for l in losses)


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train_loop import run, dataset
res = run(sys.argv[1], sys.argv[3:], resume=sys.argv[2] == "resume")
print("done", res.step, res.stopped, flush=True)
"""


def _script(tmp_path):
    path = tmp_path / "train_script.py"
    path.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return path


def _wait_for(cond, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_killed_process_resumes_bitwise(tmp_path):
    """A real kill -9, a SIGTERM and a SIGINT (checkpoint at the next step boundary, exit 0), then --resume."""
    script = _script(tmp_path)
    opts = ["lr_schedule=constant", "checkpoint_every=2", "keep_checkpoints=2"]
    ref = tmp_path / "ref"
    run(ref, opts + ["max_steps=14"])
    for how, sig in (("kill-9", signal.SIGKILL), ("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        out = tmp_path / how
        proc = subprocess.Popen([sys.executable, str(script), str(out), "fresh", *opts, "max_steps=100000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _wait_for(lambda: (checkpoint.complete_steps(out / "checkpoints") or [0])[-1] >= 4)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        k = checkpoint.complete_steps(out / "checkpoints")[-1]
        if how == "kill-9":
            assert proc.returncode == -signal.SIGKILL
        else:  # honoured at the next step boundary, with a checkpoint of exactly that step
            assert proc.returncode == 0, stderr
            assert stdout.split() == ["done", str(k), sig.name]
        assert 4 <= k < 14, k
        assert run(out, opts + ["max_steps=14"], resume=True).step == 14  # resumed here, in-process
        for a, b in zip(weights(out, 14), weights(ref, 14)):
            assert_bitwise(a, b, f"{how} at step {k}:")


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 2 read the same stream positions and average to the same gradient as 1 batch of 4."""
    opts = ["max_steps=4", "lr=1e-4", "adam_eps=1e-3"]  # adam_eps: AdamW's step Lipschitz in g (tolerance.py)
    run(tmp_path / "accum", opts + ["batch_size=2", "grad_accum=2"])
    run(tmp_path / "big", opts + ["batch_size=4"])
    print(assert_runs_match(tmp_path / "big", tmp_path / "accum", 4, lr=1e-4, adam_eps=1e-3, positions=4 * 8 * 8,
                            what="2 micro-batches vs 1 batch"))


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(UserError, match="precision=fp16: needs a CUDA device"):
        run(tmp_path, ["max_steps=1", "precision=fp16", "device=cpu"])
