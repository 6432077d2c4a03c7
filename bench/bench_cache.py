"""How much faster is an epoch over the latent cache than encoding each batch on the fly?

    .venv/bin/python bench/bench_cache.py [--n 256] [--size 64] [--batch-size 32] [--threads 1]

Writes a shapes data set to a temp folder, builds the cache once with a random `small`-preset VAE
(timing is independent of the weights), then times one epoch of batches each way:
  cached:   LatentDataset (memory-mapped shards) -> DataLoader -> (B, C, h, w) latents + contexts
  on the fly: decode png -> resize/crop -> tensor -> VAE.encode, per batch
and prints the ratio (goal >= 5x). Not a test; under a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from latentforge.config import preset  # noqa: E402
from latentforge.data import shapes, sources  # noqa: E402
from latentforge.data.cache import LatentDataset, build_cache  # noqa: E402
from latentforge.data.images import load_image, to_tensor  # noqa: E402
from latentforge.models import AutoencoderKL  # noqa: E402


def epoch_cached(cache_dir: str, batch_size: int) -> float:
    ds = LatentDataset(cache_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
    t = time.perf_counter()
    n = sum(batch["latent"].shape[0] for batch in loader)
    assert n == len(ds)
    return time.perf_counter() - t


@torch.no_grad()
def epoch_on_the_fly(items, vae, size: int, batch_size: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(items), batch_size):
        x = torch.stack([to_tensor(load_image(it.path, size)) for it in items[i:i + batch_size]])  # (B, 3, H, W)
        vae.encode(x)  # (B, C, h, w)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(preset("small").vae).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = os.path.join(tmp, "data"), os.path.join(tmp, "cache")
        shapes.write_dataset(data, args.n, size=args.size, seed=0)
        t = time.perf_counter()
        build_cache(data, vae, "default", cache, size=args.size, batch_size=args.batch_size, progress=False)
        t_build = time.perf_counter() - t
        items, _ = sources.scan(data)
        t_fly = epoch_on_the_fly(items, vae, args.size, args.batch_size)
        t_cached = epoch_cached(cache, args.batch_size)
    print(f"{args.n} images {args.size}px, batch {args.batch_size}, {args.threads} thread(s), VAE 'small' "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params)")
    print(f"one-off cache build (incl. text encoder load): {t_build:.2f} s")
    print(f"epoch encoding on the fly: {t_fly:.3f} s")
    print(f"epoch over cached latents: {t_cached:.3f} s")
    print(f"ratio: {t_fly / t_cached:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
