"""One box or many, on PyTorch's own engine: torchrun env -> process group -> DDP.

    torchrun --nproc_per_node=2 -m latentforge train --cache C --out R          (one machine)
    torchrun --nnodes=2 --node_rank=K --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
             --nproc_per_node=8 -m latentforge train ...                        (several)

Backend: gloo on CPU, nccl on CUDA. Only rank 0 writes files; every rank keeps its own RNG.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; start the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA device is available — use device=cpu or device=auto")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local, dev)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Per-rank RNG: python, numpy and torch seeded by (seed, rank)."""
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around `model` when running on several processes (gradients averaged across ranks)."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def mean(value: float, d: Dist) -> float:
    """Average of a python float over ranks."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world_size


def mean_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average of a tensor over ranks, left on the device (no host read)."""
    if not d.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / d.world_size


def max_int(value: int, d: Dist) -> int:
    """The largest of an int over ranks, on every rank (e.g. a stop signal's number, 0 where none arrived)."""
    if not d.enabled:
        return value
    t = torch.tensor([int(value)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_json(obj, d: Dist) -> list:
    """Every rank's JSON-able `obj`, in rank order (on every rank). JSON bytes, never pickle."""
    if not d.enabled:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=d.device)
    n = torch.tensor([data.numel()], device=d.device)
    sizes = [torch.zeros_like(n) for _ in range(d.world_size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=d.device)
    padded[: data.numel()] = data
    out = [torch.zeros_like(padded) for _ in range(d.world_size)]
    dist.all_gather(out, padded)
    return [json.loads(bytes(o[: int(s.item())].tolist()).decode()) for o, s in zip(out, sizes)]


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
