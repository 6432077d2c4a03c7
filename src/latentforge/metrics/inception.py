"""The FID Inception-v3 feature extractor (pool3, 2048-d), in pytorch-fid's weight layout.

FID is only comparable across papers when computed with the TensorFlow Inception graph of
2015-12-05 (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule…"). pytorch-fid
ported those weights to `pt_inception-2015-12-05-6726825d.pth`; this file rebuilds the network
so that state dict loads with its own key names (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.…`, `fc.…`).

Why our own copy: torch-fidelity, torchmetrics' FID and pytorch-fid all import torchvision, whose
PyPI wheel does not load beside this project's torch build. The network is ~150 lines of plain
torch. The FID-specific patches to torchvision's Inception3 are kept and marked:
  - A/C/E blocks: the pooling branch averages without counting the zero padding (TF semantics);
  - the last E block (Mixed_7c) max-pools in its pooling branch instead of average pooling.

Weights are read only from a local file (never downloaded): the flag `--inception-weights FILE`
or the environment variable LATENTFORGE_INCEPTION_WEIGHTS.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

ENV_VAR = "LATENTFORGE_INCEPTION_WEIGHTS"
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU, as in TF-slim's Inception."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TF's 3x3 average pool ignores the padded zeros (FID patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)  # (B, 480 + cin, H', W')


class InceptionC(nn.Module):  # Mixed_6b..e, 17x17, factorised 7x7
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):  # Mixed_7b/c, 8x8, expanded filter banks
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # FID patch: Mixed_7c max-pools in its pooling branch
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)  # (B, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """Images in [-1, 1], any size -> pool3 features (B, 2048). Attribute names = the state dict's."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)  # the logits layer; unused for FID, kept so the file loads

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, H, W) in [-1, 1] — the range the TF graph expects after its own scaling
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048): pool3


def missing_weights_message() -> str:
    return (
        f"--inception-weights: no FID Inception weights given — download {WEIGHTS_NAME} "
        f"(pytorch-fid's port of the TF FID graph, {WEIGHTS_URL}) and pass it with "
        f"--inception-weights FILE or set {ENV_VAR}=FILE"
    )


def resolve_weights(path: str | os.PathLike | None) -> Path:
    """The weights file from the flag, else the environment variable; a UserError if neither exists."""
    chosen = path or os.environ.get(ENV_VAR)
    if not chosen:
        raise UserError(missing_weights_message())
    p = Path(chosen).expanduser()
    if not p.is_file():
        src = "--inception-weights" if path else ENV_VAR
        raise UserError(f"{src}: {p} does not exist — {missing_weights_message().split(' — ', 1)[1]}")
    return p


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a code-running pickle; it never ran
        raise UserError(f"{path}: refused — the file's pickle holds more than tensors (weights_only=True) — "
                        f"use {WEIGHTS_NAME} or a .safetensors copy of it") from None
    except Exception as e:  # a corrupt or non-tensor file: the user's to fix
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path}: cannot read Inception weights ({type(e).__name__}: {first_line}) — "
                        f"expected {WEIGHTS_NAME} or a .safetensors copy of it") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: not a state dict — expected {WEIGHTS_NAME}")
    return sd


def load_state_dict_strict(model: nn.Module, sd: dict, path: Path) -> None:
    """Every key and shape must match (BatchNorm's num_batches_tracked may be absent, as in the .pth)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(sd) - optional)
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise UserError(f"{path}: not the FID Inception weights ({what}; {len(missing)} missing, "
                        f"{len(unexpected)} unexpected) — expected {WEIGHTS_NAME}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise UserError(f"{path}: key {k} has shape {tuple(v.shape)}, expected "
                            f"{tuple(expected[k])} — expected {WEIGHTS_NAME}")
    model.load_state_dict(sd, strict=False)  # strictness checked above, incl. optional buffers


def load_inception(path: str | os.PathLike | None = None) -> FIDInceptionV3:
    """The extractor in eval mode with the weights from `path` (or $LATENTFORGE_INCEPTION_WEIGHTS)."""
    p = resolve_weights(path)
    model = FIDInceptionV3()
    load_state_dict_strict(model, _read_state_dict(p), p)
    return model.eval().requires_grad_(False)
