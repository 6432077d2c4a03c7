"""TrainState: one optimizer step (accumulation, clip, guard, EMA), state_dict round trip, an adapter part
(only its parameters trained and saved, the base bitwise unchanged), and the VAE loop on the same
resume path (bitwise, with the discriminator; after a real SIGTERM / SIGINT to `latentforge train-vae`)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentforge.config import VAETrainConfig, load_train_config
from latentforge.errors import UserError
from latentforge.train import checkpoint
from latentforge.train.nan_guard import NanGuard
from latentforge.train.setup import make_optimizer
from latentforge.train.state import Part, TrainState, make_part
from latentforge.train.vae import train_vae

ONE = torch.tensor(1.0)  # a finite loss
CFG = load_train_config(None, ["model=tiny", "lr=1e-2", "weight_decay=0.0"])


def _state(tmp_path, module, adapter=False, clip=0.0):
    part = make_part("net", module, ema_decay=0.5, ema_warmup=False, adapter=adapter)
    return TrainState([part], make_optimizer([{"params": part.trainable()}], CFG, torch.device("cpu")),
                      NanGuard(tmp_path, 3), None, clip)


def _loss(module, x):
    return module(x).square().mean()


def test_optimizer_step_accumulates_clips_guards_and_averages(tmp_path):
    torch.manual_seed(0)
    net, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(net.state_dict())
    state = _state(tmp_path, net)
    for half in (x[:4], x[4:]):  # two micro-batches of 4 = one batch of 8
        state.backward(_loss(net, half), accum=2)
    _loss(ref, x).backward()
    expected = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert state.optimizer_step(ONE, []).item() == pytest.approx(expected, rel=1e-5)
    assert state.step == 1 and all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():  # Adam's first step: ±lr per element; EMA (decay 0.5) halfway
        torch.testing.assert_close((v - before[k]).abs(), torch.full_like(v, CFG.lr), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(state.part.ema.shadow[k], (v + before[k]) / 2)
    # a non-finite loss: no step, the EMA untouched, the batch recorded
    after = {k: v.clone() for k, v in net.state_dict().items()}
    state.backward(_loss(net, x))
    state.optimizer_step(torch.tensor(math.nan), [{"id": "a", "t": 3}])
    assert state.guard.skipped == 0  # decided on the device, accounted for when read back
    assert math.isnan(state.flush()[0])
    assert state.guard.skipped == 1 and state.step == 2 and (tmp_path / "forensics" / "step-1.json").is_file()
    for k, v in net.state_dict().items():
        assert torch.equal(v, after[k])
    # clipping: the update direction is the clipped gradient's (Adam normalises it; check the norm returned)
    clipped = _state(tmp_path, net, clip=1e-3)
    clipped.backward(_loss(net, x))
    assert clipped.optimizer_step(ONE, []).item() > 1e-3


def test_state_dict_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    sa = _state(tmp_path, a)
    for _ in range(3):
        sa.backward(_loss(a, x))
        sa.optimizer_step(ONE, [])
    with pytest.raises(RuntimeError, match="flush"):
        sa.state_dict()  # pending verdicts are never silently dropped
    sa.flush()
    tensors, meta = sa.state_dict()
    assert set(tensors) == {"model", "ema", "optimizer"} and meta["step"] == 3
    tensors = {stem: {k: v.clone() for k, v in flat.items()} for stem, flat in tensors.items()}  # as on disk
    sb = _state(tmp_path, b)
    sb.load_state_dict(tensors, meta)
    for s, m in ((sa, a), (sb, b)):
        s.backward(_loss(m, x))
        s.optimizer_step(ONE, [])
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
        assert torch.equal(sa.part.ema.shadow[k], sb.part.ema.shadow[k])


class _Adapted(torch.nn.Module):
    """A frozen base Linear plus a trainable low-rank delta (the shape of a LoRA adapter)."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(4, 3).requires_grad_(False)
        self.down, self.up = torch.nn.Parameter(torch.randn(2, 4)), torch.nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T


def test_adapter_part_trains_and_saves_only_its_parameters(tmp_path):
    torch.manual_seed(0)
    net, x = _Adapted(), torch.randn(8, 4)
    base = {k: v.clone() for k, v in net.base.state_dict().items()}
    state = _state(tmp_path, net, adapter=True)
    assert [p for g in state.optimizer.param_groups for p in g["params"]] == [net.down, net.up]
    for _ in range(2):
        state.backward(_loss(net, x))
        state.optimizer_step(ONE, [])
    for k, v in net.base.state_dict().items():
        assert torch.equal(v, base[k])  # the base is bitwise unchanged
    state.flush()
    tensors, meta = state.state_dict()
    assert set(tensors["model"]) == set(tensors["ema"]) == {"down", "up"}
    fresh = _Adapted()
    _state(tmp_path, fresh, adapter=True).load_state_dict(tensors, meta)
    assert torch.equal(fresh.down, net.down) and torch.equal(fresh.up, net.up)
    with pytest.raises(KeyError, match="adapter keys do not match"):
        Part("net", fresh, adapter=True).load_weights({"down": net.down})


def _images(folder, n=10, size=16):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


VAE_ARGS = ["model=tiny", "image_size=16", "batch_size=4", "lr=1e-3", "warmup_steps=1", "log_every=1",
            "sample_every=0", "checkpoint_every=2", "keep_checkpoints=0", "holdout=2", "discriminator=true",
            "disc_start=1", "lr_schedule=constant"]


def test_vae_resume_is_bitwise_and_refuses_an_existing_run(tmp_path):
    data = _images(tmp_path / "data")
    cfg = lambda *extra: load_train_config(None, VAE_ARGS + list(extra), cls=VAETrainConfig)  # noqa: E731
    train_vae(cfg("max_steps=4"), data, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    train_vae(cfg("max_steps=2"), data, part, progress=False)
    with pytest.raises(UserError, match="already holds checkpoints — pass --resume"):
        train_vae(cfg("max_steps=4"), data, part, progress=False)
    train_vae(cfg("max_steps=4"), data, part, resume=True, progress=False)
    for stem in ("model", "optimizer", "disc", "disc_optimizer"):
        a = load_file(str(tmp_path / "full" / "checkpoints" / "step-4" / f"{stem}.safetensors"))
        b = load_file(str(part / "checkpoints" / "step-4" / f"{stem}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stem


def _vae_checkpoint(run, step):
    return {stem: load_file(str(run / "checkpoints" / f"step-{step}" / f"{stem}.safetensors"))
            for stem in ("model", "ema", "optimizer", "disc", "disc_optimizer")
            if (run / "checkpoints" / f"step-{step}" / f"{stem}.safetensors").exists()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_vae_stopped_by_a_signal_checkpoints_and_resumes_bitwise(tmp_path, sig):
    """`latentforge train-vae` in a real subprocess gets `sig` mid-run: it finishes the step it is in, writes a
    checkpoint of exactly that step, says so and exits 0 without writing vae/. `--resume` two steps further
    ends bitwise equal (weights, optimizer, discriminator and its optimizer) to a run never stopped.
    Before: the signal killed the process at once, with no checkpoint of that step."""
    data = _images(tmp_path / "data")
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "latentforge", "train-vae", "--data", str(data), "--out", str(run), "--quiet",
            *VAE_ARGS, "max_steps=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    end = time.time() + 120
    while (checkpoint.complete_steps(run / "checkpoints") or [0])[-1] < 3 and proc.poll() is None:
        assert time.time() < end, "no checkpoint at step 3 within 120 s"
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    k = checkpoint.complete_steps(run / "checkpoints")[-1]
    assert proc.returncode == 0, stderr[-2000:]
    assert stdout.splitlines()[-1] == (f"stopped by {sig.name} at step {k}; checkpoint saved — continue with the "
                                       "same command plus --resume"), stdout
    assert k >= 3 and not (run / "vae").exists()
    cfg = lambda *extra: load_train_config(None, VAE_ARGS + list(extra), cls=VAETrainConfig)  # noqa: E731
    assert train_vae(cfg(f"max_steps={k + 2}"), data, run, resume=True, progress=False).step == k + 2
    ref = train_vae(cfg(f"max_steps={k + 2}"), data, tmp_path / "ref", progress=False)
    assert ref.step == k + 2 and not ref.stopped and (run / "vae").is_dir()
    a, b = _vae_checkpoint(run, k + 2), _vae_checkpoint(tmp_path / "ref", k + 2)
    assert a.keys() == b.keys() and {"model", "optimizer", "disc"} <= a.keys()
    for stem in a:
        assert a[stem].keys() == b[stem].keys(), stem
        for key in a[stem]:
            assert torch.equal(a[stem][key], b[stem][key]), f"{stem} {key} after {sig.name} at step {k}"
