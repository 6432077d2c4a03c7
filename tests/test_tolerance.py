"""The derived tolerances (tests/tolerance.py) hold for known reorderings, are needed (a tighter bound fails
them), and still catch a real bug (a dropped micro-batch)."""

import numpy as np
import torch

import tolerance as T


def test_unit_roundoff_is_half_the_machine_epsilon():
    assert T.unit_roundoff(torch.float32) == 2.0**-24 and T.unit_roundoff(torch.bfloat16) == 2.0**-8


def test_a_reordered_sum_is_within_the_bound_and_the_width_term_is_needed():
    """2**20 positive terms (no cancellation, so Σ|x| is the sum's own size) summed left to right (NumPy's
    float32 cumsum, one term at a time) and by torch's vectorised pairwise sum: 12.3 apart on a sum of 5.2e5."""
    x = torch.rand(2**20, generator=torch.Generator().manual_seed(0))
    sequential, pairwise = float(np.cumsum(x.numpy())[-1]), x.sum().item()
    diff, scale = abs(sequential - pairwise), x.double().sum().item()
    assert diff <= T.reorder_tol(scale, x.numel())
    assert diff > T.reorder_tol(scale, 1)  # a bound that forgot the reduction's width is too tight


def _mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                               torch.nn.Linear(256, 64))


def _train(micro: int, *, drop_last: bool = False, steps: int = 3, lr: float = 1e-3, eps: float = 1e-3):
    """AdamW on a 3-layer MLP, each step's 16 samples in `micro` accumulated micro-batches (the last one
    left out when `drop_last`: the bug the bound must catch). Returns the weights and the logged rows."""
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(steps, 16, 64, generator=g), torch.randn(steps, 16, 64, generator=g)
    m = _mlp()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, eps=eps)
    rows = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = 0.0
        for i, (a, b) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            if not (drop_last and i == micro - 1):
                part = torch.nn.functional.mse_loss(m(a), b) / micro
                part.backward()
                loss += part.item()
        rows.append({"loss": loss, "grad_norm": torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0).item()})
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, rows


def _tols(state, rows):
    width, depth = T.network_shape(state, positions=16)
    return T.training_tols(rows, lr=1e-3, adam_eps=1e-3, width=width, depth=depth,
                           n_params=sum(v.numel() for v in state.values()))


def test_accumulated_micro_batches_are_within_the_adamw_bound_but_not_bitwise():
    big, rows = _train(1)
    acc, acc_rows = _train(4)
    w_tol, loss_tols = _tols(big, rows)
    worst = T.assert_close_tensors(acc, big, w_tol, "4 micro-batches vs 1 batch")
    T.assert_close_losses([r["loss"] for r in acc_rows], [r["loss"] for r in rows], loss_tols, "losses")
    assert worst > 0  # a bitwise comparison (the tightest bound) would fail this reordering


def test_the_adamw_bound_catches_a_dropped_micro_batch():
    big, rows = _train(1)
    dropped, dropped_rows = _train(4, drop_last=True)
    w_tol, loss_tols = _tols(big, rows)
    assert max((dropped[k] - big[k]).abs().max().item() for k in big) > 10 * w_tol
    assert abs(dropped_rows[0]["loss"] - rows[0]["loss"]) > 10 * loss_tols[0]


def test_a_loose_bound_would_pass_the_bug():
    """The guard the previous test relies on: at Adam's default ε = 1e-8 the same formula is far looser than the
    bug's effect, which is why the training comparisons set adam_eps near the gradients' element size."""
    big, rows = _train(1)
    dropped, _ = _train(4, drop_last=True)
    width, depth = T.network_shape(big, positions=16)
    loose = T.adamw_tol(lr=1e-3, steps=3, adam_eps=1e-8, grad_scale=1.0, width=width, depth=depth)
    assert max((dropped[k] - big[k]).abs().max().item() for k in big) < loose


def test_make_test_kernels_names_existing_tests_and_switches():
    import kernel_settings as K

    here = __import__("pathlib").Path(__file__).parent
    assert all((here / f).is_file() for f in K.SENSITIVE) and K.SETTINGS["default"] == {}
    assert {"MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"} <= set(K.SETTINGS["avx2-machine"])


def test_same_function_bound_holds_for_a_batch_split_and_catches_a_perturbed_weight():
    """assert_same_function on the MLP: one batch of 16 against two of 8 (other GEMM shapes, the same function)
    passes; a model with one weight off by 1 % of its layer's largest (a wrong constant, a
    mis-converted key) fails; and a bound without the width and depth terms (a single rounding of the output) is too
    tight for a float32 vs float64 evaluation of the same network."""
    import pytest

    m = _mlp()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole, halves = m(x), torch.cat([m(x[:8]), m(x[8:])])
        T.assert_same_function(halves, whole, m, positions=16, what="batch split")
        exact = m.double()(x.double()).float()
        m.float()
        T.assert_same_function(whole, exact, m, positions=16, what="float32 vs float64")
        # one rounding of the output each way (2u·scale, no width, no depth) is too tight for it
        assert (whole - exact).abs().max().item() > 2 * T.unit_roundoff() * exact.abs().max().item()
        bad = _mlp()
        bad[2].weight[0, 0] += 1e-2 * bad[2].weight.abs().max()
        with pytest.raises(AssertionError, match="derived bound"):
            T.assert_same_function(bad(x), whole, m, positions=16, what="perturbed")


def test_sampling_evaluations_counts_guided_steps_and_the_decode():
    assert T.sampling_evaluations(4, 1.0) == 5 and T.sampling_evaluations(4, 5.0) == 37
