"""A `train --resume` that is refused changes nothing on disk: every refusal it can give, through the CLI, leaves
every file of the run folder (config.toml, checkpoints, logs, its cache, the lock file) byte for byte as it was,
and adds none."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from latentforge.cli import main
from latentforge.config import preset
from latentforge.models import AutoencoderKL

TRAIN = ["model=tiny", "batch_size=4", "lr=1e-3", "max_steps=2", "checkpoint_every=2", "sample_every=0",
         "val_fraction=0", "log_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    assert main(["shapes", "--out", str(root / "data"), "--n", "12", "--size", "32", "--seed", "0"]) == 0
    for txt in (root / "data").glob("*.txt"):  # unconditional: no text encoder to load
        txt.unlink()
    torch.manual_seed(0)
    AutoencoderKL(preset("tiny").vae).save_pretrained(str(root / "vae"))
    run = root / "run"
    assert main(["train", "--data", str(root / "data"), "--vae", str(root / "vae"), "--out", str(run), "--quiet",
                 *TRAIN]) == 0
    other = root / "other"  # the same kind of images, others: a cache whose identity differs
    assert main(["shapes", "--out", str(other), "--n", "12", "--size", "32", "--seed", "1"]) == 0
    for txt in other.glob("*.txt"):
        txt.unlink()
    assert main(["cache", "--data", str(other), "--vae", str(root / "vae"), "--out", str(root / "other_cache"),
                 "--quiet"]) == 0
    return root


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _corrupt_all(run: Path) -> None:
    for f in (run / "checkpoints").rglob("model.safetensors"):
        f.write_bytes(b"not a safetensors file")


# (what the user passed, what they did to the run first, words of the refusal)
REFUSALS = {
    "math setting": (["lr=5e-4"], None, "change the math: lr"),
    "batch size": (["batch_size=2"], None, "batch_size"),
    "architecture": (["unet.channels=[16,32]"], None, "unet.channels"),
    "bad value": (["lr=-1"], None, "lr"),
    "unknown key": (["learning_rate=1e-4"], None, "learning_rate"),
    "other cache": ([], None, "cache changed"),
    "no usable checkpoint": ([], _corrupt_all, "no usable checkpoint"),
    "fp16 on cpu": (["precision=fp16"], None, "fp16"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_resume_changes_nothing_on_disk(world, tmp_path, capsys, case):
    extra, damage, words = REFUSALS[case]
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    if damage:
        damage(run)
    (run / ".latentforge.lock").write_text("12345 latentforge train\n")  # another process held it last
    before = _snapshot(run)
    source = ["--cache", str(world / "other_cache")] if case == "other cache" else ["--data", str(world / "data")]
    assert main(["train", *source, "--vae", str(world / "vae"), "--out", str(run), "--quiet", "--resume",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("error: "), err
    after = _snapshot(run)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


def test_a_refused_resume_with_cache_changes_nothing_either(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    before = _snapshot(run)
    assert main(["train", "--cache", str(run / "cache"), "--vae", str(world / "vae"), "--out", str(run), "--quiet",
                 "--resume", "lr=5e-4"]) == 2
    assert "change the math" in capsys.readouterr().err and _snapshot(run) == before
    assert not os.path.exists(run / "checkpoints" / "step-4")
