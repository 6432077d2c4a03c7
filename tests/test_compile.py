"""compile=true (train/compile.py): the compiled training step computes the eager one's function; a bucketed
run compiles one graph per bucket shape (static shapes), says the first-step warning once and resumes bitwise;
Pipeline.compile() samples the eager images."""

import shutil

import pytest
import torch

from latentforge.train import compile as compile_mod
from latentforge.train import loop
from latentforge.train.data import InMemoryLatents
from test_train_loop import assert_bitwise, dataset, run, weights
from tolerance import assert_runs_match


@pytest.mark.slow
def test_compiled_training_equals_eager_within_the_derived_bound(tmp_path):
    """Two steps of the tiny model, eager vs torch.compile (inductor: fused kernels, other reduction orders).
    Bound: tests/tolerance.py's reorder bound λ·√(width·depth)·u·scale, carried through AdamW (adam_eps=1e-3
    so that it is tight), as for DDP vs one process. Inductor's first compile of this model takes 1-4 minutes
    on a 2-core machine (its cache makes later runs seconds)."""
    overrides = ["max_steps=2", "checkpoint_every=2", "adam_eps=1e-3", "caption_dropout=0"]
    run(tmp_path / "eager", overrides)
    run(tmp_path / "compiled", overrides + ["compile=true"])
    # positions a weight gradient sums over: batch 4 × 8×8 latent positions
    assert_runs_match(tmp_path / "eager", tmp_path / "compiled", 2, lr=1e-3, adam_eps=1e-3, positions=4 * 8 * 8,
                      what="compiled vs eager")


@pytest.mark.slow
def test_bucketed_run_compiles_once_per_bucket_shape_warns_once_and_resumes_bitwise(tmp_path, monkeypatch, capsys):
    """Two buckets (8×8 and 8×12 latents, 8 images each, batch 4): 6 steps visit both shapes several times and
    compile exactly 2 graphs; a compiled run resumed compiled from its step-3 checkpoint ends bitwise equal.
    Backend aot_eager: it traces forward and backward as inductor does (graphs and recompiles are decided there,
    before code generation) without inductor's minutes of C++ compilation."""
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 8, 8 if i < 8 else 12, generator=g) for i in range(16)]
    base = dataset("text")
    ds = InMemoryLatents(latents, base.contexts, base.masks, null_context=base.null_context, null_mask=base.null_mask)
    assert sorted(set(ds.buckets)) == ["8x12", "8x8"]
    backends = []
    monkeypatch.setattr(loop, "CountingBackend", lambda: backends.append(compile_mod.CountingBackend("aot_eager"))
                        or backends[-1])
    monkeypatch.setattr(compile_mod, "_warned", False)
    overrides = ["max_steps=6", "checkpoint_every=3", "compile=true"]
    run(tmp_path / "r", overrides, ds=ds)
    assert len(backends) == 1 and backends[0].graphs == 2
    assert capsys.readouterr().err.count(compile_mod.FIRST_STEP_WARNING) == 1
    assert "2 graphs compiled this session (one per latent shape)" in (tmp_path / "r" / "report.md").read_text()
    part = tmp_path / "resumed"
    shutil.copytree(tmp_path / "r" / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    assert run(part, overrides, ds=ds, resume=True).step == 6
    for x, y in zip(weights(part, 6), weights(tmp_path / "r", 6)):
        assert_bitwise(x, y, "compiled, resumed compiled at 3:")
    assert capsys.readouterr().err.count(compile_mod.FIRST_STEP_WARNING) == 0  # once per process

def test_sampling_with_the_compiled_unet_gives_the_eager_images(tmp_path):
    """Pipeline.compile(): text→image through the compiled UNet, one graph for the size and batch, the eager
    images back after compile(False). Backend aot_eager (the same aten ops as eager, run by AOTAutograd's
    graph): the images agree to float32 rounding of a 2-step sampler through the VAE (1e-5 on [0, 1] pixels)."""
    import latentforge
    from test_pipelines import _folder

    pipe = latentforge.load(_folder(tmp_path, "m"), device="cpu")
    kw = dict(steps=2, n=2, seed=3, output="pt", progress=False)
    eager = pipe.text2img("a red circle", **kw)
    backend = compile_mod.CountingBackend("aot_eager")
    compiled = pipe.compile(backend=backend).text2img("a red circle", **kw)
    again = pipe.text2img("a red circle", **kw)
    assert backend.graphs == 1  # CFG batches cond + uncond: one shape for both calls
    assert (compiled - eager).abs().max() <= 1e-5 and torch.equal(compiled, again)
    assert torch.equal(pipe.compile(False).text2img("a red circle", **kw), eager)
