"""train/optimizers.py: every optimizer lowers a loss, and its state survives checkpoint.flatten_optimizer +
JSON (what a checkpoint holds) so that a resumed run continues bitwise; a missing package is one line."""

import copy
import json
import sys

import pytest
import torch

from latentforge.config import TrainConfig, replace
from latentforge.errors import UserError
from latentforge.train.checkpoint import flatten_optimizer, unflatten_optimizer
from latentforge.train.optimizers import OPTIMIZERS, make_optimizer

LR = {"adamw": 1e-2, "adamw8bit": 1e-2, "prodigy": 1.0, "adafactor": 1e-2}


def _model():
    torch.manual_seed(0)  # 80x80 = 6400 elements: bitsandbytes keeps 8-bit moments from 4096 up
    return torch.nn.Sequential(torch.nn.Linear(16, 80), torch.nn.Tanh(), torch.nn.Linear(80, 80))


def _steps(model, opt, n, start):
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 80, generator=g) * 0.1
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_resumes_bitwise_through_a_checkpoint(name):
    cfg = replace(TrainConfig(), optimizer=name, lr=LR[name], weight_decay=0.01)
    cpu = torch.device("cpu")
    a = _model()
    opt_a = make_optimizer(a, cfg, cpu)
    first = _steps(a, opt_a, 3, 0)
    b = copy.deepcopy(a)
    tensors, meta = flatten_optimizer(opt_a)
    meta = json.loads(json.dumps(meta))  # what state.json holds
    opt_b = make_optimizer(b, cfg, cpu)
    unflatten_optimizer(opt_b, {k: v.clone() for k, v in tensors.items()}, meta)
    last = _steps(a, opt_a, 12, 3)
    _steps(b, opt_b, 12, 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert last < first  # it optimises


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^optimizer=prodigy: needs the prodigyopt package — pip install"):
        make_optimizer(_model(), replace(TrainConfig(), optimizer="prodigy"), torch.device("cpu"))
