"""Small trainable adapters on a frozen `nn.Linear` / `nn.Conv2d`: LoRA (optionally DoRA), LoHa, LoKr.

    y = base(x) + s · ΔW x,        s = multiplier · α / r

- LoRA  ΔW = up · down, down (r, in), up (out, r)          Hu et al. 2021, "LoRA", eq. 3 (α/r: §4.1)
- DoRA  W' = m ⊙ (W + sΔW) / ‖W + sΔW‖ (per output row)     Liu et al. 2024, "DoRA", eq. 5; the norm is
        detached from the graph as in its §4.3 (and in PEFT), m starts at ‖W‖ so W' = W at init.
- LoHa  ΔW = (w1_a w1_b) ⊙ (w2_a w2_b)                       Hyeon-Woo et al. 2022, "FedPara", eq. 2
- LoKr  ΔW = w1 ⊗ (w2_a w2_b)                                Edalati et al. 2022, "KronA" (LyCORIS' LoKr)

Parameter names are the kohya/LyCORIS key suffixes (`lora_down.weight`, `hada_w1_a`, `lokr_w1`,
`dora_scale`, `alpha`), so a file is our state_dict under another prefix. The base layer is never
written to: `forward` adds the adapter's term to the base output, `merge`/`unmerge` (in inject.py)
keep the original tensor and put it back bit for bit. Each adapter starts with ΔW = 0 exactly, so a
fresh adapter's output equals the base model's bitwise.

Adapters stack: the base of an adapter may itself be an adapter (two LoRA files applied at once).
Code that computes a layer's output from its weight itself (the fused q/k/v GEMM in models/layers.py)
uses `plain_layer(m).weight` and then `add_adapters(m, x, y)`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import KeyedDropout

Layer = Union[nn.Linear, nn.Conv2d]


def plain_layer(m: nn.Module) -> nn.Module:
    """The frozen nn.Linear / nn.Conv2d under any stack of adapters (m itself if not adapted)."""
    while isinstance(m, Adapter):
        m = m.base
    return m


def add_adapters(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` = the plain layer's output on `x`; plus every adapter stacked on `m` (none: `y` itself)."""
    return m.add_delta(x, y) if isinstance(m, Adapter) else y


def in_features(layer: Layer) -> int:
    """Inputs per output of the weight matrix: in, or in_channels · kh · kw for a convolution."""
    return layer.weight[0].numel()


class Adapter(nn.Module):
    """Base class: wraps `base`, adds `scaling · ΔW x` to its output. Subclasses define the factors."""

    kind = ""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        layer = plain_layer(base)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
            raise TypeError(f"adapters wrap nn.Linear or ungrouped nn.Conv2d, not {type(layer).__name__}")
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.register_buffer("alpha", torch.tensor(float(alpha)))  # kohya's `.alpha`, saved with the file
        self.multiplier = 1.0  # the user's strength, e.g. --lora FILE:0.5
        self.dropout = KeyedDropout(dropout) if dropout > 0 else nn.Identity()  # masks from (sample, layer)
        self.merged = False

    # ------------------------------------------------------------------ what subclasses provide

    def delta_weight(self) -> torch.Tensor:
        """ΔW with the plain layer's weight shape, without the scaling."""
        raise NotImplementedError

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x, unscaled (same layout as the base output). Default: materialise ΔW, apply the op."""
        return self._op(x, self.delta_weight())

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight that gives this adapter's output with no adapter: W + s·ΔW."""
        return w + self.scaling * self.delta_weight().to(w.dtype)

    # ------------------------------------------------------------------ shared machinery

    @property
    def scaling(self) -> float:
        return self.multiplier * float(self.alpha) / self.rank

    @property
    def layer(self) -> Layer:
        return plain_layer(self.base)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads `.weight` itself; the base tensor stays untouched."""
        w = self.layer.weight
        return w if self.merged else self._chain_weight(w)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.layer.bias

    def _chain_weight(self, w: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, Adapter):
            w = self.base._chain_weight(w)
        return self.merged_weight(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(x, self.layer(x))  # (B, out, ...) like the base layer

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` = the plain layer's output on `x` -> this stack's output (y itself while merged)."""
        if isinstance(self.base, Adapter):
            y = self.base.add_delta(x, y)
        if self.merged:
            return y
        return y + self.scaling * self.delta_output(self.dropout(x)).to(y.dtype)

    def _tokens(self, x: torch.Tensor) -> bool:
        """True when a 1×1 conv is applied to (B, N, C) tokens as a Linear (SpatialTransformer.proj_in)."""
        return isinstance(self.layer, nn.Conv2d) and x.ndim == 3

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The plain layer's operation with weight `w` and no bias."""
        layer = self.layer
        if isinstance(layer, nn.Linear) or self._tokens(x):
            return F.linear(x, w.flatten(1).to(x.dtype))  # (..., out)
        return F.conv2d(x, w.to(x.dtype), None, layer.stride, layer.padding, layer.dilation)  # (B, out, H', W')

    def _check_rank(self, limit: int, what: str) -> None:
        if not 1 <= self.rank <= limit:
            raise ValueError(f"rank {self.rank} is larger than {what} ({limit}); use a rank of at most {limit}")

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={float(self.alpha):g}, multiplier={self.multiplier:g}"


def _kaiming(t: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform, a=√5), also PEFT's choice for lora_A."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


class LoRA(Adapter):
    """ΔW = up · down (Hu et al. 2021). A conv layer gets a conv `down` with the base's kernel and a 1×1 `up`.

    `dora=True` adds the magnitude vector `dora_scale` (Liu et al. 2024)."""

    kind = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__(base, rank, alpha, dropout)
        layer = self.layer
        self._check_rank(min(in_features(layer), layer.weight.shape[0]), "the layer's smaller side")
        kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        if isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False, **kw)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False, **kw)
        else:
            self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                       layer.dilation, bias=False, **kw)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False, **kw)
        with torch.no_grad():
            _kaiming(self.lora_down.weight, generator)
            self.lora_up.weight.zero_()  # ΔW = 0 at init
        self.dora_scale = nn.Parameter(self._row_norm(layer.weight.detach().float()).to(layer.weight.dtype)) \
            if dora else None

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.weight
        return (self.lora_up.weight.flatten(1) @ self.lora_down.weight.flatten(1)).view(w.shape)  # (out, in, ...)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        if self._tokens(x):  # 1×1 conv on (B, N, C) tokens
            return F.linear(F.linear(x, self.lora_down.weight.flatten(1)), self.lora_up.weight.flatten(1))
        return self.lora_up(self.lora_down(x))  # (B, r, ...) -> (B, out, ...)

    @staticmethod
    def _row_norm(w: torch.Tensor) -> torch.Tensor:
        return w.flatten(1).norm(dim=1)  # (out,)

    def _dora_factor(self, w_plus: torch.Tensor) -> torch.Tensor:
        """m / ‖W + sΔW‖ per output channel, the norm detached (DoRA §4.3)."""
        return self.dora_scale / self._row_norm(w_plus).detach()  # (out,)

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        w_plus = super().merged_weight(w)
        if self.dora_scale is None:
            return w_plus
        return self._dora_factor(w_plus).view(-1, *([1] * (w.ndim - 1))) * w_plus

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.dora_scale is None or self.merged:
            return super().add_delta(x, y)
        base_w = self.layer.weight
        if isinstance(self.base, Adapter):
            y = self.base.add_delta(x, y)
            base_w = self.base._chain_weight(base_w)
        g = self._dora_factor(base_w + self.scaling * self.delta_weight())  # (out,)
        g = g if (self._tokens(x) or x.ndim != 4) else g.view(-1, 1, 1)  # broadcast over (..., out) or (B, out, H, W)
        bias = self.layer.bias
        b = 0 if bias is None else (bias if g.ndim == 1 else bias.view(-1, 1, 1))
        lora = self.scaling * self.delta_output(self.dropout(x))
        return y + (g - 1) * (y - b) + g * lora  # = g·(W' x) + b (PEFT's DoRA forward)


class LoHa(Adapter):
    """ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) (FedPara; LyCORIS' LoHa): rank r², for 2r(in + out) parameters."""

    kind = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__(base, rank, alpha, dropout)
        out_f, in_f = self.layer.weight.shape[0], in_features(self.layer)
        self._check_rank(min(in_f, out_f), "the layer's smaller side")
        kw = dict(device=self.layer.weight.device, dtype=self.layer.weight.dtype)
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w2_b = nn.Parameter(torch.zeros(rank, in_f, **kw))  # ΔW = 0 at init
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                _kaiming(p, generator)

    def delta_weight(self) -> torch.Tensor:
        d = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)  # (out, in·k·k)
        return d.view(self.layer.weight.shape)


def factorize(n: int) -> Tuple[int, int]:
    """n = a · b with a ≤ b and a as close to √n as possible (LyCORIS' `factorization(n, -1)`)."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


class LoKr(Adapter):
    """ΔW = w1 ⊗ (w2_a w2_b) (Kronecker product; KronA, LyCORIS' LoKr). out = o1·o2, in = i1·i2 with
    o1 ≤ o2, i1 ≤ i2 near √; w1 (o1, i1) is full, the larger factor w2 (o2, i2·k·k) has rank r."""

    kind = "lokr"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 generator: Optional[torch.Generator] = None, factors: Optional[Tuple[int, int]] = None,
                 full: bool = False):
        super().__init__(base, rank, alpha, dropout)
        w = self.layer.weight
        if factors is None:
            (o1, o2), (i1, i2) = factorize(w.shape[0]), factorize(w.shape[1])
        elif w.shape[0] % factors[0] or w.shape[1] % factors[1]:
            raise ValueError(f"lokr_w1 {tuple(factors)} does not divide the layer's {tuple(w.shape[:2])}")
        else:  # a file's own factorisation (LyCORIS may choose other factors)
            (o1, i1) = factors
            o2, i2 = w.shape[0] // o1, w.shape[1] // i1
        k = w[0, 0].numel()  # kernel positions (1 for Linear)
        kw = dict(device=w.device, dtype=w.dtype)
        self.lokr_w1 = nn.Parameter(torch.empty(o1, i1, **kw))
        if full:  # LyCORIS' full w2 (its files use it when the factor is small): (o2, i2[, k, k])
            self.lokr_w2 = nn.Parameter(torch.zeros(o2, i2, *w.shape[2:], **kw))
        else:
            self._check_rank(min(o2, i2 * k), f"the LoKr factor's smaller side ({o2}x{i2 * k})")
            self.lokr_w2_a = nn.Parameter(torch.empty(o2, rank, **kw))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, i2 * k, **kw))  # ΔW = 0 at init
        with torch.no_grad():
            _kaiming(self.lokr_w1, generator)
            if not full:
                _kaiming(self.lokr_w2_a, generator)

    def delta_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2.view(self.lokr_w2.shape[0], -1, *w.shape[2:])  # (o2, i2, k, k)
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).view(self.lokr_w2_a.shape[0], -1, *w.shape[2:])
        w1 = self.lokr_w1.view(*self.lokr_w1.shape, *([1] * (w.ndim - 2)))  # (o1, i1, 1, 1)
        return torch.kron(w1, w2)  # (o1·o2, i1·i2, k, k)


KINDS = {"lora": LoRA, "loha": LoHa, "lokr": LoKr}
