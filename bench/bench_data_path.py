"""The data path: does the model ever wait on data? Step time with the cache loader vs on pre-made tensors,
and the epoch over cached latents vs encoding every batch on the fly.

Setup (as `bench/bench_cache.py`): a shapes data set in a temp folder, cached once with a random
`small`-preset VAE and the default text encoder (the timing does not depend on the weights).

Step time, three arms interleaved, one sample = one optimizer step of the `small` UNet
(`train_step` + backward + AdamW from `make_optimizer`, batch 16):
  model only     the same pre-made batch and draws (t, ε) every step: no data work at all
  DataLoader     `DataLoader(LatentDataset(cache))` (shuffled, batch 16, main process) -> draws -> step
  train stream   what `latentforge train` does: `train.data.Stream(LatentDataset).batch(positions)` -> draws -> step
Goal: loader step / model-only step ≤ 1.05.

With aspect-ratio buckets (`--buckets`): the shapes drawn on 80x48, 48x80 and 64x64 canvases, cached
with `buckets=BucketSpec(step=16)` at the area 64²; two arms interleaved on the same sequence of
bucket shapes:
  model only     the first K batches of the bucketed stream made up front (with their draws), replayed in order
  bucket stream  what `latentforge train` does on a bucketed cache: `BucketStream(LatentDataset).batch(positions)`

Epoch ratio: `bench_cache.epoch_on_the_fly` vs `bench_cache.epoch_cached`, interleaved; goal ≥ 5×.

    .venv/bin/python bench/bench_data_path.py [--n 64] [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cache  # noqa: E402  (the cached and on-the-fly epoch functions)
import bench_common as common  # noqa: E402

from latentforge.config import PRESETS, TrainConfig, replace  # noqa: E402
from latentforge.data import shapes, sources  # noqa: E402
from latentforge.data.cache import BucketSpec, LatentDataset, build_cache  # noqa: E402
from latentforge.models import AutoencoderKL, UNet  # noqa: E402
from latentforge.schedule import NoiseSchedule  # noqa: E402
from latentforge.train.data import BucketStream, Stream  # noqa: E402
from latentforge.train.setup import make_optimizer  # noqa: E402
from latentforge.train.step import Batch, draw, train_step  # noqa: E402


def make_cache(root: Path, n: int, size: int, vae) -> str:
    data, cache = str(root / "data"), str(root / "cache")
    shapes.write_dataset(data, n, size=size, seed=0)
    build_cache(data, vae, "default", cache, size=size, batch_size=16, progress=False)
    return cache


def step_arms(cache: str, preset: str, batch: int, device: torch.device) -> dict:
    ds = LatentDataset(cache)
    item = ds[0]
    C, h, w = item["latent"].shape
    cfg = replace(TrainConfig(), batch_size=batch,
                  unet=replace(PRESETS[preset].unet, in_channels=C, out_channels=C, sample_size=h,
                               cross_attention_dim=item["context"].shape[-1]))
    torch.manual_seed(0)
    unet = UNet(cfg.unet).to(device).train()
    opt = make_optimizer(unet, cfg, device)
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod.to(device)

    def step(b: Batch, positions) -> None:
        draws = draw(cfg, positions, (C, h, w), ac.shape[0])  # per-sample t, ε, dropout coin (the loop's)
        loss = train_step(unet, b.to(device), draws, ac)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # model only: one batch and its draws made up front
    fixed = Batch(latent=torch.stack([ds[i % len(ds)]["latent"] for i in range(batch)]),
                  context=torch.stack([ds[i % len(ds)]["context"] for i in range(batch)]))
    fixed_draws = draw(cfg, list(range(batch)), (C, h, w), ac.shape[0])

    def model_only():
        loss = train_step(unet, fixed, fixed_draws, ac)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)
    state = {"it": iter(loader), "pos": 0}

    def with_dataloader():
        try:
            items = next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            items = next(state["it"])
        state["pos"] += batch
        step(Batch(latent=items["latent"], context=items["context"]), range(state["pos"] - batch, state["pos"]))

    stream, spos = Stream(ds, cfg.seed), {"step": 0}

    def with_stream():
        positions = stream.positions(spos["step"], 0, 1, batch, 0, 1)
        spos["step"] += 1
        step(stream.batch(positions), positions)

    return {"model only": model_only, "DataLoader(LatentDataset)": with_dataloader, "train stream": with_stream}


def run(n: int = 64, size: int = 64, batch: int = 16, preset: str = "small", repeats: int = 5, warmup: int = 1,
        epoch_repeats: int = 3, device: str = "cpu", progress: bool = True) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["small"].vae).eval()
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp), n, size, vae)
        samples = common.interleaved(step_arms(cache, preset, batch, dev), batch, repeats, warmup, dev, progress)
        items, _ = sources.scan(str(Path(tmp) / "data"))
        fly, cached = [], []
        bench_cache.epoch_cached(cache, batch)  # warm the page cache and the imports
        for _ in range(epoch_repeats):
            fly.append(bench_cache.epoch_on_the_fly(items, vae, size, batch))
            cached.append(bench_cache.epoch_cached(cache, batch))
    base = samples["model only"]
    arms = {name: {"ms_per_step_wall": 1e3 * s.median("wall"), "ms_per_step_cpu": 1e3 * s.median("cpu"),
                   "ratio_wall": s.median("wall") / base.median("wall"), "ratio_cpu": s.median("cpu") / base.median("cpu"),
                   "paired_ratio_wall": common.paired_ratio(base, s, "wall"),
                   "paired_ratio_cpu": common.paired_ratio(base, s, "cpu"), "wall": s.wall, "cpu": s.cpu}
            for name, s in samples.items()}
    return {"n": n, "size": size, "batch": batch, "preset": preset, "repeats": repeats, "steps": arms,
            "epoch": {"on_the_fly_s": statistics.median(fly), "cached_s": statistics.median(cached),
                      "ratio": statistics.median(fly) / statistics.median(cached), "fly": fly, "cached": cached,
                      "images": n}}


def markdown(r: dict) -> str:
    rows = [[name, common.fmt(a["ms_per_step_wall"], 0), common.fmt(a["ms_per_step_cpu"], 0),
             f"**{a['ratio_wall']:.3f}×**", f"**{a['ratio_cpu']:.3f}×**",
             f"{a['paired_ratio_wall']:.3f}× / {a['paired_ratio_cpu']:.3f}×"] for name, a in r["steps"].items()]
    e = r["epoch"]
    return "\n".join([
        common.table(["arm", "ms/step (wall)", "ms/step (CPU time)", "vs model only (wall)", "vs model only (CPU time)",
                      "paired ratio wall / CPU"], rows),
        "",
        common.table(["epoch of " + str(e["images"]) + " images", "seconds (median)"],
                     [["encode each batch on the fly (decode png, resize, VAE.encode)", f"{e['on_the_fly_s']:.3f}"],
                      ["cached latents (LatentDataset + DataLoader)", f"{e['cached_s']:.3f}"],
                      ["**ratio**", f"**{e['ratio']:.0f}×** (goal ≥ 5×)"]]),
    ])


CANVASES = [(80, 48), (48, 80), (64, 64)]


def bucket_arms(cache: str, preset: str, batch: int, device: torch.device, rounds: int) -> dict:
    """model only vs the bucketed train stream, both walking the same bucket sequence (one step per call)."""
    ds = LatentDataset(cache)
    item = ds[0]
    C = item["latent"].shape[0]
    cfg = replace(TrainConfig(), batch_size=batch,
                  unet=replace(PRESETS[preset].unet, in_channels=C, out_channels=C,
                               cross_attention_dim=item["context"].shape[-1]))
    torch.manual_seed(0)
    unet = UNet(cfg.unet).to(device).train()
    opt = make_optimizer(unet, cfg, device)
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod.to(device)
    stream = BucketStream(ds, cfg.seed, batch)

    def step(b: Batch, draws) -> None:
        loss = train_step(unet, b.to(device), draws, ac)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fetch(k: int):
        positions = stream.positions(k, 0, 1, batch, 0, 1)
        b = stream.batch(positions)
        return b, draw(cfg, positions, b.latent.shape[1:], ac.shape[0])

    made = [fetch(k) for k in range(rounds)]  # the same batches and draws, made up front
    counters = {"fixed": 0, "stream": 0}

    def model_only():
        b, d = made[counters["fixed"] % rounds]
        counters["fixed"] += 1
        step(b, d)

    def with_stream():
        k = counters["stream"] % rounds
        counters["stream"] += 1
        step(*fetch(k))

    return {"model only": model_only, "bucket stream": with_stream}, sorted(set(ds.buckets))


def run_buckets(n: int = 64, batch: int = 16, preset: str = "small", repeats: int = 5, warmup: int = 1,
                device: str = "cpu", progress: bool = True) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    vae = AutoencoderKL(PRESETS["small"].vae).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = str(Path(tmp) / "data"), str(Path(tmp) / "cache")
        shapes.write_dataset(data, n, seed=0, canvases=CANVASES)
        build_cache(data, vae, "default", cache, size=64, batch_size=16, progress=False, buckets=BucketSpec(step=16))
        arms, names = bucket_arms(cache, preset, batch, dev, warmup + repeats)
        samples = common.interleaved(arms, batch, repeats, warmup, dev, progress)
    base, s = samples["model only"], samples["bucket stream"]
    return {"n": n, "batch": batch, "preset": preset, "repeats": repeats, "buckets": names,
            "ms_model_only_cpu": 1e3 * base.median("cpu"), "ms_stream_cpu": 1e3 * s.median("cpu"),
            "ratio_wall": s.median("wall") / base.median("wall"), "ratio_cpu": s.median("cpu") / base.median("cpu"),
            "paired_ratio_wall": common.paired_ratio(base, s, "wall"),
            "paired_ratio_cpu": common.paired_ratio(base, s, "cpu"),
            "wall": {"model only": base.wall, "bucket stream": s.wall}, "cpu": {"model only": base.cpu, "bucket stream": s.cpu}}


def markdown_buckets(r: dict) -> str:
    return common.table(
        ["arm (buckets " + ", ".join(r["buckets"]) + ")", "ms/step (CPU time)", "vs model only (wall)",
         "vs model only (CPU time)", "paired ratio wall / CPU"],
        [["model only", common.fmt(r["ms_model_only_cpu"], 0), "1.000×", "1.000×", "1.000× / 1.000×"],
         ["bucket stream", common.fmt(r["ms_stream_cpu"], 0), f"**{r['ratio_wall']:.3f}×**", f"**{r['ratio_cpu']:.3f}×**",
          f"{r['paired_ratio_wall']:.3f}× / {r['paired_ratio_cpu']:.3f}×"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images in the data set")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--preset", default="small")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--epoch-repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--buckets", action="store_true", help="only the aspect-ratio bucket arms")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.buckets:
        r = run_buckets(args.n, args.batch, args.preset, args.repeats, args.warmup, args.device)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
        print(markdown_buckets(r))
        return 0
    r = run(args.n, args.size, args.batch, args.preset, args.repeats, args.warmup, args.epoch_repeats, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
