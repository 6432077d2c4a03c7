"""Held-out validation parts: the split is a function of (seed, image id) only, the fixed timesteps and noise,
and the validation loss against a closed form."""

import math

import pytest
import torch

from latentforge.schedule import NoiseSchedule
from latentforge.config import ScheduleConfig
from latentforge.train.data import InMemoryLatents
from latentforge.train.validation import (fixed_noise, fixed_timesteps, held_out_ids, resolve_fraction, split,
                                          validation_loss)

IDS = [f"img/{i:04d}.png" for i in range(400)]


def test_split_depends_on_seed_and_id_only():
    held = set(held_out_ids(IDS, 0.1, seed=7))
    assert 20 <= len(held) <= 60  # ~ 40 of 400
    shuffled = list(reversed(IDS[::3]))  # another order, a third of the images
    assert set(held_out_ids(shuffled, 0.1, seed=7)) == held & set(shuffled)
    assert set(held_out_ids(IDS, 0.1, seed=8)) != held  # another seed, another split
    assert held_out_ids(IDS, 0.0, seed=7) == [] and held_out_ids(IDS, 1.0, seed=7) == IDS
    twins = [i + "#flip" for i in IDS]  # a cached mirror goes with its image
    assert {i.removesuffix("#flip") for i in held_out_ids(twins, 0.1, seed=7)} == held


def test_auto_fraction_counts_images_not_mirrors():
    assert resolve_fraction(-1.0, IDS[:99] + [i + "#flip" for i in IDS[:99]]) == 0.0
    assert resolve_fraction(-1.0, IDS[:100]) == 0.05
    assert resolve_fraction(0.2, IDS[:3]) == 0.2


def test_split_of_a_dataset_keeps_its_attributes():
    ds = InMemoryLatents(torch.randn(40, 4, 2, 2), ids=IDS[:40], null_context=torch.zeros(3, 8))
    train, val = split(ds, 0.3, seed=1)
    assert sorted(train.indices + val.indices) == list(range(40)) and not set(train.indices) & set(val.indices)
    assert [val[j]["id"] for j in range(len(val))] == held_out_ids(IDS[:40], 0.3, seed=1)
    assert train.null_context is ds.null_context


def test_fixed_timesteps_and_noise():
    assert fixed_timesteps(1000, 4).tolist() == [125, 375, 625, 875]
    assert fixed_timesteps(10, 1).tolist() == [5]
    a, b = fixed_noise(0, "x.png", 1, (4, 2, 2)), fixed_noise(0, "x.png", 1, (4, 2, 2))
    assert torch.equal(a, b) and not torch.equal(a, fixed_noise(0, "x.png", 2, (4, 2, 2)))


class Zero(torch.nn.Module):
    """Predicts 0 whatever the input: the ε-loss is then mean ε², the x0-loss mean x0²."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context=None, class_labels=None):
        return x * self.w


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_validation_loss_closed_form(prediction_type):
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod
    ds = InMemoryLatents(torch.randn(5, 4, 3, 3), ids=IDS[:5])
    want = []
    for i in range(5):
        for k in range(3):
            ref = fixed_noise(0, IDS[i], k, (4, 3, 3)) if prediction_type == "epsilon" else ds[i]["latent"]
            want.append(ref.square().mean().item())
    got = [validation_loss(Zero(), ds, ac, prediction_type, 0, 3, batch_size=bs) for bs in (1, 4, 100)]
    assert got[0] == pytest.approx(sum(want) / len(want), rel=1e-6)
    assert got[0] == got[1] == got[2]  # the batch size does not change the number
    assert math.isnan(validation_loss(Zero(), InMemoryLatents(torch.randn(0, 4, 3, 3)), ac, "epsilon", 0, 3))


def test_report_names_the_step_of_lowest_validation_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from latentforge.train.report import RunLog, write_report

    log = RunLog(tmp_path)
    for step, loss in enumerate([0.9, 0.8, 0.7, 0.6], start=1):
        log.log({"step": step, "loss": loss})
    for step, val, ema in [(0, 0.95, 0.95), (2, 0.5, 0.7), (4, 0.55, 0.6)]:
        log.log({"step": step, "val_loss": val, "val_loss_ema": ema, "val_images": 3})
    log.close()
    report = write_report(tmp_path, "UNet training", {}).read_text()
    assert "| validation loss (training weights), lowest | 0.5 at step 2 |" in report
    assert "| validation loss (EMA weights), lowest | 0.6 at step 4 |" in report
    assert "| validation loss (training weights), last | 0.55 at step 4 |" in report
    assert (tmp_path / "loss.png").stat().st_size > 0
    events = EventAccumulator(str(tmp_path / "logs")).Reload()
    assert {"val/loss", "val/loss_ema", "train/loss"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([0.95, 0.5, 0.55])
