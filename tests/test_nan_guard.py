"""The on-device NaN guard: a non-finite step is skipped by a masked AdamW + EMA update decided on the
device; the host reads the verdicts only at log steps and then writes the same forensics as before.

A host read of a tensor value (`.item()`, `bool(t)`, `float(t)`) is `aten._local_scalar_dense` — on a
GPU that is the per-step synchronisation this guard removes, so counting it on CPU catches its return.
"""

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from latentforge.config import load_train_config
from latentforge.train import loop
from latentforge.train.data import InMemoryLatents, Stream
from latentforge.train.ema import EMA
from latentforge.train.nan_guard import NanGuard, TrainingDiverged, finite_on_device, masked_step
from latentforge.train.report import RunLog


class HostReads(TorchDispatchMode):
    """Counts scalar reads of tensor values by the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    return model, opt, EMA(model, decay=0.9)


def _step(model, opt, ema, x, reads=None):
    loss = model(x).square().mean()
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ok = finite_on_device(loss.detach(), gnorm)
    masked_step(opt, ok)
    ema.update(model, ok)
    opt.zero_grad(set_to_none=True)
    return ok, loss, gnorm


def _snapshot(model, opt, ema):
    state = {f"w.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        state.update({f"opt.{i}.{k}": v.clone() for k, v in opt.state[p].items()})
    state.update({f"ema.{k}": v.clone() for k, v in ema.shadow.items()})
    state["ema.n"] = ema._n.clone()
    return state


def test_nan_step_is_masked_on_device_bitwise():
    g = torch.Generator().manual_seed(1)
    good = [torch.randn(5, 4, generator=g) for _ in range(3)]
    bad = good[1].clone()
    bad[2, 1] = float("nan")
    ref = _setup()
    for x in good:
        _step(*ref, x)
    model, opt, ema = _setup()
    _step(model, opt, ema, good[0])
    before = _snapshot(model, opt, ema)
    with HostReads() as reads:
        ok, loss, gnorm = _step(model, opt, ema, bad)
    assert reads.count == 0  # decided on the device: no host read of loss, norm or verdict
    after = _snapshot(model, opt, ema)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed by the skipped step"
    assert not ok and not torch.isfinite(loss) and ema.num_updates == 1
    for x in good[1:]:  # the skip was a no-op: the run continues exactly like one that never saw it
        _step(model, opt, ema, x)
    for k, v in _snapshot(*ref).items():
        assert torch.equal(v, _snapshot(model, opt, ema)[k]), k
    assert ema.num_updates == 3


def test_flush_writes_exact_forensics_and_stops_in_order(tmp_path):
    guard = NanGuard(tmp_path, max_consecutive=3)
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    verdicts = [(1.5, 0.5), (float("nan"), 2.0), (0.25, float("inf")), (0.75, 1.0), (float("nan"), 1.0)]
    for step, (loss, gnorm) in enumerate(verdicts):
        guard.record(step, finite_on_device(t(loss), t(gnorm)), t(loss), t(gnorm), [{"id": f"s{step}", "t": step}])
    last_loss, last_gnorm = guard.flush()
    assert math.isnan(last_loss) and last_gnorm == 1.0
    assert guard.skipped == 3 and guard.consecutive == 1 and not guard.pending
    rec = json.loads((tmp_path / "forensics" / "step-2.json").read_text())
    assert rec == {"step": 2, "loss": "0.25", "grad_norm": "inf", "samples": [{"id": "s2", "t": 2}]}
    assert sorted(p.name for p in (tmp_path / "forensics").iterdir()) == ["step-1.json", "step-2.json", "step-4.json"]
    for step in range(5, 9):  # 4 more non-finite steps pending: the stop comes at the 3rd in a row (step 6), as before
        guard.record(step, torch.tensor(False), t(float("nan")), t(1.0), [{"id": f"s{step}", "t": 0}])
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row \\(last at step 6"):
        guard.flush()
    assert (tmp_path / "forensics" / "step-6.json").exists() and not (tmp_path / "forensics" / "step-7.json").exists()


def test_loop_reads_the_device_only_at_log_steps(tmp_path, monkeypatch):
    """8 steps, log every 4, a NaN latent in step 5: no host read in steps 5-8, the step is still
    skipped with its exact forensics, and the logged loss is the one of the last step."""
    B = 4
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(32, 4, 8, 8, generator=g)  # one epoch = 8 steps: the NaN is seen once
    ds = InMemoryLatents(latents, torch.randn(32, 6, 32, generator=g), torch.ones(32, 6, dtype=torch.bool),
                         null_context=torch.zeros(6, 32), null_mask=torch.ones(6, dtype=torch.bool))
    stream = Stream(ds, seed=0)
    poisoned = stream.index(stream.positions(5, 0, 1, B, 0, 1)[2])  # 3rd sample of step index 5
    ds.latents[poisoned] = float("nan")
    cfg = load_train_config(None, ["model=tiny", f"batch_size={B}", "max_steps=8", "log_every=4", "sample_every=0",
                                   "checkpoint_every=100", "keep_checkpoints=0", "caption_dropout=0.25", "seed=0"])
    reads, at_log = HostReads(), []
    real_log = RunLog.log
    monkeypatch.setattr(RunLog, "log", lambda self, row: (at_log.append(reads.count), real_log(self, row)))
    with reads:
        res = loop.train(cfg, ds, tmp_path, progress=False)
    assert res.skipped == 1 and len(at_log) == 2
    assert at_log[1] - at_log[0] == 0, "host reads between two log steps (a per-step sync)"
    rec = json.loads((tmp_path / "forensics" / "step-5.json").read_text())
    assert [s["id"] for s in rec["samples"]][2] == f"{poisoned:06d}" and len(rec["samples"]) == B
    assert rec["loss"] == "nan"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1] and all(r["loss"] == r["loss"] for r in rows)
