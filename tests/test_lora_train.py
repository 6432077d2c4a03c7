"""`train --init MODEL adapter=lora|loha|lokr`: only the adapter trains (base bitwise unchanged, checkpoint holds
the adapter only), lora/ files in both formats, --merge model/ = base + adapter (1e-4), bitwise resume after
kill -9, 2-process DDP = 1 process (within tests/tolerance.py's derived bound), loss falls when LoRA-tuning a pretrained model on other shapes,
one-line errors. Synthetic in-memory latents and a tiny random --init model."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentforge.config import PRESETS, ScheduleConfig, load_train_config
from latentforge.errors import UserError
from latentforge.formats import save_model_folder
from latentforge.models import AutoencoderKL, UNet
from latentforge.train import checkpoint, loop
from latentforge.train.data import InMemoryLatents
from latentforge.train.init import init_base, read_init
from tolerance import assert_runs_match, assert_same_function

N, B = 16, 4
BASE = ["batch_size=4", "lr=1e-2", "log_every=1", "sample_every=0", "checkpoint_every=2", "keep_checkpoints=0",
        "caption_dropout=0.25", "val_fraction=0"]
LORA = ["adapter=lora", "lora.rank=4", "lora.alpha=4", "lora.targets=all"]


def init_folder(root: Path) -> Path:
    """A tiny random text-conditional model folder (the --init model)."""
    folder = root / "base"
    if not folder.exists():
        torch.manual_seed(0)
        tiny = PRESETS["tiny"]
        save_model_folder(folder, UNet(tiny.unet), AutoencoderKL(tiny.vae), ScheduleConfig())
    return folder


def dataset(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return InMemoryLatents(torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 6, 32, generator=g),
                           torch.ones(n, 6, dtype=torch.bool), null_context=torch.zeros(6, 32),
                           null_mask=torch.ones(6, dtype=torch.bool))


def config(folder, overrides=()):
    return load_train_config(None, BASE + list(overrides), base=init_base(read_init(str(folder))), init=True)


def run(out, folder, overrides=(), ds=None, **kw):
    return loop.train(config(folder, LORA + list(overrides)), ds or dataset(), out, progress=False, **kw)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_lora_run_trains_the_adapter_only_and_writes_both_formats(tmp_path):
    folder = init_folder(tmp_path)
    before = _digest(folder)
    vae = AutoencoderKL.from_pretrained(folder)
    res = run(tmp_path / "run", folder, ["max_steps=4", "lora.merge=true"], vae=vae)
    assert res.step == 4 and _digest(folder) == before
    ckpt = tmp_path / "run" / "checkpoints" / "step-4"
    weights, ema = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert weights and all(".lora_" in k for k in weights) and weights.keys() == ema.keys()
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_up" in k)  # the adapter moved off zero
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert sum(v.numel() for v in opt.values()) <= 2 * sum(v.numel() for v in weights.values()) + len(opt)
    lora_dir = tmp_path / "run" / "lora"
    kohya = lora_dir / "run.safetensors"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file() and kohya.is_file()
    from latentforge.formats.lora import read

    meta = read(kohya).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "4", "4")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "lora rank 4, alpha 4 on all:" in report and "lora/ (diffusers + kohya formats" in report
    # model/ (lora.merge=true) = the base model with the EMA adapter merged: the same predictions as base + adapter
    from latentforge.formats.lora import apply

    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600]), torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        merged = UNet.from_pretrained(tmp_path / "run" / "model").eval()(x, t, ctx)
        base = UNet.from_pretrained(folder).eval()
        plain = base(x, t, ctx)
        for file in (kohya, lora_dir):
            apply(read(file), {"unet": base})
            assert_same_function(base(x, t, ctx), merged, base, positions=2 * 8 * 8, what=str(file))
            base = UNet.from_pretrained(folder).eval()
    assert (merged - plain).abs().max() > 1e-4


def test_lora_trains_with_bf16_checkpointing_accumulation_min_snr_and_dora(tmp_path):
    folder = init_folder(tmp_path)
    opts = ["max_steps=2", "precision=bf16", "gradient_checkpointing=true", "grad_accum=2", "batch_size=2",
            "min_snr_gamma=5", "lora.dora=true", "lora.targets=attention+ff"]
    assert run(tmp_path / "run", folder, opts).step == 2
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"))
    assert any(k.endswith("dora_scale") for k in weights) and all(torch.isfinite(v).all() for v in weights.values())


def test_base_weights_stay_bitwise_and_only_adapter_params_reach_the_optimizer():
    from latentforge.config import TrainConfig, replace
    from latentforge.train import adapter
    from latentforge.train.setup import make_optimizer

    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"].unet)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    cfg = replace(TrainConfig(), adapter="loha", init="x", weight_decay=0.1, lr=1e-2)
    keys = adapter.attach(cfg, unet)
    opt = make_optimizer(unet, cfg, torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(keys)
    for _ in range(3):
        x = torch.randn(2, 4, 8, 8)
        unet(x, torch.tensor([10, 500]), torch.randn(2, 6, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base.", ".").replace("base.", ""): v for k, v in unet.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in base.items())


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_lora_train import run
res = run(sys.argv[1], sys.argv[2], sys.argv[4:], resume=sys.argv[3] == "resume")
print("done", res.step, res.stopped, flush=True)
"""


def _script(tmp_path):
    path = tmp_path / "lora_script.py"
    path.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return path


@pytest.mark.slow  # ~30 s: two training subprocesses and a reference run
def test_kill_9_then_resume_is_bitwise(tmp_path):
    """A real kill -9, and a SIGTERM (a checkpoint of the step it stopped at, exit 0), then --resume."""
    from test_train_loop import _wait_for, assert_bitwise

    folder = init_folder(tmp_path)
    opts = ["lr_schedule=constant", "lora.dropout=0.1"]
    ref = tmp_path / "ref"
    run(ref, folder, opts + ["max_steps=10"])
    for sig in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / sig.name
        proc = subprocess.Popen([sys.executable, str(_script(tmp_path)), str(out), str(folder), "fresh", *opts,
                                 "max_steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _wait_for(lambda: (checkpoint.complete_steps(out / "checkpoints") or [0])[-1] >= 4)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        k = checkpoint.complete_steps(out / "checkpoints")[-1]
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:  # honoured at the next step boundary, with a checkpoint of exactly that step
            assert proc.returncode == 0 and stdout.split() == ["done", str(k), "SIGTERM"], stderr[-2000:]
        assert 4 <= k < 10, k
        assert run(out, folder, opts + ["max_steps=10"], resume=True).step == 10
        for name in ("model", "ema", "optimizer"):
            a, b = (load_file(str(d / "checkpoints" / "step-10" / f"{name}.safetensors")) for d in (out, ref))
            assert_bitwise(a, b, f"{name} after {sig.name} at step {k}:")


def test_two_processes_equal_one(tmp_path):
    """With lora.dropout too: the masks come from (seed, stream position), not from the rank's RNG."""
    folder = init_folder(tmp_path)
    opts = ["max_steps=4", "lr_schedule=constant", "lr=1e-4", "adam_eps=1e-3", "lora.dropout=0.3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, folder, opts)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(_script(tmp_path)),
           str(two), str(folder), "fresh", *opts]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    base = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    print(assert_runs_match(one, two, 4, lr=1e-4, adam_eps=1e-3, positions=B * 8 * 8, net_state=base, what="DDP"))


def test_bad_adapter_settings_are_one_line(tmp_path):
    folder = init_folder(tmp_path)
    cases = [
        (lambda: load_train_config(None, ["model=tiny", *BASE, "adapter=lora"]),
         "adapter=lora: an adapter trains on top of a pretrained model — pass --init MODEL"),
        (lambda: load_train_config(None, ["model=tiny", *BASE, "lora.rank=8"]),
         "lora.rank: an adapter setting without adapter="),
        (lambda: config(folder, ["adapter=lora", "lora.rank=99"]), "lora.rank=99: layer .* use a rank of at most 64"),
        (lambda: config(folder, ["adapter=lora", "lora.targets=heads"]),
         "lora.targets='heads' — choose one of attention, attention\\+ff, all"),
        (lambda: config(folder, ["adapter=lora", 'unet.freeze=["*attn1*"]']),
         "unet.freeze: with adapter=lora the whole base model is frozen already"),
    ]
    for make, message in cases:
        with pytest.raises(UserError, match=message) as e:
            loop.train(make(), dataset(), tmp_path / "run", progress=False)
        assert "\n" not in str(e.value)


def _shape_latents(vae, shape: str, n: int, seed: int) -> torch.Tensor:
    """n shapes-data-set images of one shape (colours, positions, backgrounds vary), encoded by `vae`."""
    import random

    from latentforge.data import shapes
    from latentforge.data.images import to_tensor

    combos = [a for a in shapes.seen_combinations() if a["shape"] == shape]
    rng = random.Random(seed)
    images = to_tensor([shapes.render(combos[i % len(combos)], 32, rng) for i in range(n)])
    with torch.no_grad():
        latents = vae.encode(images)  # (n, 4, 8, 8)
    return latents / 0.05  # about unit variance (a random VAE's latents are small), as a calibrated VAE's are


@torch.no_grad()
def _fixed_loss(unet, latents, ac) -> float:
    """ε-MSE at fixed timesteps and noise: comparable between models."""
    from latentforge.schedule import add_noise

    g = torch.Generator().manual_seed(7)
    losses = []
    for t in (50, 150, 300, 500):
        noise = torch.randn(latents.shape, generator=g)
        tt = torch.full((latents.shape[0],), t)
        losses.append((unet(add_noise(latents, noise, tt, ac), tt) - noise).square().mean())
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_lora_tuning_a_pretrained_model_on_other_shapes_lowers_the_loss(tmp_path):
    """Pretrain a tiny unconditional model on circles (in the test), LoRA-tune it on squares: the fixed-noise
    loss on squares falls below the pretrained model's."""
    from latentforge.config import replace
    from latentforge.formats import lora as fmt
    from latentforge.schedule import NoiseSchedule

    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["tiny"].vae).eval()
    circles, squares = _shape_latents(vae, "circle", 48, 0), _shape_latents(vae, "square", 48, 1)
    scratch = ["model=tiny", "batch_size=8", "lr=2e-3", "warmup_steps=10", "log_every=50", "sample_every=0",
               "checkpoint_every=1000", "val_fraction=0", "ema_decay=0.99", "max_steps=250"]
    loop.train(load_train_config(None, scratch), InMemoryLatents(circles), tmp_path / "pre", vae=vae, progress=False)
    folder = tmp_path / "pre" / "model"
    lora_run = tmp_path / "lora"
    cfg = config(folder, ["adapter=lora", "lora.rank=8", "lora.alpha=8", "lora.targets=all", "max_steps=150",
                          "lr=5e-3", "lr_schedule=constant", "batch_size=8", "ema_decay=0.9", "log_every=20"])
    loop.train(cfg, InMemoryLatents(squares), lora_run, progress=False)
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod
    base = UNet.from_pretrained(folder).eval()
    before = _fixed_loss(base, squares, ac)
    fmt.apply(fmt.read(lora_run / "lora" / "pytorch_lora_weights.safetensors"), {"unet": base})
    after = _fixed_loss(base, squares, ac)
    print(f"fixed-noise loss on squares: pretrained {before:.4f} -> LoRA {after:.4f}")
    assert after < 0.9 * before


def test_cli_adapter_without_init_is_one_line_before_any_work(tmp_path, capsys):
    from latentforge.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(out), "adapter=lora", "--merge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: adapter=lora: an adapter trains on top of a pretrained model — pass --init MODEL "
                   "(a diffusers model folder)"] and not out.exists()


def _first_step(run_dir) -> torch.Tensor:
    """Every lora_up weight after step 1 (they start at zero: this is AdamW's first step, −lr · g / (|g| + ε))."""
    w = load_file(str(run_dir / "checkpoints" / "step-1" / "model.safetensors"))
    return torch.cat([w[k].flatten() for k in sorted(w) if "lora_up" in k])


def test_two_processes_draw_the_dropout_masks_of_one(tmp_path):
    """lora.dropout=0.5 under DDP: the first optimizer step of 2 processes is the step of 1. AdamW's first step
    is lr · sign(g) wherever |g| ≫ adam_eps (1e-8), so two runs whose gradients differ only by the order of the
    float sums (the ranks' halves averaged vs one batch) take the same step except where |g| is within that
    difference of zero: relative to max |g|, δ ≈ fp32 eps × reduction depth = 1.2e-7 × (4 samples × 64
    positions + ~100 layers) ≈ 4e-5, so about 2δ ≈ 1e-4 of the entries; 0.01 allows 100 times that. Masks from
    each rank's own RNG change most gradients by O(1). Measured (25,472 entries): keyed masks 0 differ; masks
    from the process RNG 0.34; no dropout vs dropout 0.25 (the masks matter to this step)."""
    folder = init_folder(tmp_path)
    opts = ["max_steps=1", "lr_schedule=constant", "warmup_steps=0", "lr=1e-3", "lora.dropout=0.5"]
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    run(one, folder, opts)
    run(plain, folder, opts + ["lora.dropout=0"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(_script(tmp_path)),
           str(two), str(folder), "fresh", *opts]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    a, b, c = _first_step(one), _first_step(two), _first_step(plain)
    flipped = lambda x, y: float((torch.sign(x) != torch.sign(y)).float().mean())  # noqa: E731
    print(f"first-step signs differing: 2 processes vs 1 {flipped(a, b):.4f}; no dropout vs dropout {flipped(a, c):.4f}"
          f" ({a.numel()} entries)")
    assert flipped(a, c) > 0.2
    assert flipped(a, b) < 0.01
