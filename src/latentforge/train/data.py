"""The data stream: a deterministic order over the cache, split across ranks, and batch assembly.

The stream is every item of epoch 0 in a permutation seeded by (seed, 0), then epoch 1 in a
permutation seeded by (seed, 1), ... . Optimizer step s, micro-step m reads positions
[(s·A + m)·B, (s·A + m + 1)·B) of it (B = global batch, A = grad accumulation) and rank r takes its
contiguous B/W share. An epoch thus shows every cached latent exactly once, each with a fresh t
(the draws depend on the position), and "where are we" is one integer: the data position.

A bucketed cache (items of several latent shapes, `dataset.buckets`) uses `BucketStream` instead:
every global batch comes from one bucket, with the same position arithmetic (see its docstring).
`make_stream` picks the one the dataset needs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..config import BUCKET_LEFTOVERS
from ..errors import UserError
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
        return collate(items)


class BucketStream(Stream):
    """Batches that each come from one bucket, in an order that is a function of (seed, position).

    Bucket b (n_b items) has its own stream: permutation P_b,0 of its items, then P_b,1, ...; its
    k-th batch is items [kB, (k+1)B) of that stream (B = global batch). With leftovers="carry" a
    batch may start at the end of one permutation and finish in the next: the images that did not
    fill a batch are carried over, and P_b,e is reordered so that no carried image is drawn again
    into the same batch (never a repeat). With "drop" every permutation is cut into ⌊n_b/B⌋ batches
    and the rest (`dropped(epoch)`) is not shown that epoch. Epoch e is the batches of every bucket
    that end inside P_b,e, shuffled by (seed, e): each image once per epoch (a carried one at the start
    of the next). Global batch g = position // B; every rank reads its share of the same batch, so
    DDP ranks always take the same bucket at the same step. Buckets with fewer than B images cannot
    fill a batch without repeats and are left out (`excluded`).
    """

    def __init__(self, dataset, seed: int, batch_size: int, leftovers: str = "carry"):
        super().__init__(dataset, seed)
        if leftovers not in BUCKET_LEFTOVERS:
            raise UserError(f"bucket_leftovers={leftovers!r}: choose one of {', '.join(BUCKET_LEFTOVERS)}")
        self.B, self.leftovers = batch_size, leftovers
        groups: Dict[str, List[int]] = {}
        for i, name in enumerate(dataset.buckets):
            groups.setdefault(name, []).append(i)
        self.excluded = {b: len(ix) for b, ix in sorted(groups.items()) if len(ix) < batch_size}
        self.groups = {b: ix for b, ix in sorted(groups.items()) if len(ix) >= batch_size}
        if not self.groups:
            raise UserError(f"batch_size={batch_size}: no bucket has that many images (largest: "
                            f"{max(map(len, groups.values()))}) — lower batch_size or add images")
        self._epoch: Tuple[int, List[Tuple[str, int]], int] = (-1, [], 0)  # (epoch, its batches, first g)
        self._perm: Dict[str, Dict[int, List[int]]] = {}  # bucket -> {epoch: its permutation}

    def _count(self, b: str, e: int) -> int:
        """Batches of bucket b that end in epochs < e."""
        n = len(self.groups[b])
        return e * (n // self.B) if self.leftovers == "drop" else e * n // self.B

    def batches_before(self, e: int) -> int:
        return sum(self._count(b, e) for b in self.groups)

    def epoch_batches(self, e: int) -> List[Tuple[str, int]]:
        """(bucket, k) of epoch e, in their shuffled order."""
        order = [(b, k) for b in self.groups for k in range(self._count(b, e), self._count(b, e + 1))]
        g = torch.Generator().manual_seed(mix(self.seed, "bucket-order", e))
        return [order[i] for i in torch.randperm(len(order), generator=g).tolist()]

    def batch_at(self, g: int) -> Tuple[str, int]:
        e, order, first = self._epoch
        if not first <= g < first + len(order):
            e = max(0, g * self.B // len(self.dataset) - 1)
            while self.batches_before(e + 1) <= g:
                e += 1
            while self.batches_before(e) > g:
                e -= 1
            order, first = self.epoch_batches(e), self.batches_before(e)
            self._epoch = (e, order, first)
        return order[g - first]

    def index(self, position: int) -> int:
        g, j = divmod(position, self.B)
        b, k = self.batch_at(g)
        if self.leftovers == "drop":
            per = len(self.groups[b]) // self.B
            return self.permutation(b, k // per)[(k % per) * self.B + j]
        e, i = divmod(k * self.B + j, len(self.groups[b]))
        return self.permutation(b, e)[i]

    def _raw(self, b: str, e: int) -> List[int]:
        ix = self.groups[b]
        g = torch.Generator().manual_seed(mix(self.seed, "bucket", b, e))
        return [ix[i] for i in torch.randperm(len(ix), generator=g).tolist()]

    def permutation(self, b: str, e: int) -> List[int]:
        """P_b,e (dataset indices). Carry: the images carried from P_b,e-1 move out of the first batch."""
        known = self._perm.setdefault(b, {})
        if e not in known:
            start = max((k for k in known if k < e), default=0)
            perm = known.get(start) or self._raw(b, 0)
            n = len(self.groups[b])
            while start < e:
                start += 1
                raw = self._raw(b, start)
                c = start * n % self.B if self.leftovers == "carry" else 0  # images carried into this epoch
                carried = set(perm[n - c:]) if c else set()
                head = [i for i in raw if i not in carried][: self.B - c] if c else []
                taken = set(head)
                perm = head + [i for i in raw if i not in taken]
            known[e] = perm
            for k in [k for k in known if k not in (e - 1, e, e + 1)]:  # a carried batch reads two epochs
                del known[k]
        return known[e]

    def dropped(self, e: int) -> List[str]:
        """Ids not shown in epoch e (drop mode: each bucket's last n_b mod B; always: excluded buckets)."""
        out = [self.dataset_id(i) for b in self.excluded for i in self._all(b)]
        if self.leftovers == "drop":
            for b, ix in self.groups.items():
                out += [self.dataset_id(i) for i in self.permutation(b, e)[len(ix) // self.B * self.B:]]
        return out

    def _all(self, b: str) -> List[int]:
        return [i for i, name in enumerate(self.dataset.buckets) if name == b]

    def dataset_id(self, i: int) -> str:
        ids, entries = getattr(self.dataset, "ids", None), getattr(self.dataset, "entries", None)
        return str(ids[i]) if ids is not None else str(entries[i]["id"]) if entries is not None else str(
            self.dataset[i]["id"])

    def summary(self) -> str:
        """One line for the run report: buckets, leftover policy, what is not shown."""
        sizes = ", ".join(f"{b}: {len(ix)}" for b, ix in self.groups.items())
        per_epoch = sum(len(ix) % self.B for ix in self.groups.values()) if self.leftovers == "drop" else 0
        text = f"{len(self.groups)} buckets ({sizes}); leftovers {self.leftovers}"
        if per_epoch:
            text += f", {per_epoch} images dropped per epoch"
        if self.excluded:
            text += "; not trained (fewer images than batch_size): " + ", ".join(
                f"{b}: {n}" for b, n in self.excluded.items())
        return text


def make_stream(dataset, seed: int, batch_size: int, leftovers: str = "carry") -> Stream:
    """The bucketed stream for a dataset with `buckets` (several latent shapes), else the plain one."""
    if getattr(dataset, "buckets", None):
        return BucketStream(dataset, seed, batch_size, leftovers)
    return Stream(dataset, seed)


def collate(items: List[dict]) -> Batch:
    """Stack dataset items (dict(latent, context, mask, label, id)) into a Batch."""
    def stack(key):
        values = [it.get(key) for it in items]
        if any(v is None for v in values):
            return None
        return torch.stack([torch.as_tensor(v) for v in values])

    label = stack("label")
    if label is not None and (label < 0).any():
        label = None  # -1 = "no label": an unconditional item
    captions = [it.get("caption") for it in items]
    return Batch(latent=stack("latent").float(), context=stack("context"), mask=stack("mask"),
                 label=None if label is None else label.long(), ids=[str(it.get("id")) for it in items],
                 pooled=stack("pooled"), time_ids=stack("time_ids"),
                 captions=None if None in captions else [str(c) for c in captions])


class InMemoryLatents(torch.utils.data.Dataset):
    """Latents (and optional contexts / labels) held in tensors; items like data.cache.LatentDataset.

    For tests, benchmarks and library users who already have latents in memory. `latents` may be a
    list of (C, h, w) tensors of several shapes: items are then bucketed by shape (`buckets`).
    """

    def __init__(self, latents, contexts=None, masks=None, labels=None, ids=None, null_context=None,
                 null_mask=None, num_classes: Optional[int] = None, captions=None):
        self.latents, self.contexts, self.masks, self.labels = latents, contexts, masks, labels
        self.captions = captions
        self.ids = ids or [f"{i:06d}" for i in range(len(latents))]
        # a list of latents of several shapes is bucketed by shape ("<h>x<w>" of the latent)
        shapes = {tuple(x.shape) for x in latents} if isinstance(latents, (list, tuple)) else set()
        self.buckets = [f"{x.shape[-2]}x{x.shape[-1]}" for x in latents] if len(shapes) > 1 else None
        self.null_context, self.null_mask = null_context, null_mask
        self.num_classes = num_classes if num_classes is not None else (
            int(labels.max()) + 1 if labels is not None else None)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        pick = lambda x: None if x is None else x[i]  # noqa: E731
        label = pick(self.labels)
        return {"latent": self.latents[i], "context": pick(self.contexts), "mask": pick(self.masks),
                "label": None if label is None else int(label), "id": self.ids[i], "caption": pick(self.captions)}
