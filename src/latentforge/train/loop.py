"""The UNet training loop. Reads top to bottom; `step.train_step` is the math of one step.

    for step in range(start, max_steps):            # optimizer steps
        for micro in range(grad_accum):              # each: B/W samples of the stream on this rank
            batch = stream.batch(positions)          # latents (+ text context | class label)
            draws = draw(positions)                  # t, ε, caption-dropout coin per sample
            loss = train_step(...); loss.backward()  # DDP averages gradients over ranks
        clip -> NaN guard -> AdamW -> EMA -> log / checkpoint / samples / stop on signal

No host synchronisation per step: the NaN guard decides on the device (nan_guard.py) and the loss
is read back at log steps only.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import config_hash, math_dict, to_toml
from ..errors import UserError
from ..schedule import NoiseSchedule
from .. import io
from . import adapter, checkpoint, distributed
from . import resume as resume_checks
from .data import Stream
from .ema import EMA
from .init import build_unet
from .lr import lr_for, set_lr
from .nan_guard import NanGuard, finite_on_device, masked_step
from .report import RunLog, write_report
from .samples import export_model, maybe_sample
from .setup import autocast_dtype, check_precision, make_optimizer, null_condition, resolve_for_data
from .signals import StopRequest
from .step import apply_dropout, draw, mix, train_step


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    stopped: str = ""  # name of the signal that stopped the run early, if any
    skipped: int = 0  # non-finite steps skipped


def train(cfg, dataset, out, *, resume: bool = False, vae=None, text_encoder=None,
          progress: bool = True, restart: bool = False, allow_changed_data: bool = False) -> TrainResult:
    """Train a UNet on `dataset` (items like data.cache.LatentDataset) into the run folder `out`.
    restart / allow_changed_data: see train/resume.py."""
    d = distributed.setup(cfg.device)
    try:
        return _train(cfg, dataset, Path(out), d, (resume, restart, allow_changed_data), vae, text_encoder, progress)
    finally:
        distributed.cleanup(d)


def _train(cfg, dataset, run: Path, d, resume_flags, vae, text_encoder, progress) -> TrainResult:
    resume, restart, allow_changed_data = resume_flags
    cfg = resolve_for_data(cfg, dataset)
    B, A, W = cfg.batch_size, cfg.grad_accum, d.world_size
    if B % W:
        raise UserError(f"batch_size={B}: must be divisible by the {W} processes — "
                        "change batch_size or --nproc_per_node")
    check_precision(cfg.precision, d.device)
    adapter.check(cfg)
    ckpt_dir = run / "checkpoints"
    warn = (lambda m: print(m, file=sys.stderr)) if d.is_main else (lambda m: None)
    loaded = resume_checks.prepare(run, cfg, dataset, resume=resume, math=math_dict(cfg), restart=restart,
                                   allow_changed_data=allow_changed_data, warn=warn, is_main=d.is_main)
    if d.is_main:  # only now, every check passed: the run folder may be written
        run.mkdir(parents=True, exist_ok=True)
        io.write_text(run / "config.toml", to_toml(cfg))

    distributed.seed_everything(cfg.seed, d.rank)  # per-rank RNG (the math itself uses `draw`)
    torch.manual_seed(mix(cfg.seed, "init"))  # same initial weights on every rank and device
    # random, or the --init model's weights; an adapter run always starts from the --init weights
    unet = build_unet(cfg, fresh=loaded is None or adapter.enabled(cfg)).to(d.device)
    keys = adapter.attach(cfg, unet) if adapter.enabled(cfg) else None  # only the adapter trains
    unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    ema = EMA(unet, cfg.ema_decay, cfg.ema_warmup, keys=keys)
    opt = make_optimizer(unet, cfg, d.device)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    guard = NanGuard(run, cfg.nan_max_consecutive, write=d.is_main)
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod.to(d.device)
    null = null_condition(cfg, dataset, text_encoder)
    stream = Stream(dataset, cfg.seed)
    gather = lambda samples: distributed.gather_json(samples, d)  # noqa: E731  (forensics: all ranks' ids)
    cache_id = resume_checks.cache_identity(dataset)  # recorded in every checkpoint, checked on --resume

    step = 0
    if loaded is not None:
        step = _restore(*loaded, cfg, d, unet, ema, opt, guard, scaler)
    model = distributed.wrap(unet, d)
    log = RunLog(run, enabled=d.is_main, resume_step=step if loaded is not None else None)

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and d.is_main), desc="train", unit="step",
               dynamic_ncols=True)
    start, t0 = step, time.perf_counter()
    stopped, t_last, seen_last = "", t0, step * A * B
    with StopRequest() as stop:
        while step < cfg.max_steps:
            set_lr(opt, lr := lr_for(cfg, step))
            losses, picked = [], []
            for micro in range(A):
                positions = stream.positions(step, micro, A, B, d.rank, W)
                batch = stream.batch(positions)
                draws = draw(cfg, positions, batch.latent.shape[1:], ac.shape[0])
                if cfg.conditioning != "none":
                    batch = apply_dropout(batch, draws.drop, *null)
                picked += [{"id": i, "t": t} for i, t in zip(batch.ids, draws.t.tolist())]
                sync = model.no_sync() if d.enabled and micro < A - 1 else contextlib.nullcontext()
                with sync:
                    loss = train_step(model, batch.to(d.device), draws, ac, cfg.schedule.prediction_type,
                                      cfg.min_snr_gamma, autocast_dtype(cfg.precision),
                                      micro=cfg.unet.addition_input_dim is not None)
                    (scaler.scale(loss / A) if scaler else loss / A).backward()
                losses.append(loss.detach().float())
            loss = distributed.mean_tensor(torch.stack(losses).mean(), d)  # on the device, no host read
            if scaler:
                scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            ok = finite_on_device(loss, gnorm)
            if scaler:  # fp16: an overflow is the scaler's to skip (fused AdamW takes its found_inf on device)
                scaler.step(opt)
                scaler.update()
                ok = torch.isfinite(loss)
            else:
                masked_step(opt, ok)  # a non-finite step leaves weights and optimizer state bitwise unchanged
            ema.update(unet, ok)
            guard.record(step, ok, loss, gnorm, picked)
            opt.zero_grad(set_to_none=True)
            step += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss, gnorm = guard.flush(gather)  # the host reads the device here, once per log step
                now = time.perf_counter()
                ips = (step * A * B - seen_last) / max(now - t_last, 1e-9)  # images per second, all ranks
                t_last, seen_last = now, step * A * B
                log.log({"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm, "img_per_s": ips,
                         "epoch": step * A * B / len(dataset), "skipped": guard.skipped})
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", seen=step * A * B,
                                epoch=f"{step * A * B / len(dataset):.2f}")
            bar.update(1)
            stopped = stop.name if distributed.any_true(stop.requested, d) else ""
            if stopped or step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                guard.flush(gather)
                _save(ckpt_dir, step, cfg, d, unet, ema, opt, guard, scaler, cache_id)
            if d.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
                maybe_sample(run, step, cfg, unet, ema, vae, text_encoder, dataset)
            if stopped:
                break
    guard.flush(gather)
    bar.close()
    log.close()
    if d.is_main:
        done = step == cfg.max_steps and vae is not None
        if step == cfg.max_steps and adapter.enabled(cfg):
            adapter.write_outputs(run, cfg, unet, ema, step, cfg.unet.sample_size * (vae.downsample_factor if vae else 8))
            done = done and cfg.lora.merge
            unet = adapter.merged_unet(unet, ema) if done else unet
            ema = None if done else ema
        if done:
            export_model(run, cfg, unet, ema, vae, text_encoder)
        write_report(run, "UNet training", {
            "steps": f"{step} of {cfg.max_steps}" + (f" (stopped by {stopped})" if stopped else ""),
            "images seen": f"{step * A * B} ({step * A * B / len(dataset):.2f} epochs of {len(dataset)} latents)",
            "this session": f"{step - start} steps in {time.perf_counter() - t0:.1f} s on {W} x {d.device.type}",
            "model": f"{f'fine-tuned from {cfg.init}' if cfg.init else f'preset {cfg.model}'}, {unet.num_parameters():,} UNet parameters, {cfg.conditioning}-conditional",
            "skipped non-finite steps": guard.skipped, "config hash": config_hash(cfg),
            "model folder": "model/ (EMA weights)" if done else "not written (run unfinished or no VAE)"})
    distributed.barrier(d)
    return TrainResult(run, step, stopped, guard.skipped)


def _save(ckpt_dir, step, cfg, d, unet, ema, opt, guard, scaler, cache_id=None) -> None:
    rng = distributed.gather_json(checkpoint.rng_state(), d)  # every rank's RNG, gathered to all
    if d.is_main:
        flat_opt, opt_meta = checkpoint.flatten_optimizer(opt)
        state = {"step": step, "data_position": step * cfg.grad_accum * cfg.batch_size,
                 "config_hash": config_hash(cfg), "math": math_dict(cfg), "optimizer": opt_meta,
                 "lr": {"schedule": cfg.lr_schedule, "value": opt.param_groups[0]["lr"]},
                 "ema_updates": ema.num_updates, "nan_guard": guard.state_dict(), "world_size": d.world_size,
                 "rng": rng, "scaler": scaler.state_dict() if scaler else None, "cache": cache_id}
        weights = unet.state_dict()
        weights = {k: weights[k] for k in ema.shadow} if adapter.enabled(cfg) else weights  # the adapter only
        checkpoint.save(ckpt_dir, step, {"model": weights, "ema": ema.shadow, "optimizer": flat_opt},
                        state, keep=cfg.keep_checkpoints)
    distributed.barrier(d)


def _restore(path, tensors, state, cfg, d, unet, ema, opt, guard, scaler) -> int:
    """Load a checkpoint that `resume.prepare` has checked into the run's objects; -> its step."""
    unet.load_state_dict(tensors["model"], strict=not adapter.enabled(cfg))  # an adapter run: the adapter only
    ema.load_state_dict({"shadow": tensors["ema"], "num_updates": state["ema_updates"]})
    checkpoint.unflatten_optimizer(opt, tensors["optimizer"], state["optimizer"])
    guard.load_state_dict(state["nan_guard"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state["world_size"] == d.world_size:
        checkpoint.set_rng_state(state["rng"][d.rank])
    return state["step"]
