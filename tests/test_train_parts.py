"""Training building blocks: LR schedule, EMA, checkpoints (atomic, prunable, exact), RNG, NaN guard, signals."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from latentforge.errors import UserError
from latentforge.train import checkpoint
from latentforge.train.ema import EMA
from latentforge.train.lr import lr_at
from latentforge.train.nan_guard import NanGuard, TrainingDiverged
from latentforge.train.signals import StopRequest


def test_lr_warmup_then_cosine_or_constant():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)  # (0+1)/10
    assert lr_at(4, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)  # start of the cosine
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(35, schedule="cosine", **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(4, schedule="constant", **kw) == pytest.approx(0.5)
    assert lr_at(100, schedule="constant", **kw) == 1.0


def test_ema_with_warmup_matches_closed_form():
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.5, warmup=True)
    expected = {k: v.clone().double() for k, v in start.items()}
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.1818.., 0.25, 0.3077.., 0.3571.., 0.4 (then capped at 0.5)
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v.double()
    for k, v in ema.shadow.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-6)
    assert not torch.equal(ema.shadow["weight"], model.weight)  # it lags behind
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(copy)
    assert torch.equal(copy.weight, ema.shadow["weight"])
    other = EMA(torch.nn.Linear(3, 2))
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 6 and torch.equal(other.shadow["bias"], ema.shadow["bias"])
    no_warmup = EMA(model, decay=0.9, warmup=False)
    assert no_warmup.current_decay() == 0.9


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_optimizer_state_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    _train(model, opt, 3, seed=1)
    flat, meta = checkpoint.flatten_optimizer(opt)
    path = checkpoint.save(tmp_path, 3, {"model": model.state_dict(), "optimizer": flat},
                           {"step": 3, "optimizer": meta})
    _train(model, opt, 2, seed=2)  # the uninterrupted run continues

    tensors, state = checkpoint.load(path)
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(tensors["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, foreach=True)
    checkpoint.unflatten_optimizer(opt2, tensors["optimizer"], json.loads(json.dumps(state["optimizer"])))
    _train(model2, opt2, 2, seed=2)  # the resumed run
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)


def test_rng_state_round_trip():
    state = json.loads(json.dumps(checkpoint.rng_state()))  # must survive JSON
    a = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _fake(tmp_path, step, keep=2):
    return checkpoint.save(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}}, {"step": step}, keep=keep)


def test_latest_complete_ignores_incomplete_and_prunes(tmp_path):
    assert checkpoint.latest_complete(tmp_path) is None
    for s in (2, 4, 6):
        _fake(tmp_path, s, keep=2)
    assert checkpoint.complete_steps(tmp_path) == [4, 6]  # step-2 pruned after step-6 completed
    (tmp_path / "step-8").mkdir()  # a folder without the marker (e.g. copied by hand, half done)
    (tmp_path / "step-8" / "state.json").write_text("{}")
    (tmp_path / ".tmp-step-10-123").mkdir()  # a killed writer
    assert checkpoint.latest_complete(tmp_path).name == "step-6"
    tensors, state = checkpoint.load(checkpoint.latest_complete(tmp_path))
    assert state["step"] == 6 and tensors["model"]["w"].tolist() == [6.0, 6.0]
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.load(tmp_path / "step-8")
    _fake(tmp_path, 12)
    assert not (tmp_path / ".tmp-step-10-123").exists()  # stale temp folders are cleared


_WRITER = """
import sys, torch
from latentforge.train import checkpoint
root = sys.argv[1]
big = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
for step in range(1, 10_000):
    checkpoint.save(root, step, {"model": {"w": big + step}}, {"step": step}, keep=2)
    print(step, flush=True)
"""


def test_kill_9_while_writing_leaves_a_complete_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it write a few, then kill it at an arbitrary moment
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = checkpoint.latest_complete(tmp_path)
    tensors, state = checkpoint.load(latest)
    big = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    assert state["step"] >= 3 and torch.equal(tensors["model"]["w"], big + state["step"])
    for d in tmp_path.glob("step-*"):  # every visible step-N folder is complete
        assert (d / checkpoint.MARKER).is_file()


def test_config_change_is_refused_naming_keys(tmp_path):
    old = {"lr": 1e-4, "unet.channels": [32, 64], "seed": 0}
    checkpoint.check_config({"math": old}, dict(old), tmp_path)  # same: fine
    with pytest.raises(UserError) as e:
        checkpoint.check_config({"math": old}, {**old, "lr": 3e-4, "unet.channels": [16, 32]}, tmp_path)
    msg = str(e.value)
    assert "lr (0.0001 -> 0.0003)" in msg and "unet.channels" in msg and "seed" not in msg and "\n" not in msg


def test_nan_guard_counts_writes_forensics_and_stops(tmp_path):
    guard = NanGuard(tmp_path, max_consecutive=3)
    assert guard.finite(1.0, 2.0) and not guard.finite(float("nan"), 1.0) and not guard.finite(1.0, float("inf"))
    guard.skip(5, [{"id": "a", "t": 7}], float("nan"), 1.0)
    guard.ok()
    guard.skip(7, [{"id": "b", "t": 9}], 1.0, float("inf"))
    guard.skip(8, [{"id": "c", "t": 1}], float("nan"), float("nan"))
    assert guard.skipped == 3 and guard.consecutive == 2
    record = json.loads((tmp_path / "forensics" / "step-7.json").read_text())
    assert record["samples"] == [{"id": "b", "t": 9}] and record["grad_norm"] == "inf"
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        guard.skip(9, [{"id": "d", "t": 2}], float("nan"), 1.0)


def test_stop_request_catches_sigterm_and_sigint():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal insists
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before
    with StopRequest(insist=False) as stop:  # under DDP: a repeat (torchrun's forwarded copy) keeps the first stop
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
        assert stop.requested and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_damaged_file_is_named_and_an_older_checkpoint_used(tmp_path):
    for s in (2, 4):
        _fake(tmp_path, s)
    path = tmp_path / "step-4" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # one bit inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointCorrupt, match=r"step-4/model.safetensors: checksum mismatch"):
        checkpoint.load(tmp_path / "step-4")
    warnings = []
    folder, tensors, state = checkpoint.load_newest_intact(tmp_path, warnings.append)
    assert folder.name == "step-2" and state["step"] == 2
    assert "model.safetensors" in warnings[0] and "older intact checkpoint" in warnings[1]
    (tmp_path / "step-2" / "state.json").write_text('{"step": 3}')  # every checkpoint damaged: refuse
    with pytest.raises(checkpoint.CheckpointCorrupt):
        checkpoint.load_newest_intact(tmp_path, warnings.append)


def test_disk_full_cleans_up_and_says_so(tmp_path, monkeypatch):
    import errno

    _fake(tmp_path, 2)

    def full(tensors, path):
        open(path, "wb").write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(UserError, match="no space left on the device while writing checkpoint step-4 .* step-2"):
        _fake(tmp_path, 4)
    assert checkpoint.complete_steps(tmp_path) == [2] and not list(tmp_path.glob(".tmp-*"))


def test_stop_signal_poll_steps():
    """One process asks about a stop signal after every step (a flag); under DDP, where asking is an all-reduce
    and a host read, every min(log_every, 10) steps and at the last step — the same steps on every rank."""
    from latentforge.config import TrainConfig
    from latentforge.train.loop import stop_poll_due

    cfg = TrainConfig(log_every=50, max_steps=95)
    assert all(stop_poll_due(s, cfg, False) for s in range(1, 96))
    assert [s for s in range(1, 96) if stop_poll_due(s, cfg, True)] == list(range(10, 91, 10)) + [95]
    cfg = TrainConfig(log_every=4, max_steps=10)
    assert [s for s in range(1, 11) if stop_poll_due(s, cfg, True)] == [4, 8, 10]


class _Items(list):
    """A dataset as a list of item dicts (the keys a LatentDataset item has)."""

    @property
    def ids(self):
        return [item["id"] for item in self]


def test_from_data_names_exactly_the_settings_the_data_fills_in():
    """train.setup.FROM_DATA (what `resume.check_first` leaves to `prepare`, since before the cache exists it
    cannot know them) is the set of math keys that resolve_for_data + held_out_split change: over text-,
    class-conditional and unconditional data and an SDXL-style UNet, every changed key is in it (a new derived
    key not listed would make the early check refuse a right resume), and each of its keys changes somewhere
    (a key listed but never derived would go unchecked early)."""
    from latentforge.config import load_train_config
    from latentforge.config_loading import math_dict
    from latentforge.train.setup import FROM_DATA, resolve_for_data
    from latentforge.train.validation import held_out_split

    def items(n=120, **extra):  # 120 images: val_fraction's auto gives 0.05
        return _Items({"id": f"{i:04d}", "latent": torch.zeros(3, 6, 6), "label": i % 3, **extra} for i in range(n))

    text = dict(context=torch.zeros(5, 24), pooled=torch.zeros(40), time_ids=torch.zeros(6))
    cases = [("tiny", items(**text)), ("tiny", items()), ("tiny", items(label=-1)), ("sdxl-tiny", items(**text))]
    changed = set()
    for model, data in cases:
        cfg = load_train_config(None, [f"model={model}"])
        resolved, _, _ = held_out_split(resolve_for_data(cfg, data), data)
        before, after = math_dict(cfg), math_dict(resolved)
        changed |= {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == FROM_DATA
