"""`latentforge train-vae` and `latentforge train` end to end on the built-in shapes data (tiny preset):
the run folder, loss falling, model/ loadable by diffusers, errors as one line, DDP via torchrun."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentforge.cli import main
from latentforge.config import VAETrainConfig, load_train_config
from latentforge.train import checkpoint
from tolerance import assert_runs_match
from tolerance import assert_same_function

SIZE = 32
VAE_ARGS = ["model=tiny", f"image_size={SIZE}", "max_steps=40", "batch_size=8", "lr=2e-3", "warmup_steps=5",
            "log_every=1", "sample_every=20", "checkpoint_every=20", "holdout=6"]
TRAIN_ARGS = ["model=tiny", "batch_size=8", "lr=1e-3", "warmup_steps=10", "log_every=1", "sample_steps=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    assert main(["shapes", "--out", str(root / "data"), "--n", "32", "--size", str(SIZE), "--seed", "0"]) == 0
    assert main(["train-vae", "--data", str(root / "data"), "--out", str(root / "vae_run"), "--quiet", *VAE_ARGS]) == 0
    uncond = root / "uncond"  # the same images without captions
    uncond.mkdir()
    for p in (root / "data").glob("*.png"):
        shutil.copy(p, uncond / p.name)
    assert main(["cache", "--data", str(uncond), "--vae", str(root / "vae_run" / "vae"), "--out", str(root / "ucache"),
                 "--quiet"]) == 0
    return {"root": root, "data": root / "data", "vae": root / "vae_run" / "vae", "ucache": root / "ucache"}


def rows(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_train_vae_writes_a_diffusers_vae_and_reports_psnr(world, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    from latentforge.models import AutoencoderKL

    run = world["root"] / "vae_run"
    psnr = json.loads((run / "psnr.json").read_text())
    assert psnr["held_out_psnr_db"] > psnr["untrained_psnr_db"] + 5, psnr  # it learned to reconstruct
    assert "held-out PSNR" in (run / "report.md").read_text() and (run / "loss.png").stat().st_size > 0
    assert Image.open(run / "samples" / "step-40.png").size == (6 * SIZE, 2 * SIZE)  # originals over reconstructions
    ours, theirs = AutoencoderKL.from_pretrained(world["vae"]), DiffusersVAE.from_pretrained(world["vae"])
    assert ours.config.scaling_factor != 0.18215  # set from the latents' std
    assert theirs.config.scaling_factor == pytest.approx(ours.config.scaling_factor)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        assert_same_function(ours.decode_raw(ours.encode_posterior(x).mode()),
                             theirs.decode(theirs.encode(x).latent_dist.mode()).sample, ours, positions=2 * SIZE * SIZE,
                             evaluations=2)  # encoder then decoder
    assert load_train_config(run / "config.toml", cls=VAETrainConfig).max_steps == 40
    # the patch discriminator option: adversarial terms appear once it is switched on
    out = tmp_path / "disc"
    assert main(["train-vae", "--data", str(world["data"]), "--out", str(out), "--quiet", *VAE_ARGS, "max_steps=3",
                 "discriminator=true", "disc_start=1", "sample_every=0", "holdout=2"]) == 0
    logged = rows(out)
    assert "d_loss" not in logged[0] and {"d_loss", "g_adv"} <= set(logged[2])


def test_train_text_end_to_end(world, tmp_path, capfd):
    """--data builds the cache, loss falls >= 30 %, and the run folder is as DESIGN.md says."""
    from diffusers import UNet2DConditionModel

    from latentforge.pipelines import Pipeline

    run = tmp_path / "run"
    argv = ["train", "--data", str(world["data"]), "--out", str(run), "--vae", str(world["vae"]), *TRAIN_ARGS,
            "max_steps=240", "sample_every=120", "checkpoint_every=120"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "loss=" in err and "img_s=" in err and "<" in err  # the bar: loss, images/s, elapsed<ETA
    losses = [r["loss"] for r in rows(run)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"loss (mean of 20 steps) {first:.4f} -> {last:.4f}: -{1 - last / first:.0%}")
    assert last <= 0.7 * first, (first, last)  # the loss falls by at least 30 %

    assert {p.name for p in run.iterdir()} >= {"config.toml", "model", "checkpoints", "samples", "logs",
                                               "metrics.jsonl", "report.md", "loss.png", "cache"}
    cfg = load_train_config(run / "config.toml")  # re-runnable, and says what was resolved from the data
    assert cfg.conditioning == "text" and cfg.unet.cross_attention_dim == 384 and cfg.max_steps == 240
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-120.png", "step-240.png"]
    grid = Image.open(run / "samples" / "step-240.png")
    cells = json.loads(grid.info["latentforge:cells"])  # 4 captions of the data set, each beside its image
    assert len(cells) == 4 and all((world["data"] / c["source_id"]).with_suffix(".txt").read_text().strip()
                                   == c["prompt"] for c in cells)
    assert grid.size == (8 * 104, 96 + 8 + 58)  # 8 cells of 96 px + padding, over their labels
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert "loss drop" in (run / "report.md").read_text()

    # model/: diffusers layout with the EMA weights (+ text encoder), loadable by diffusers and by us
    model = run / "model"
    assert {p.name for p in model.iterdir()} >= {"model_index.json", "unet", "vae", "scheduler", "text_encoder",
                                                 "tokenizer"}
    ema = load_file(str(run / "checkpoints" / "step-240" / "ema.safetensors"))
    theirs = UNet2DConditionModel.from_pretrained(model / "unet").state_dict()
    assert ema.keys() == theirs.keys() and all(torch.equal(ema[k], theirs[k]) for k in ema)
    pipe = Pipeline.from_pretrained(model, device="cpu")
    img = pipe.text2img("a red square at the top right on a black background", steps=2, seed=0, progress=False)[0]
    assert img.size == (SIZE, SIZE)

    # --resume with --data reuses the cache (nothing re-encoded) and has nothing left to do
    assert main(argv + ["--resume", "--quiet"]) == 0
    assert "0 encoded, 32 reused" in capfd.readouterr().out


@pytest.mark.parametrize("case, words", [
    ("lr=fast", ["lr='fast'", "a number"]),
    ("max_step=3", ["unknown key 'max_step'", "did you mean max_steps"]),
    ("--vae /nonexistent", ["--vae /nonexistent", "no such folder"]),
    ("no --vae", ["--vae: required"]),
    ("--cache /nonexistent", ["--cache /nonexistent", "no such folder"]),
    ("another VAE", ["--vae:", "encoded with a different VAE"]),
    ("resume with another lr", ["lr (0.001 -> 0.002)", "change the math"]),
])
def test_mistakes_are_one_line(world, tmp_path, capsys, case, words):
    from latentforge.models import AutoencoderKL

    cache, vae, extra = str(world["ucache"]), str(world["vae"]), []
    if case == "another VAE":
        torch.manual_seed(1)
        other = AutoencoderKL(load_train_config(None, ["model=tiny"], cls=VAETrainConfig).vae)
        other.save_pretrained(str(tmp_path / "v"))
        vae = str(tmp_path / "v")
    elif case == "no --vae":
        vae = None
    elif case.startswith("--"):
        flag, value = case.split()
        cache, vae = (value, vae) if flag == "--cache" else (cache, value)
    elif case == "resume with another lr":
        out = ["--out", str(tmp_path / "run"), "--cache", cache, "--vae", vae, "--quiet", *TRAIN_ARGS, "max_steps=1"]
        assert main(["train", *out, "sample_every=0"]) == 0
        extra = ["--resume", "lr=2e-3"]
    else:
        extra = [case]
    argv = ["train", "--out", str(tmp_path / "run"), "--cache", cache, "--quiet", *TRAIN_ARGS, "max_steps=1", *extra]
    argv += ["--vae", vae] if vae else []
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err


def test_torchrun_two_processes_equal_one_and_resume(world, tmp_path):
    """`torchrun --nproc_per_node=2 -m latentforge train` (gloo, batch 4 per rank) == 1 process (batch 8)."""
    opts = ["--cache", str(world["ucache"]), "--vae", str(world["vae"]), "--quiet", *TRAIN_ARGS, "lr=1e-4",
            "adam_eps=1e-3", "max_steps=6", "checkpoint_every=3", "sample_every=0", "val_fraction=0.25", "val_every=3"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    assert main(["train", "--out", str(one), *opts]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "latentforge",
               "train", "--out", str(out), *opts, *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-3000:]

    torchrun(two)
    v1, v2 = [[(r["step"], r["val_loss"]) for r in rows(x) if "val_loss" in r] for x in (one, two)]
    assert [s for s, _ in v1] == [s for s, _ in v2] == [0, 3, 6]  # the same held-out split under DDP
    print(assert_runs_match(one, two, 6, lr=1e-4, adam_eps=1e-3, positions=8 * 8 * 8, what="torchrun"))
    state = json.loads((two / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["world_size"] == 2 and state["rng"][0] != state["rng"][1]  # per-rank RNG states
    assert (two / "model" / "unet").is_dir() and not list(two.glob("metrics.jsonl.*"))  # rank 0 wrote, once

    (resumed / "checkpoints").mkdir(parents=True)  # interrupted after step 3, resumed under DDP
    shutil.copytree(two / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    shutil.copy(two / "config.toml", resumed / "config.toml")
    torchrun(resumed, "--resume")
    for name in ("model", "ema"):
        a = load_file(str(two / "checkpoints" / "step-6" / f"{name}.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step-6" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in rows(resumed) if "val_loss" in r][-1] == [r for r in rows(two) if "val_loss" in r][-1]


# Measured 0.031 (2026-12-01, tiny UNet, 3 steps); 5x that leaves room for other CPUs' kernels, while ranks that
# did not average their gradients would each step on a half batch's gradient, a different update altogether.
TOL_BF16_DDP = 0.15


def test_torchrun_bf16_two_processes_match_one(world, tmp_path):
    """precision=bf16 under DDP: 2 gloo processes (batch 4 each) track 1 process (batch 8) within bf16's rounding.
    Not bitwise: DDP averages the ranks' bf16 gradients of half batches, one process computes the full batch's
    gradient in bf16 (sums round at 2^-8 relative), so the fp32 masters take AdamW steps on slightly different
    gradients. Checked: the logged losses within 1 % (step 1's loss is computed before any update, so it shows
    that the two ranks' halves make up the one batch), and the masters' update from step 1 to step 3 —
    relative difference of the two runs' updates ‖Δ2 − Δ1‖ / ‖Δ1‖ below TOL_BF16_DDP."""
    steps = 3
    opts = ["--cache", str(world["ucache"]), "--vae", str(world["vae"]), "--quiet", *TRAIN_ARGS, "lr=1e-4",
            f"max_steps={steps}", "checkpoint_every=1", "sample_every=0", "val_fraction=0", "precision=bf16",
            "warmup_steps=0", "keep_checkpoints=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--out", str(one), *opts]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "latentforge",
           "train", "--out", str(two), *opts]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    l1, l2 = [r["loss"] for r in rows(one) if "loss" in r], [r["loss"] for r in rows(two) if "loss" in r]
    assert len(l1) == len(l2) == steps and max(abs(a - b) / a for a, b in zip(l1, l2)) < 0.01, (l1, l2)

    def update(run):
        w1, w3 = (load_file(str(run / "checkpoints" / f"step-{s}" / "model.safetensors")) for s in (1, steps))
        assert all(v.dtype == torch.float32 for v in w3.values())  # fp32 masters are what is checkpointed
        return torch.cat([(w3[k] - w1[k]).flatten() for k in sorted(w3)])

    d1, d2 = update(one), update(two)
    rel = float((d2 - d1).norm() / d1.norm())
    print(f"bf16 DDP vs 1 process: losses {l1} / {l2}; relative update difference {rel:.3f}")
    assert rel < TOL_BF16_DDP


def _ranks(pid: int) -> dict:
    """{RANK: pid} of torchrun `pid`'s worker processes (Linux /proc: children and their environment)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_text().split("\0") if "=" in kv)
                ranks[int(env["RANK"])] = int(stat.parent.name)
        except (OSError, KeyError, ValueError):  # gone meanwhile, or not a rank
            continue
    return ranks


@pytest.mark.slow  # five torchrun pairs (~55 s on a shared 2-core machine)
def test_sigterm_under_torchrun_checkpoints_and_resumes_bitwise(world, tmp_path):
    """SIGTERM to torchrun (it forwards the signal to both ranks); after `--resume`, to rank 1 alone; after another,
    to torchrun and both ranks at once (a scheduler signalling every process: each rank also gets torchrun's copy).
    Each time the ranks agree on the stop at the same poll step (every min(log_every, 10) steps, an all-reduce),
    write one checkpoint of that step and exit 0; the last `--resume` ends bitwise equal (model, EMA, optimizer) to
    an uninterrupted torchrun run. Before: SIGTERM to rank 1 alone left rank 0, never signalled, training on while
    rank 1 wrote its checkpoint (both hung in mismatched collectives, no checkpoint); SIGTERM to every process made
    the forwarded copy a second signal, KeyboardInterrupt in the ranks, no checkpoint (3 of 4 tries)."""
    from test_train_loop import _wait_for

    steps, every = 40, 4
    opts = ["--cache", str(world["ucache"]), "--vae", str(world["vae"]), "--quiet", *TRAIN_ARGS, "lr=1e-4",
            "lr_schedule=constant", f"log_every={every}", "checkpoint_every=1000", "keep_checkpoints=3",
            "sample_every=0", "val_fraction=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "latentforge",
            "train"]
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    p = subprocess.run([*head, "--out", str(ref), *opts, f"max_steps={steps}"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]

    def stop_once(target: str, *extra) -> int:
        """Train `out` 'forever' (a constant LR makes max_steps bookkeeping), SIGTERM `target` (torchrun, rank 1 or
        all) once a step past the last checkpoint is logged; the step of the one checkpoint it adds."""
        before = checkpoint.complete_steps(out / "checkpoints")
        proc = subprocess.Popen([*head, "--out", str(out), *opts, "max_steps=100000", *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        ranks = {}
        try:
            _wait_for(lambda: (out / "metrics.jsonl").is_file() and rows(out)[-1]["step"] > max(before, default=0),
                      timeout=120)
            ranks, at = _ranks(proc.pid), rows(out)[-1]["step"]
            assert sorted(ranks) == [0, 1], ranks
            for pid in {"torchrun": [proc.pid], "rank 1": [ranks[1]], "all": [proc.pid, *ranks.values()]}[target]:
                os.kill(pid, signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=120)
        finally:  # torchrun's ranks run in their own sessions: a hung pair would outlive it
            proc.kill()  # (nothing once it has exited)
            for pid in ranks.values():
                with contextlib.suppress(OSError):  # gone, or the pid is no longer this run's
                    if str(out) in Path(f"/proc/{pid}/cmdline").read_text():
                        os.kill(pid, signal.SIGKILL)
        new = [s for s in checkpoint.complete_steps(out / "checkpoints") if s not in before]
        print(f"SIGTERM to {target} after logged step {at}: torchrun exit {proc.returncode}, new checkpoints {new}")
        assert len(new) == 1 and new[0] % every == 0 and at <= new[0] < steps, (new, stderr[-3000:])
        assert f"stopped by SIGTERM at step {new[0]}; checkpoint saved" in stdout, (stdout, stderr[-3000:])
        return new[0]

    first = stop_once("torchrun")
    second = stop_once("rank 1", "--resume")
    assert first < second < stop_once("all", "--resume")
    p = subprocess.run([*head, "--out", str(out), *opts, f"max_steps={steps}", "--resume"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("model", "ema", "optimizer"):
        a, b = (load_file(str(d / "checkpoints" / f"step-{steps}" / f"{name}.safetensors")) for d in (ref, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _files(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_train_data_refusals_come_before_the_cache_is_built_again(world, tmp_path, capsys, monkeypatch):
    """`train --data DIR --out RUN` on a run with checkpoints and changed data: each refusal the run can get
    (no --resume; a setting that changes the math, also with --allow-changed-data; no usable checkpoint) comes
    before RUN/cache is encoded again: build_cache is never called and the cache's files keep their bytes and
    mtimes. Before, `train` rebuilt RUN/cache from the changed data first and refused after. The right resume,
    on the data the run was trained on, still works (the data-derived settings are not compared early)."""
    import latentforge.data.cache as cache_module

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(world["data"], data)
    argv = ["train", "--data", str(data), "--vae", str(world["vae"]), "--out", str(run), "--quiet", *TRAIN_ARGS,
            "sample_every=0", "val_fraction=0", "lr_schedule=constant", "checkpoint_every=1"]
    assert main([*argv, "max_steps=2"]) == 0
    capsys.readouterr()
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("00003.png", "00003.txt"):  # the data changes: one captioned image fewer
        shutil.move(data / name, moved / name)
    builds = []
    real = cache_module.build_cache
    monkeypatch.setattr(cache_module, "build_cache", lambda *a, **k: (builds.append(a), real(*a, **k))[1])
    before = _files(run / "cache")
    aside = tmp_path / "aside"
    shutil.copytree(run / "checkpoints", aside)
    cases = [([], "already holds checkpoints — pass --resume"),
             (["--resume", "lr=5e-4"], "lr (0.001 -> 0.0005)"),
             (["--resume", "--allow-changed-data", "lr=5e-4"], "lr (0.001 -> 0.0005)"),
             (["--resume", "--allow-changed-data", "unusable"], "no usable checkpoint")]
    for extra, words in cases:
        if "unusable" in extra:
            for marker in (run / "checkpoints").glob("step-*/COMPLETE"):
                marker.unlink()  # as if every checkpoint had been cut off while it was written
            extra = extra[:-1]
        assert main([*argv, "max_steps=3", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (extra, err)
        assert builds == [] and _files(run / "cache") == before, extra
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(aside, run / "checkpoints")
    for name in ("00003.png", "00003.txt"):
        shutil.move(moved / name, data / name)
    assert main([*argv, "max_steps=3", "--resume"]) == 0
    assert len(builds) == 1 and rows(run)[-1]["step"] == 3
