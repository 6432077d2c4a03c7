"""Training the KL autoencoder (the VAE), so a user with no pretrained VAE can run the whole flow.

    loss = [ Σ_pixels |x − x̂|  (or squared)  +  β · KL(q(z|x) ‖ N(0, I))  +  λ · adv ] / (3·H·W)

the LDM autoencoder objective (Rombach et al. 2022, App. G; Esser et al. 2021 for the patch
discriminator, hinge loss) with per-image sums normalised by the pixel count so the learning rate
does not depend on the resolution. After training the VAE calibrates its latent scale on the
training images (`AutoencoderKL.calibrate_latent_scale`), so the UNet sees unit-variance latents.
PSNR on held-out images goes into report.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import io
from ..config_loading import config_hash, math_dict, to_toml
from ..data.images import BadImage, load_image, to_pil, to_tensor
from ..data.sources import scan, summary
from ..errors import UserError
from ..models import AutoencoderKL
from . import checkpoint, distributed, resume as runs
from .data import Stream
from .lr import lr_for
from .nan_guard import NanGuard
from .report import RunLog, write_report
from .signals import StopRequest
from .state import Part, TrainState
from .step import mix


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a real/fake logit per overlapping patch, (B, 1, h, w)."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        mods, ch = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(1, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods.append(nn.Conv2d(ch, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, H / 2^layers, W / 2^layers)


def load_images(data_dir, size: int, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Every usable image under data_dir as uint8 (N, 3, size, size), and their ids; bad files skipped."""
    items, skipped = scan(str(data_dir), labels="none")
    images, ids = [], []
    for it in tqdm(items, desc="load images", unit="img", disable=not progress):
        try:
            img = load_image(it.read_bytes(), size, name=it.name)
        except BadImage as e:
            print(f"skipped {it.id}: {e}", file=sys.stderr)
            continue
        images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))  # (3, H, W)
        ids.append(it.id)
    if skipped:
        print(summary(skipped), file=sys.stderr)
    if not images:
        raise UserError(f"--data {data_dir}: no usable images — add PNG/JPEG files")
    return torch.stack(images), ids


def psnr(vae, images: torch.Tensor, batch: int = 16) -> float:
    """Mean PSNR (dB, images in [0, 1]) of decode(encode(x)) with the posterior mode."""
    vals = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_tensor(images[i:i + batch]).to(vae.device)
            rec = vae.decode_raw(vae.encode_posterior(x).mode()).clamp(-1, 1)
            mse = ((rec - x) / 2).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)  # (B,) on [0, 1]
            vals += (10 * torch.log10(1 / mse)).tolist()
    return sum(vals) / len(vals)


def vae_loss(vae, x, cfg, disc=None, adv: bool = False, generator=None):
    """(total, parts) for a batch x in [-1, 1]; see the module docstring."""
    rec, post = vae(x, sample=True, generator=generator)  # (B, 3, H, W)
    err = (rec - x).abs() if cfg.recon_loss == "l1" else (rec - x).square()
    pixels = x[0].numel()
    parts = {"rec": err.sum(dim=(1, 2, 3)).mean() / pixels, "kl": post.kl().mean() / pixels}
    total = parts["rec"] + cfg.kl_weight * parts["kl"]
    if adv:
        parts["g_adv"] = -disc(rec).mean()  # hinge generator loss
        total = total + cfg.disc_weight * parts["g_adv"]
    return total, parts, rec


@dataclass
class VAEResult:
    vae_dir: Path  # RUN/vae, written when the run finished (not when a signal stopped it)
    step: int  # optimizer steps done
    stopped: str = ""  # name of the signal that stopped the run early (a checkpoint of `step` was written)


def train_vae(cfg, data_dir, out, *, resume: bool = False, progress: bool = True,
              restart: bool = False) -> VAEResult:
    """Train into the run folder `out`. SIGTERM / SIGINT stop it at the next step boundary with a checkpoint of
    that step (signals.py), from which `resume=True` continues bitwise as if never stopped."""
    run = Path(out)
    d = distributed.setup(cfg.device)
    if d.enabled:
        raise UserError("train-vae: runs on one process — start it without torchrun")
    size, f = cfg.image_size, 2 ** (len(cfg.vae.channels) - 1)
    if size % f:
        raise UserError(f"image_size={size}: must be a multiple of the VAE's downsampling factor {f}")
    data = _split(cfg, *load_images(data_dir, size, progress))
    cfg = replace(cfg, vae=replace(cfg.vae, sample_size=size))
    loaded = runs.prepare(run, cfg, None, resume=resume, math=math_dict(cfg), restart=restart, outputs=("vae",))
    run.mkdir(parents=True, exist_ok=True)  # every check passed: the run folder may be written now
    io.write_text(run / "config.toml", to_toml(cfg))
    state, disc = _build(cfg, run, d)
    vae = state.part.module
    psnr_before = psnr(vae, data.held) if len(data.held) else float("nan")
    if loaded is not None:
        _, tensors, meta = loaded
        runs.restore(loaded, d, state)
        if disc:
            disc.module.load_state_dict(tensors["disc"])
            checkpoint.unflatten_optimizer(disc.optimizer, tensors["disc_optimizer"], meta["disc_optimizer"])
        psnr_before = meta["psnr_before"]
    log = RunLog(run, resume_step=state.step if loaded is not None else None)
    with StopRequest() as stop:
        stopped = _loop(cfg, run, d, state, disc, data, psnr_before, log, stop, progress)
    log.close()
    if not stopped:
        _finish(run, cfg, vae, data, psnr_before, state.step)
    return VAEResult(run / "vae", state.step, stopped)


def _loop(cfg, run: Path, d, state: TrainState, disc, data, psnr_before: float, log: RunLog, stop: StopRequest,
          progress: bool) -> str:
    """Steps up to max_steps: log, checkpoint, reconstruction grids. A stop signal ends it after the step it
    arrived in, with a checkpoint of that step; returns the signal's name ("" when max_steps was reached)."""
    t0, start, stopped = time.perf_counter(), state.step, ""
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train-vae", unit="step", disable=not progress)
    while state.step < cfg.max_steps:
        lr = state.set_lr(lr_for(cfg, state.step))
        parts = _vae_step(cfg, state, disc, data, d.device)
        step = state.step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.log({"step": step, "lr": lr, **parts})
            ips = (step - start) * cfg.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", img_s=f"{ips:.1f}")
        bar.update(1)
        stopped = stop.name  # read once: a signal arriving after this waits for the next step
        if stopped or step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            _save(run, cfg, d, state, disc, psnr_before)
        if cfg.sample_every and len(data.held) and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            _recon_grid(state.part.module, data.held[:8], run / "samples" / f"step-{step}.png")
        if stopped:
            break
    bar.close()
    return stopped


@dataclass
class _Images:
    train: torch.Tensor  # (N, 3, H, W) uint8
    held: torch.Tensor  # (n_hold, 3, H, W) uint8, for PSNR and the reconstruction grids
    train_ids: list
    stream: Stream  # the order of the training images (every one once per epoch)


def _split(cfg, images: torch.Tensor, ids: list) -> _Images:
    """A held-out split (at most a fifth, seeded), the rest for training in the stream's order."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(mix(cfg.seed, "holdout")))
    n_hold = min(cfg.holdout, len(images) // 5)
    train = images[order[n_hold:]]
    return _Images(train, images[order[:n_hold]], [ids[i] for i in order[n_hold:].tolist()], Stream(train, cfg.seed))


@dataclass
class _Disc:
    module: PatchDiscriminator
    optimizer: torch.optim.Optimizer


def _build(cfg, run: Path, d) -> tuple[TrainState, _Disc | None]:
    distributed.seed_everything(cfg.seed)
    torch.manual_seed(mix(cfg.seed, "init"))
    vae = AutoencoderKL(cfg.vae).to(d.device)
    disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(d.device) if cfg.discriminator else None
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    state = TrainState([Part("vae", vae)], torch.optim.AdamW(vae.parameters(), lr=cfg.lr, **adam),
                       NanGuard(run, 5), None, cfg.grad_clip)
    return state, (_Disc(disc, torch.optim.AdamW(disc.parameters(), lr=cfg.lr, **adam)) if disc else None)


def _vae_step(cfg, state: TrainState, disc: _Disc | None, data: _Images, device) -> dict:
    """One optimizer step of the VAE (guarded), then one of the discriminator once it is on. Returns the
    loss parts as floats."""
    step, B = state.step, cfg.batch_size
    idx = [data.stream.index(p) for p in data.stream.positions(step, 0, 1, B, 0, 1)]
    x = to_tensor(data.train[idx]).to(device)  # (B, 3, H, W)
    gen = torch.Generator(device).manual_seed(mix(cfg.seed, "posterior", step))
    adv = disc is not None and step >= cfg.disc_start
    loss, parts, rec = vae_loss(state.part.module, x, cfg, disc.module if disc else None, adv, gen)
    state.backward(loss)
    state.optimizer_step(loss.detach(), [{"id": data.train_ids[i], "t": None} for i in idx])
    _, gnorm = state.flush()  # one process, a small model: read the verdict every step
    if adv:  # hinge discriminator loss (Lim & Ye 2017)
        d_loss = F.relu(1 - disc.module(x)).mean() + F.relu(1 + disc.module(rec.detach())).mean()
        d_loss.backward()
        disc.optimizer.step()
        disc.optimizer.zero_grad(set_to_none=True)
        parts["d_loss"] = d_loss
    return {"loss": loss.item(), "grad_norm": gnorm, **{k: v.item() for k, v in parts.items()}}


def _save(run: Path, cfg, d, state: TrainState, disc: _Disc | None, psnr_before: float) -> None:
    tensors, extra = {}, {"psnr_before": psnr_before}
    if disc is not None:
        flat_d, meta_d = checkpoint.flatten_optimizer(disc.optimizer)
        tensors.update(disc=disc.module.state_dict(), disc_optimizer=flat_d)
        extra["disc_optimizer"] = meta_d
    runs.write_checkpoint(run, cfg, d, state, state.step * cfg.batch_size, tensors, extra)


def _finish(run: Path, cfg, vae, data: _Images, psnr_before: float, step: int) -> None:
    """Calibrate the latent scale, write vae/, report.md and psnr.json."""
    scale = vae.calibrate_latent_scale(to_tensor(data.train[:256]))  # unit-variance latents for the UNet
    vae.eval().save_pretrained(str(run / "vae"))
    after = psnr(vae, data.held) if len(data.held) else float("nan")
    size, f = cfg.image_size, 2 ** (len(cfg.vae.channels) - 1)
    write_report(run, "VAE training", {
        "steps": step, "images": f"{len(data.train)} for training, {len(data.held)} held out, {size}x{size} px",
        "model": f"preset {cfg.model}, {vae.num_parameters():,} parameters, {f}x downsampling, "
                 f"{cfg.vae.latent_channels} latent channels",
        "held-out PSNR": f"{after:.2f} dB (untrained: {psnr_before:.2f} dB)", "latent scale": f"{scale:.5f}",
        "discriminator": f"from step {cfg.disc_start}" if cfg.discriminator else "off",
        "config hash": config_hash(cfg)})
    io.write_json(run / "psnr.json", {"held_out_psnr_db": after, "untrained_psnr_db": psnr_before})


@torch.no_grad()
def _recon_grid(vae, images, path: Path) -> None:
    """Top row: held-out originals; bottom row: their reconstructions."""
    x = to_tensor(images).to(vae.device)
    rec = vae.decode_raw(vae.encode_posterior(x).mode()).clamp(-1, 1)
    grid = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(rec), dim=2)], dim=1)  # (3, 2H, n·W)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.save_image(to_pil(grid), path)
