"""Text→image at 20 steps: latentforge `Pipeline` vs diffusers `StableDiffusionPipeline`, same folder.

The model folder is written by latentforge (`formats.save_model_folder`): a random UNet and VAE of
a preset plus a small random CLIP text encoder with a character-level BPE vocabulary (nothing is
downloaded), and both pipelines load that same folder. Both run DPM++ 2M (diffusers:
`DPMSolverMultistepScheduler.from_config` of the folder's scheduler config) with classifier-free
guidance and decode to PIL images. Before timing, one call of each from the same starting noise is
compared (max |Δ| of the images in [0, 1]).

    .venv/bin/python bench/bench_text2img.py [--preset small] [--steps 20] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
import bench_unet  # noqa: E402

from latentforge.config import PRESETS, ScheduleConfig  # noqa: E402
from latentforge.formats import save_model_folder  # noqa: E402
from latentforge.models import AutoencoderKL, UNet  # noqa: E402
from latentforge.pipelines import Pipeline  # noqa: E402
from latentforge.text import TextEncoder  # noqa: E402

PROMPT = "a red circle on a white background"
NEGATIVE = ""


def write_clip(folder: Path, dim: int, layers: int = 2, seed: int = 0) -> TextEncoder:
    """A random CLIP text model of width `dim` and a character-level CLIP BPE tokenizer (no merges)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase] + \
        ["<unk>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<unk>",
                  pad_token="<|endoftext|>", model_max_length=77).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
                         num_attention_heads=max(1, dim // 64), max_position_embeddings=77,
                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    CLIPTextModel(cfg).save_pretrained(folder)
    return TextEncoder.from_pretrained(str(folder))


def write_model(folder: Path, preset: str = "small", seed: int = 0, text_layers: int = 2) -> Path:
    """A latentforge model folder with random weights (perturbed off the init) and a CLIP encoder of `text_layers`."""
    p = PRESETS[preset]
    torch.manual_seed(seed)
    unet, vae = UNet(p.unet), AutoencoderKL(p.vae)
    with torch.no_grad():
        for m in (unet, vae):
            for w in m.parameters():
                w.add_(torch.randn_like(w) * 0.02)
    text = write_clip(folder.parent / f"{folder.name}-clip", p.unet.cross_attention_dim, layers=text_layers)
    return save_model_folder(folder, unet, vae, ScheduleConfig(), text_encoder=text)


def load_pair(folder: Path, device: torch.device):
    return Pipeline.from_pretrained(folder, device=device), load_diffusers(folder, device)


def load_diffusers(folder: Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """diffusers' StableDiffusionPipeline of the folder with DPM++ 2M, in `dtype` (bf16: its documented
    `torch_dtype` loading, every component in bf16)."""
    import diffusers

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                               requires_safety_checker=False, torch_dtype=dtype)
    theirs = theirs.to(device)
    theirs.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def run(preset: str = "small", steps: int = 20, batch: int = 4, cfg: float = 7.5, repeats: int = 5, warmup: int = 1,
        device: str = "cpu", progress: bool = True, bf16: bool = True, profile: bool = True,
        folder: Path = None, diffusers_bf16: bool = False) -> dict:
    """latentforge vs diffusers at fp32 (same images), plus (`bf16`) latentforge with its UNet in bf16
    (`Pipeline.compute_in(torch.bfloat16)`) as a third arm of the same rounds, with its image difference, and
    (`profile`, CPU) where the time of one call goes, by aten op, for the two fp32 arms. `folder`: a model
    folder to use (default: a random one of `preset`); `diffusers_bf16`: diffusers in bf16 as a fourth arm."""
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or write_model(Path(tmp) / "model", preset)
        ours, theirs = load_pair(folder, dev)
        low = Pipeline.from_pretrained(folder, device=dev).compute_in(torch.bfloat16) if bf16 else None
        theirs_low = load_diffusers(folder, dev, torch.bfloat16) if diffusers_bf16 else None
    side = ours.default_size[0]
    latents = torch.randn(batch, ours.unet.config.in_channels, side // ours.vae.downsample_factor,
                          side // ours.vae.downsample_factor, generator=torch.Generator().manual_seed(0))
    common_kw = dict(steps=steps, cfg=cfg, n=batch, size=(side, side), progress=False)
    a = ours.text2img(PROMPT, negative_prompt=NEGATIVE, latents=latents, output="pt", **common_kw)
    b = theirs([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps, guidance_scale=cfg,
               height=side, width=side, latents=latents.to(dev), output_type="pt").images
    diff = float((a.cpu() - b.cpu()).abs().max())

    arms = {
        "latentforge": lambda: ours.text2img(PROMPT, negative_prompt=NEGATIVE, seed=0, **common_kw),
        "diffusers": lambda: theirs([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps,
                                    guidance_scale=cfg, height=side, width=side,
                                    generator=[torch.Generator().manual_seed(i) for i in range(batch)]).images,
    }
    if low is not None:
        arms["latentforge bf16"] = lambda: low.text2img(PROMPT, negative_prompt=NEGATIVE, seed=0, **common_kw)
    if theirs_low is not None:
        arms["diffusers bf16"] = lambda: theirs_low([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch,
                                                    num_inference_steps=steps, guidance_scale=cfg, height=side,
                                                    width=side, generator=[torch.Generator().manual_seed(i)
                                                                           for i in range(batch)]).images
    samples = common.interleaved(arms, batch, repeats, warmup, dev, progress)
    la, di = samples["latentforge"], samples["diffusers"]
    extra = {}
    if low is not None:
        c = low.text2img(PROMPT, negative_prompt=NEGATIVE, latents=latents, output="pt", **common_kw).cpu()
        lb = samples["latentforge bf16"]
        extra["bf16"] = {"images_per_s": lb.rate("wall"), "images_per_cpu_s": lb.rate("cpu"), "wall": lb.wall,
                         "cpu": lb.cpu, "vs_fp32_cpu": common.paired_ratio(lb, la, "cpu"),
                         "vs_fp32_wall": common.paired_ratio(lb, la, "wall"),
                         "vs_diffusers_cpu": common.paired_ratio(lb, di, "cpu"),
                         "max_abs_diff": float((c - a.cpu()).abs().max()),
                         "mean_abs_diff": float((c - a.cpu()).abs().mean())}
    if theirs_low is not None:
        db = samples["diffusers bf16"]
        extra["diffusers_bf16"] = {"images_per_s": db.rate("wall"), "images_per_cpu_s": db.rate("cpu"),
                                   "wall": db.wall, "cpu": db.cpu}
        if low is not None:
            extra["bf16"]["vs_diffusers_bf16_wall"] = common.paired_ratio(samples["latentforge bf16"], db, "wall")
    if profile and dev.type == "cpu":
        pair = {k: arms[k] for k in ("latentforge", "diffusers")}
        extra["profile"], extra["profile_ops"] = bench_unet.profile_breakdown(pair, n=1)
    return {**extra, "preset": preset, "steps": steps, "batch": batch, "cfg": cfg, "size": side, "sampler": "DPM++ 2M",
            "repeats": repeats, "warmup": warmup, "max_abs_diff": diff,
            "latentforge": {"images_per_s": la.rate("wall"), "images_per_cpu_s": la.rate("cpu"), "wall": la.wall, "cpu": la.cpu},
            "diffusers": {"images_per_s": di.rate("wall"), "images_per_cpu_s": di.rate("cpu"), "wall": di.wall, "cpu": di.cpu},
            "ratio_wall": la.rate("wall") / di.rate("wall"), "ratio_cpu": la.rate("cpu") / di.rate("cpu"),
            "paired_ratio_wall": common.paired_ratio(la, di, "wall"),
            "paired_ratio_cpu": common.paired_ratio(la, di, "cpu")}


def markdown(r: dict) -> str:
    a, b = r["latentforge"], r["diffusers"]
    return common.table(
        ["model", "latentforge img/s (wall)", "diffusers img/s (wall)", "ratio (wall)", "latentforge img/s (CPU time)",
         "diffusers img/s (CPU time)", "ratio (CPU time)", "paired ratio wall / CPU", "max abs Δ image"],
        [[f"`{r['preset']}`, {r['size']}×{r['size']} px, {r['steps']} steps {r['sampler']}, CFG {r['cfg']}, "
          f"{r['batch']} images per call", common.fmt(a["images_per_s"]), common.fmt(b["images_per_s"]),
          f"**{r['ratio_wall']:.2f}×**", common.fmt(a["images_per_cpu_s"]), common.fmt(b["images_per_cpu_s"]),
          f"**{r['ratio_cpu']:.2f}×**", f"{r['paired_ratio_wall']:.2f}× / {r['paired_ratio_cpu']:.2f}×",
          f"{r['max_abs_diff']:.1e}"]]) + (_markdown_bf16(r) if "bf16" in r else "")


def _markdown_bf16(r: dict) -> str:
    b = r["bf16"]
    return "\n\n" + common.table(
        ["arm (same rounds)", "img/s (CPU time)", "vs latentforge fp32 (paired, CPU / wall)",
         "vs diffusers fp32 (paired, CPU)", "image Δ vs fp32: max / mean abs"],
        [["latentforge, UNet in bf16 (`compute_in(torch.bfloat16)`)", common.fmt(b["images_per_cpu_s"]),
          f"**{b['vs_fp32_cpu']:.2f}×** / {b['vs_fp32_wall']:.2f}×", f"{b['vs_diffusers_cpu']:.2f}×",
          f"{b['max_abs_diff']:.1e} / {b['mean_abs_diff']:.1e}"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=[k for k in PRESETS if k != "sd15"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    r = run(args.preset, args.steps, args.batch, args.cfg, args.repeats, args.warmup, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
