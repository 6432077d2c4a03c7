"""The data stream: a deterministic order over the cache, split across ranks, and batch assembly.

The stream is every item of epoch 0 in a permutation seeded by (seed, 0), then epoch 1 in a
permutation seeded by (seed, 1), ... . Optimizer step s, micro-step m reads positions
[(s·A + m)·B, (s·A + m + 1)·B) of it (B = global batch, A = grad accumulation) and rank r takes its
contiguous B/W share. An epoch thus shows every cached latent exactly once, each with a fresh t
(the draws depend on the position), and "where are we" is one integer: the data position.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .step import Batch, mix


class Stream:
    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.n = dataset, seed, len(dataset)
        self._perms: dict = {}

    def index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(mix(self.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}  # keep only the current one
        return self._perms[epoch][i]

    def positions(self, step: int, micro: int, accum: int, batch_size: int, rank: int, world: int) -> List[int]:
        share = batch_size // world
        start = (step * accum + micro) * batch_size + rank * share
        return list(range(start, start + share))

    def batch(self, positions: List[int]) -> Batch:
        items = [self.dataset[self.index(p)] for p in positions]
        return collate(items, positions)


def collate(items: List[dict], positions: Optional[List[int]] = None) -> Batch:
    """Stack dataset items (dict(latent, context, mask, label, id)) into a Batch."""
    def stack(key):
        values = [it.get(key) for it in items]
        if any(v is None for v in values):
            return None
        return torch.stack([torch.as_tensor(v) for v in values])

    label = stack("label")
    if label is not None and (label < 0).any():
        label = None  # -1 = "no label": an unconditional item
    return Batch(latent=stack("latent").float(), context=stack("context"), mask=stack("mask"),
                 label=None if label is None else label.long(), ids=[str(it.get("id")) for it in items],
                 positions=positions)


class InMemoryLatents(torch.utils.data.Dataset):
    """Latents (and optional contexts / labels) held in tensors; items like data.cache.LatentDataset.

    For tests, benchmarks and library users who already have latents in memory.
    """

    def __init__(self, latents, contexts=None, masks=None, labels=None, ids=None, null_context=None,
                 null_mask=None, num_classes: Optional[int] = None):
        self.latents, self.contexts, self.masks, self.labels = latents, contexts, masks, labels
        self.ids = ids or [f"{i:06d}" for i in range(len(latents))]
        self.null_context, self.null_mask = null_context, null_mask
        self.num_classes = num_classes if num_classes is not None else (
            int(labels.max()) + 1 if labels is not None else None)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        pick = lambda x: None if x is None else x[i]  # noqa: E731
        label = pick(self.labels)
        return {"latent": self.latents[i], "context": pick(self.contexts), "mask": pick(self.masks),
                "label": None if label is None else int(label), "id": self.ids[i]}
