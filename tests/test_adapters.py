"""Adapters (adapters/): fresh = no change (bitwise), forward = the closed-form merged weight, merge/unmerge
exact, only adapter parameters train, one-line errors for bad ranks / targets / kinds."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentforge import adapters as A
from latentforge.config import UNetConfig
from latentforge.errors import UserError
from latentforge.models import UNet
from tolerance import assert_same_function

# 1×1-conv projections (SD 1.x style), attention on both levels, resnets with a conv_shortcut.
CFG = UNetConfig(channels=(16, 32), layers_per_level=1, attention=(True, True), num_heads=2,
                 cross_attention_dim=12, norm_groups=4, sample_size=8)
CASES = [("lora", False, "attention"), ("lora", False, "all"), ("lora", True, "all"), ("loha", False, "all"),
         ("lokr", False, "attention+ff")]


def _unet(cfg=CFG) -> UNet:
    torch.manual_seed(0)
    return UNet(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 12, generator=g)


def randomize(model, std=0.2, seed=0):
    """Non-zero adapter weights (a 'trained' adapter) so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("kind,dora,targets", CASES)
def test_fresh_adapter_changes_nothing_bitwise(kind, dora, targets):
    base = _unet()
    adapted = copy.deepcopy(base)
    made = A.inject(adapted, kind, rank=2, alpha=4, targets=targets, dora=dora)
    assert made and all(isinstance(a, A.Adapter) for a in made.values())
    x, t, c = _inputs()
    with torch.no_grad():
        assert torch.equal(adapted(x, t, c), base(x, t, c))


def _closed_form_weight(a) -> torch.Tensor:
    """W + s·ΔW (DoRA: m·(W + sΔW)/‖W + sΔW‖ per row), from the factors, independently of the layer code."""
    w, s = a.layer.weight, a.multiplier * float(a.alpha) / a.rank
    if isinstance(a, A.LoRA):
        d = torch.einsum("or,ri->oi", a.lora_up.weight.flatten(1), a.lora_down.weight.flatten(1))
    elif isinstance(a, A.LoHa):
        d = (a.hada_w1_a @ a.hada_w1_b) * (a.hada_w2_a @ a.hada_w2_b)
    else:  # Kronecker: ΔW[i·o2 + k, j·i2 + l] = w1[i, j] · w2[k, l]
        w1, w2 = a.lokr_w1, a.lokr_w2_a @ a.lokr_w2_b
        d = torch.einsum("ij,kl->ikjl", w1, w2).reshape(w1.shape[0] * w2.shape[0], -1)
        if w.ndim == 4:  # the kernel sits inside w2's columns: (o2, i2·kh·kw)
            kk = w[0, 0].numel()
            d = torch.einsum("ij,kcl->ikjcl", w1, w2.view(w2.shape[0], -1, kk)).reshape(w.shape[0], -1)
    wp = w + s * d.view(w.shape)
    if getattr(a, "dora_scale", None) is not None:
        wp = wp * (a.dora_scale / wp.flatten(1).norm(dim=1)).view(-1, *[1] * (w.ndim - 1))
    return wp


@pytest.mark.parametrize("kind,dora,targets", CASES)
def test_adapted_output_is_the_merged_weight_model(kind, dora, targets):
    base = _unet()
    adapted = copy.deepcopy(base)
    A.inject(adapted, kind, rank=2, alpha=3, targets=targets, dora=dora)
    randomize(adapted)
    A.set_multiplier(adapted, 0.7)
    reference = copy.deepcopy(base)  # plain model carrying the closed-form weights
    with torch.no_grad():
        for path, a in A.adapters(adapted):
            reference.get_submodule(path).weight.copy_(_closed_form_weight(a))
    x, t, c = _inputs()
    with torch.no_grad():
        out = adapted(x, t, c)
        torch.testing.assert_close(out, reference(x, t, c), rtol=1e-4, atol=1e-5)
        assert (out - base(x, t, c)).abs().max() > 1e-3  # the adapter does something
        before = {k: v.clone() for k, v in base.state_dict().items()}
        assert A.merge(adapted) == len(list(A.adapters(adapted)))
        torch.testing.assert_close(adapted(x, t, c), out, rtol=1e-4, atol=1e-5)
        A.unmerge(adapted)
        assert torch.equal(adapted(x, t, c), out)
    plain = {k.replace(".base.", "."): v for k, v in adapted.state_dict().items() if ".base." in k}
    assert plain and all(torch.equal(v, before[k]) for k, v in plain.items())  # base restored bit for bit


def test_linear_linear_paths_agree_with_materialised_delta():
    """LoRA's two small products equal applying ΔW itself: Linear, 3×3 conv (stride 2), 1×1 conv on tokens."""
    g = torch.Generator().manual_seed(0)
    for layer, x in [(nn.Linear(6, 5), torch.randn(2, 3, 6, generator=g)),
                     (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 7, 7, generator=g)),
                     (nn.Conv2d(4, 6, 1), torch.randn(2, 9, 4, generator=g))]:
        a = A.LoRA(layer, rank=3, alpha=3)
        randomize_module(a)
        torch.testing.assert_close(a.delta_output(x), a._op(x, a.delta_weight()), rtol=1e-5, atol=1e-6)


def randomize_module(a):
    with torch.no_grad():
        for n, p in a.named_parameters():
            if not n.startswith("base."):
                p.normal_(0, 0.3)


def test_stacked_adapters_add_up():
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    one = A.LoRA(layer, rank=2, alpha=2)
    randomize_module(one)
    two = A.LoRA(one, rank=3, alpha=6)
    randomize_module(two)
    expect = layer(x) + one.delta_output(x) * one.scaling + two.delta_output(x) * two.scaling
    torch.testing.assert_close(two(x), expect)
    torch.testing.assert_close(two(x), F.linear(x, two.weight, two.bias))


def test_only_adapter_parameters_train():
    unet = _unet()
    A.inject(unet, "lora", rank=2, alpha=2, targets="all")
    trainable = [p for p in unet.parameters() if p.requires_grad]
    params = A.adapter_parameters(unet)
    assert {id(p) for p in trainable} == {id(p) for p in params}
    x, t, c = _inputs()
    unet(x, t, c).square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in unet.named_parameters() if ".base." in n or "lora" not in n)
    keys = A.adapter_state_dict(unet)
    assert keys and all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in keys)
    unet.to(torch.float64)  # nn.Module machinery (.to, .float, …) reaches the adapters
    assert all(p.dtype == torch.float64 for p in A.adapter_parameters(unet))
    A.remove(unet)
    assert not list(A.adapters(unet)) and set(unet.state_dict()) == set(_unet().state_dict())


def test_bad_rank_target_kind_are_one_line_errors():
    with pytest.raises(UserError, match=r"lora.rank=64: layer .*to_q .*at most 16"):
        A.inject(_unet(), "lora", rank=64, alpha=1, targets="attention")
    with pytest.raises(UserError, match=r"lora.targets=heads: unknown target — use one of attention"):
        A.inject(_unet(), "lora", rank=2, alpha=1, targets="heads")
    with pytest.raises(UserError, match=r"adapter=lorra: unknown adapter"):
        A.inject(_unet(), "lorra", rank=2, alpha=1)
    with pytest.raises(UserError, match=r"DoRA is a LoRA option"):
        A.inject(_unet(), "loha", rank=2, alpha=1, dora=True)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("layer", [lambda: nn.Linear(64, 48), lambda: nn.Conv2d(32, 48, 3, padding=1)])
def test_loha_lokr_equal_peft_on_the_same_factors(kind, layer):
    """PEFT's LoHa/LoKr layers (same factor shapes as ours, alpha/r scaling) as the oracle."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, get_peft_model_state_dict

    torch.manual_seed(0)
    base = nn.Sequential(layer())
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=2, alpha=3, target_modules=["0"])
    theirs = inject_adapter_in_model(config, copy.deepcopy(base))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "hada_" in n or "lokr_" in n:
                p.normal_(0, 0.3)
    state = {k.split(".", 1)[1]: v for k, v in get_peft_model_state_dict(theirs).items()}
    full = "lokr_w2" in state
    ours = A.KINDS[kind](base[0], rank=2, alpha=3, **({"factors": tuple(state["lokr_w1"].shape), "full": full}
                                                      if kind == "lokr" else {}))
    own = {k: v for k, v in ours.state_dict().items() if not k.startswith("base.") and k != "alpha"}
    assert set(own) == set(state)
    ours.load_state_dict({k: v.reshape(own[k].shape) for k, v in state.items()}, strict=False)
    x = torch.randn(2, 9, 64) if isinstance(base[0], nn.Linear) else torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        expect = theirs(x)
        assert (expect - base(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours(x), expect, rtol=1e-4, atol=1e-5)


def test_dropout_masks_are_a_function_of_the_sample_and_the_layer_not_of_the_batch():
    """adapters/dropout.py: a sample's mask depends on its key and the layer only, so splitting a batch over
    processes gives the same outputs and gradients; no keys (sampling, validation) = no dropout."""
    unet = _unet()
    A.inject(unet, "lora", rank=2, alpha=2, targets="all", dropout=0.5)
    randomize(unet)
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.tensor([3, 700, 50, 999]), torch.randn(4, 5, 12)
    keys = [11, 22, 33, 44]

    def run(rows, ks):
        unet.zero_grad()
        with A.sample_keys([unet], ks):
            out = unet(x[rows], t[rows], ctx[rows])
            out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in A.adapter_parameters(unet)]

    whole, grads = run(slice(0, 4), keys)
    halves = [run(slice(0, 2), keys[:2]), run(slice(2, 4), keys[2:])]
    assert_same_function(torch.cat([h[0] for h in halves]), whole, unet, positions=4 * 8 * 8, what="batch halves")
    for g, a, b in zip(grads, halves[0][1], halves[1][1]):  # forward, backward: two evaluations
        assert_same_function(a + b, g, unet, positions=4 * 8 * 8, evaluations=2, what="gradient of halves")
    assert torch.equal(run(slice(0, 4), keys)[0], whole)  # the same keys: the same masks
    other = run(slice(0, 4), [11, 22, 33, 45])[0]
    assert torch.equal(other[:3], whole[:3]) and not torch.equal(other[3], whole[3])  # only sample 3 changed
    with torch.no_grad():
        plain = unet(x, t, ctx)  # outside sample_keys: nothing is dropped
        A.set_multiplier(unet, 0.0)
        assert not torch.equal(plain, whole) and not torch.equal(unet(x, t, ctx), plain)
    layer = next(a for _, a in A.adapters(unet)).dropout
    with A.sample_keys([unet], [1]):
        kept = (layer(torch.ones(1, 20000)) != 0).float().mean()
    assert abs(float(kept) - 0.5) < 0.02
