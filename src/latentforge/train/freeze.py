"""`unet.freeze`: which UNet parameters are not trained (fine-tuning only part of a pretrained model).

Patterns are shell-style (fnmatch) on parameter names as in the state_dict (`down_blocks.1.attentions.0...`),
applied in order like .gitignore lines: a pattern freezes what it matches, `!pattern` trains it again.

    ["*", "!*attn*"]            train only the attention layers (attn1 = self-, attn2 = cross-attention)
    ["down_blocks.*"]           keep the encoder half as it is

A frozen parameter gets `requires_grad=False`: it has no gradient, so AdamW neither updates nor
weight-decays it and keeps no state for it, and DDP does not all-reduce it; it stays bitwise equal to the
weights the run started from.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Sequence, Set

import torch

from ..errors import UserError


def frozen_names(names: Iterable[str], patterns: Sequence[str]) -> Set[str]:
    """The names the patterns leave frozen; a pattern that matches no name is a UserError (a typo)."""
    names = list(names)
    frozen: Set[str] = set()
    for pattern in patterns:
        keep = pattern.startswith("!")
        body = pattern[1:] if keep else pattern
        hits = {n for n in names if fnmatchcase(n, body)}
        if not hits:
            example = names[len(names) // 2] if names else "(none)"
            raise UserError(f"unet.freeze: {pattern!r} matches no UNet parameter — patterns match names like "
                            f"{example!r}; `*` matches anything, `!pattern` trains again")
        frozen = frozen - hits if keep else frozen | hits
    return frozen


def apply_freeze(model: torch.nn.Module, patterns: Sequence[str]) -> int:
    """Set requires_grad from `patterns`; returns the number of trained parameters (elements)."""
    frozen = frozen_names((n for n, _ in model.named_parameters()), patterns)
    trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
        trained += 0 if name in frozen else p.numel()
    if trained == 0:
        raise UserError(f"unet.freeze={list(patterns)}: freezes every parameter — nothing would be trained; "
                        "add a `!pattern` for what should train")
    return trained
