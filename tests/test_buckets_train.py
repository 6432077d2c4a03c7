"""The bucketed path end to end on non-square shapes (48x32, 32x48 and 32x32 canvases): `train --data
... buckets=true` builds a bucketed cache and trains (every batch stacks one shape, or it could not run),
`--resume` is bitwise, 2 DDP processes (torchrun, gloo) equal 1 within 1e-5, leftovers=drop is reported,
and the model samples at its buckets' sizes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentforge.cli import main
from latentforge.config import preset
from latentforge.data.cache import LatentDataset
from latentforge.models import AutoencoderKL
from tolerance import assert_runs_match

pytestmark = pytest.mark.slow  # one torchrun pair (~30 s on one core)

# adam_eps=1e-3 keeps AdamW's step Lipschitz in the gradient, so DDP vs one process has a derived bound (tolerance.py)
TRAIN = ["model=tiny", "batch_size=4", "lr=1e-4", "adam_eps=1e-3", "warmup_steps=2", "log_every=1", "sample_every=0",
         "max_steps=6", "checkpoint_every=3", "keep_checkpoints=0"]
BUCKETS = ["buckets=true", "bucket_step=16", "image_size=40"]  # area 40x40: buckets 32x48, 32x32, 48x32, ...


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets_train")
    assert main(["shapes", "--out", str(root / "data"), "--n", "30", "--canvas", "48x32,32x48,32x32"]) == 0
    for txt in (root / "data").glob("*.txt"):  # unconditional: no text encoder to load
        txt.unlink()
    torch.manual_seed(0)
    AutoencoderKL(preset("tiny").vae).save_pretrained(str(root / "vae"))
    one = root / "one"
    assert main(["train", "--data", str(root / "data"), "--vae", str(root / "vae"),
                 "--out", str(one), "--quiet", *TRAIN, *BUCKETS]) == 0
    return {"root": root, "vae": root / "vae", "one": one, "cache": one / "cache"}


def weights(run, step):
    d = Path(run) / "checkpoints" / f"step-{step}"
    return [load_file(str(d / f"{n}.safetensors")) for n in ("model", "ema")]


def losses(run):
    return [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_train_data_with_buckets_builds_a_bucketed_cache_and_trains(world):
    ds = LatentDataset(str(world["cache"]))
    assert sorted(set(ds.buckets)) == ["32x32", "32x48", "48x32"] and len(ds) == 30
    assert ds.bucket_shapes == {"32x32": (4, 8, 8), "32x48": (4, 12, 8), "48x32": (4, 8, 12)}
    assert all(e["original_size"] == e["target_size"] for e in ds.entries)  # canvases = buckets: no resize
    report = (world["one"] / "report.md").read_text()
    assert "3 buckets (32x32: 10, 32x48: 10, 48x32: 10); leftovers carry" in report
    assert len(losses(world["one"])) == 6
    cfg = json.loads((world["one"] / "model" / "unet" / "config.json").read_text())
    assert cfg["sample_size"] == 8  # the square bucket (32 px) is the model's default size
    out = world["root"] / "samples"
    assert main(["sample", "--model", str(world["one"] / "model"), "--width", "48", "--height", "32", "--steps", "2",
                 "--cfg", "1", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out / "00000-0.png").size == (48, 32)


def test_resume_is_bitwise_and_two_ddp_processes_equal_one(world, tmp_path):
    opts = ["--cache", str(world["cache"]), "--vae", str(world["vae"]), "--quiet", *TRAIN]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(world["one"] / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    assert main(["train", "--out", str(resumed), *opts, "--resume"]) == 0
    for a, b in zip(weights(world["one"], 6), weights(resumed, 6)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(resumed) == losses(world["one"])[3:]

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "latentforge",
           "train", "--out", str(two), *opts]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    print(assert_runs_match(world["one"], two, 6, lr=1e-4, adam_eps=1e-3, positions=4 * 12 * 8, what="DDP buckets"))


def test_leftovers_drop_is_reported_and_held_out_validation_runs_per_bucket(world, tmp_path):
    run = tmp_path / "drop"
    assert main(["train", "--cache", str(world["cache"]), "--vae", str(world["vae"]),
                 "--out", str(run), "--quiet", *TRAIN, "max_steps=2", "bucket_leftovers=drop"]) == 0
    assert "leftovers drop, 6 images dropped per epoch" in (run / "report.md").read_text()  # 3 buckets x 10 mod 4
    val = tmp_path / "val"  # a held-out split of a bucketed cache: validation batches of one shape each
    assert main(["train", "--cache", str(world["cache"]), "--vae", str(world["vae"]), "--out", str(val), "--quiet",
                 *TRAIN, "max_steps=2", "val_fraction=0.3", "val_every=1"]) == 0
    vals = [json.loads(line)["val_loss"] for line in (val / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert vals and all(v == v and v > 0 for v in vals)  # finite, measured
