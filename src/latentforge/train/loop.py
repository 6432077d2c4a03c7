"""The UNet training loop. Reads top to bottom; `step.train_step` is the math of one step, `state.TrainState`
what is trained and checkpointed, `resume` how a run continues.

    for step in range(start, max_steps):            # optimizer steps
        for micro in range(grad_accum):              # each: B/W samples of the stream on this rank
            batch = stream.batch(positions)          # latents (+ text context | class label)
            draws = draw(positions)                  # t, ε, caption-dropout coin per sample
            loss = train_step(...); state.backward   # DDP averages gradients over ranks
        state.optimizer_step: clip -> NaN guard -> AdamW -> EMA;  then log / checkpoint / samples / stop on signal

No host synchronisation per step: the NaN guard decides on the device (nan_guard.py), the loss is read
back at log steps only (`state.flush`), and the next micro-batch is made on the host and copied (pinned,
non-blocking) while the device runs the current one (host_sync.py, which also lists what does synchronise).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import io
from ..adapters import sample_keys
from ..config_loading import config_hash, math_dict, to_toml
from ..data.shards import CacheCorruptError
from ..errors import UserError
from ..schedule import NoiseSchedule
from . import adapter, checkpoint, distributed, resume as runs, text_training
from .data import Stream, make_stream
from .compile import CountingBackend, compile_denoiser, count_shapes
from .freeze import apply_freeze
from .host_sync import Prefetcher, Transfer, next_key, no_host_sync
from .init import build_unet
from .lr import lr_for
from .nan_guard import NanGuard
from .precision import LowPrecisionCompute
from .report import RunLog, write_report
from .samples import export_model, maybe_sample
from .setup import autocast_dtype, check_precision, make_optimizer, null_condition, resolve_for_data
from .signals import StopRequest
from .state import TrainState, make_part
from .step import Batch, Draws, apply_dropout, draw, mix, train_step
from .validation import dataset_ids, evaluate, held_out_ids, held_out_split


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
        return _train(cfg, dataset, Path(out), d, dict(resume=resume, restart=restart,
                      allow_changed_data=allow_changed_data), vae, text_encoder, progress)
    finally:
        distributed.cleanup(d)


@dataclass
class _Run:
    """What the loop carries besides the TrainState: the settings, the processes, the outputs."""
    cfg: object
    d: distributed.Dist
    dir: Path
    dataset: object  # the training items (the held-out ones removed)
    vae: object = None
    text_encoder: object = None
    cache_id: object = None  # the cache's identity, recorded in every checkpoint and checked on --resume
    lowp: object = None  # precision=bf16 on CPU: the bf16 compute copy of the UNet (precision.py)
    val: object = None  # the held-out items (validation.py)
    full: object = None  # every item: for the validation grid, which marks the held-out ones
    val_loss: object = None  # the latest held-out loss (training weights), for the progress bar
    held_out: tuple = ()  # their ids
    stream: object = None  # the data order (train.data.Stream, or BucketStream for a bucketed cache)
    compiled: object = None  # compile=true: the backend, which counts the graphs it compiled

    @property
    def images_per_step(self) -> int:
        return self.cfg.grad_accum * self.cfg.batch_size


def _train(cfg, dataset, run_dir: Path, d, resume_flags, vae, text_encoder, progress) -> TrainResult:
    cfg, train_set, val = held_out_split(_checked(resolve_for_data(cfg, dataset), d, dataset, text_encoder), dataset)
    r = _Run(cfg, d, run_dir, train_set, vae, text_encoder, runs.cache_identity(dataset), val=val, full=dataset,
             held_out=tuple(held_out_ids(dataset_ids(dataset), cfg.val_fraction, cfg.seed)) if len(val) else ())
    warn = (lambda m: print(m, file=sys.stderr)) if d.is_main else (lambda m: None)
    loaded = runs.prepare(run_dir, cfg, dataset, math=math_dict(cfg), warn=warn, is_main=d.is_main, **resume_flags)
    if d.is_main:  # only now, every check passed: the run folder may be written
        run_dir.mkdir(parents=True, exist_ok=True)
        io.write_text(run_dir / "config.toml", to_toml(cfg))
    state = build_state(cfg, run_dir, d, fresh=loaded is None, text_encoder=text_encoder)
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod.to(d.device)
    # on the host, where caption dropout is applied (a text encoder on the GPU gives device tensors)
    null = tuple(x.cpu() if torch.is_tensor(x) else x for x in null_condition(cfg, train_set, text_encoder))
    stream = r.stream = make_stream(train_set, cfg.seed, cfg.batch_size, cfg.bucket_leftovers)  # 1 bucket per batch
    if loaded is not None:
        runs.restore(loaded, d, state)
    model = _network(r, state, warn)
    log = RunLog(run_dir, enabled=d.is_main, resume_step=state.step if loaded is not None else None)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (progress and d.is_main), desc="train",
               unit="step", dynamic_ncols=True)
    meter, start, stopped = _Meter(state.step * r.images_per_step), state.step, ""
    if loaded is None:
        _validate(r, state, ac, log)  # the held-out loss before any training: the baseline
    feed = _feed(r, stream, null, ac.shape[0])
    with StopRequest(insist=not d.enabled) as stop:  # under DDP a repeat is the launcher's copy (signals.py)
        while state.step < cfg.max_steps:
            lr = state.set_lr(lr_for(cfg, state.step))
            with no_host_sync(d.device):  # LATENTFORGE_SYNC_DEBUG: any host sync in here is an error
                loss, picked = _accumulate(r, state, model, feed, ac)
                state.optimizer_step(loss, picked)
                if r.lowp:
                    r.lowp.weights_to_compute()  # round the fp32 masters into the bf16 copy
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                loss, gnorm = state.flush()  # the host reads the device here, once per log step
                seen = state.step * r.images_per_step
                ips, epoch = meter.images_per_s(seen), seen / len(train_set)
                log.log({"step": state.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "img_per_s": ips,
                         "epoch": epoch, "skipped": state.guard.skipped})
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", seen=seen, epoch=f"{epoch:.2f}",
                                **({"val": f"{r.val_loss:.4f}"} if r.val_loss is not None else {}))
            if state.step % cfg.val_every == 0 or state.step == cfg.max_steps:
                _validate(r, state, ac, log)
            bar.update(1)
            if stop_poll_due(state.step, cfg, d.enabled):
                # every rank takes the signal's name, also those it never reached (SIGTERM to one rank only)
                stopped = StopRequest.name_of(distributed.max_int(stop.signum or 0, d))
            _periodic(r, state, stopped)
            if stopped:
                break
    state.flush()
    bar.close()
    log.close()
    if d.is_main:
        _finish(r, state, stopped, start, meter.t0)
    distributed.barrier(d)
    return TrainResult(run_dir, state.step, stopped, state.guard.skipped)


def _network(r: _Run, state: TrainState, warn) -> torch.nn.Module:
    """The module the steps run: the bf16 compute copy with fp32 masters (precision=bf16, CPU and CUDA;
    bf16-autocast runs the master under torch.autocast) or the master, DDP-wrapped under torchrun, then under
    torch.compile with compile=true (after DDP's wrap, as torch recommends; one graph per latent shape)."""
    if r.cfg.precision == "bf16":
        r.lowp = LowPrecisionCompute(state.part.module, torch.bfloat16)
    model = distributed.wrap(r.lowp.compute if r.lowp else state.part.module, r.d)
    if r.cfg.compile:
        r.compiled = CountingBackend()
        model = compile_denoiser(model, count_shapes(r.dataset), r.compiled, warn)
    return model


STOP_POLL_STEPS = 10  # under DDP the ranks agree on a stop signal at most this many steps apart


def stop_poll_due(step: int, cfg, distributed_run: bool) -> bool:
    """Whether the loop asks about a stop signal after `step`: every step in one process (a flag, no device
    work); under DDP (an all-reduce and a host read) every min(log_every, STOP_POLL_STEPS) steps and at the last
    step, the same steps on every rank."""
    return not distributed_run or step % min(cfg.log_every, STOP_POLL_STEPS) == 0 or step == cfg.max_steps


def _checked(cfg, d, dataset=None, text_encoder=None):
    if cfg.batch_size % d.world_size:
        raise UserError(f"batch_size={cfg.batch_size}: must be divisible by the {d.world_size} processes — "
                        "change batch_size or --nproc_per_node")
    check_precision(cfg.precision, d.device)
    adapter.check(cfg)  # (also refuses unet.freeze with an adapter)
    if dataset is not None:
        text_training.check(cfg, dataset, text_encoder)
    return cfg


def build_state(cfg, run_dir: Path, d, fresh: bool = True, text_encoder=None) -> TrainState:
    """The UNet (random — the same on every rank and device — or the --init model's weights when `fresh`;
    with adapter=, the --init weights frozen and the adapter on them, always; `unet.freeze` leaves the matching
    weights untrained), its EMA, the text model with train_text_encoder (no EMA), the optimizer, guard and scaler."""
    distributed.seed_everything(cfg.seed, d.rank)  # per-rank RNG (the math itself uses `draw`)
    torch.manual_seed(mix(cfg.seed, "init"))
    adapted = adapter.enabled(cfg)
    unet = build_unet(cfg, fresh=fresh or adapted).to(d.device)
    if adapted:
        adapter.attach(cfg, unet)  # only the adapter trains: the part saves and averages only its tensors
    elif cfg.unet.freeze:
        apply_freeze(unet, cfg.unet.freeze)
    unet.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    parts = [make_part("unet", unet, cfg.ema_decay, cfg.ema_warmup, adapter=adapted)]
    if adapter.adapts_text(cfg):  # lora.text_encoder: the text model's adapters, with their EMA
        parts.append(make_part("text_encoder", adapter.attach_text(cfg, text_encoder), cfg.ema_decay,
                               cfg.ema_warmup, adapter=True))
    elif cfg.train_text_encoder:
        parts.append(make_part("text_encoder", text_training.unfreeze(text_encoder)))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    return TrainState(parts, make_optimizer([{"params": p.trainable()} for p in parts], cfg, d.device),
                      NanGuard(run_dir, cfg.nan_max_consecutive, write=d.is_main), scaler, cfg.grad_clip,
                      gather=lambda samples: distributed.gather_json(samples, d))  # forensics: all ranks' ids


@dataclass
class _Item:
    """One micro-batch of this rank: its stream positions, the batch and draws on the device, the draws on the host."""
    positions: list
    batch: Batch
    draws: Draws
    host: Draws


def _feed(r: _Run, stream: Stream, null, num_timesteps: int, transfer=None) -> Prefetcher:
    """Micro-batches by (optimizer step, micro-step): read, drawn and caption-dropped on the host, then moved by
    `transfer` (default: pinned + non-blocking on CUDA, the identity on CPU)."""
    cfg, d = r.cfg, r.d
    move = transfer or Transfer(d.device)

    def make(key) -> _Item:
        positions = stream.positions(key[0], key[1], cfg.grad_accum, cfg.batch_size, d.rank, d.world_size)
        batch = stream.batch(positions)
        draws = draw(cfg, positions, batch.latent.shape[1:], num_timesteps)
        if not text_training.enabled(cfg) and cfg.conditioning != "none":
            batch = apply_dropout(batch, draws.drop, *null)
        return _Item(positions, batch, draws, draws)

    return Prefetcher(make, lambda it: _Item(it.positions, it.batch.moved(move), it.draws.moved(move), it.host))


def _accumulate(r: _Run, state: TrainState, model, feed: Prefetcher, ac) -> tuple[torch.Tensor, list[dict]]:
    """The gradient of one optimizer step (grad_accum micro-batches); (mean loss over ranks on the device,
    this rank's samples). The next micro-batch is prefetched once this one's backward is queued."""
    cfg, d, A = r.cfg, r.d, r.cfg.grad_accum
    losses, picked = [], []
    for micro in range(A):
        item = feed.get((state.step, micro))
        with _dropout_keys(r, model, item.positions):  # the text model's and the UNet's forward and backward
            loss, samples = _micro_batch(r, state, model, item, ac, micro)
        feed.prefetch(next_key(state.step, micro, A, cfg.max_steps))
        picked += samples
        losses.append(loss.detach().float())
    if r.lowp:
        r.lowp.grads_to_master()  # fp32 gradients on the master weights: clip, guard and AdamW act there
    if text_training.enabled(cfg):
        text_training.average_gradients(state.parts[1].trainable(), d)
    return distributed.mean_tensor(torch.stack(losses).mean(), d), picked  # on the device, no host read


def _micro_batch(r: _Run, state: TrainState, model, item: _Item, ac, micro: int):
    """Forward and backward of one micro-batch; (its loss, its samples [{"id", "t"}])."""
    cfg, d, A = r.cfg, r.d, r.cfg.grad_accum
    batch = item.batch
    if text_training.enabled(cfg):  # the context from the captions, by the text model as it is now
        batch = text_training.encode_batch(r.text_encoder, batch, item.host.drop)
    sync = model.no_sync() if d.enabled and micro < A - 1 else contextlib.nullcontext()
    with sync:
        loss = train_step(model, batch, item.draws, ac, cfg.schedule.prediction_type,
                          cfg.min_snr_gamma, None if r.lowp else autocast_dtype(cfg.precision),
                          micro=cfg.unet.addition_input_dim is not None,
                          compute_dtype=r.lowp.dtype if r.lowp else None)
        state.backward(loss, A)
    return loss, [{"id": i, "t": t} for i, t in zip(batch.ids, item.host.t.tolist())]


def _dropout_keys(r: _Run, model, positions):
    """lora.dropout: the adapters' masks from (seed, stream position) of each sample (adapters/dropout.py), so
    they do not depend on the rank or on a resume."""
    if not (adapter.enabled(r.cfg) and r.cfg.lora.dropout > 0):
        return contextlib.nullcontext()
    modules = [model] + ([r.text_encoder.model] if adapter.adapts_text(r.cfg) else [])
    return sample_keys(modules, [mix(r.cfg.seed, "lora-dropout", p) for p in positions])


def _periodic(r: _Run, state: TrainState, stopped: str) -> None:
    """After an optimizer step: a checkpoint (every checkpoint_every, at the end, on a stop signal), a sample grid."""
    cfg, step = r.cfg, state.step
    if stopped or step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
        _cache_unchanged(r)
        runs.write_checkpoint(r.dir, cfg, r.d, state, step * r.images_per_step, extra={"cache": r.cache_id})
    if r.d.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
        maybe_sample(r.dir, step, cfg, state.part.module, state.part.ema, r.vae, r.text_encoder, r.full, r.held_out)


def _cache_unchanged(r: _Run) -> None:
    """Before a checkpoint: the latent cache's files still hold the bytes verified when the run opened them — else
    the steps since the last checkpoint may have read damaged latents, and no checkpoint is written from them.
    Every rank takes the same way (a rank that saw a change stops them all)."""
    problem = ""
    try:
        getattr(r.full, "check_unchanged", lambda: None)()
    except CacheCorruptError as e:
        problem = str(e)
    if not distributed.max_int(int(bool(problem)), r.d):
        return
    last = checkpoint.complete_steps(r.dir / "checkpoints")
    since = f"since checkpoint step-{last[-1]}" if last else "of this session"
    raise UserError(f"{problem or 'a latent cache file changed on disk (seen by another process)'} — the steps {since} "
                    "may have used changed latents, so no checkpoint was written from them; rebuild the cache "
                    "(latentforge cache), then run the same command with --resume"
                    + (f" (it continues from step-{last[-1]})" if last else ""))


def _finish(r: _Run, state: TrainState, stopped: str, start: int, t0: float) -> None:
    """The model folder (a finished run with a VAE) and report.md."""
    cfg, step, seen, n = r.cfg, state.step, state.step * r.images_per_step, len(r.dataset)
    held = f", {len(r.val)} held out for validation" if len(r.val) else ""
    unet, ema = state.part.module, state.part.ema
    done = step == cfg.max_steps and r.vae is not None
    text = r.text_encoder
    if step == cfg.max_steps and adapter.enabled(cfg):  # lora/ files; model/ only with --merge
        adapter.write_outputs(r.dir, cfg, state.parts, step,
                              cfg.unet.sample_size * (r.vae.downsample_factor if r.vae else 8))
        done = done and cfg.lora.merge
        if done:
            (unet, text), ema = adapter.merged_outputs(state.parts, text), None
    if done:
        export_model(r.dir, cfg, unet, ema, r.vae, text)
    write_report(r.dir, "UNet training", {
        "steps": f"{step} of {cfg.max_steps}" + (f" (stopped by {stopped})" if stopped else ""),
        "images seen": f"{seen} ({seen / n:.2f} epochs of {n} latents{held})",
        "this session": f"{step - start} steps in {time.perf_counter() - t0:.1f} s on {r.d.world_size} x "
                        f"{r.d.device.type}",
        "model": f"{f'fine-tuned from {cfg.init}' if cfg.init else f'preset {cfg.model}'}, "
                 f"{unet.num_parameters():,} UNet parameters, {cfg.conditioning}-conditional",
        **({"buckets": r.stream.summary()} if hasattr(r.stream, "summary") else {}),
        **({"compile": f"{r.compiled.graphs} graphs compiled this session (one per latent shape)"} if r.compiled else {}),
        "skipped non-finite steps": state.guard.skipped, "config hash": config_hash(cfg),
        **({"adapter": adapter.summary(cfg, [p.module for p in state.parts], step == cfg.max_steps)} if adapter.enabled(cfg) else {}),
        "model folder": "model/ (EMA weights)" if done else "not written (run unfinished or no VAE"
                        + (", or an adapter run without --merge)" if adapter.enabled(cfg) else ")")})


def _validate(r: _Run, state: TrainState, ac, log: RunLog) -> None:
    """Log the held-out loss of the training and EMA weights (rank 0; nothing without held-out images)."""
    if not len(r.val) or not r.d.is_main:
        return
    encode = r.text_encoder.encode if text_training.enabled(r.cfg) else None  # contexts by the text model as it is
    row = evaluate(r.cfg, state.step, state.part.module, state.part.ema, r.val, ac,
                   autocast_dtype(r.cfg.precision), encode)
    log.log(row)
    r.val_loss = row.get("val_loss")  # shown in the progress bar from now on


class _Meter:
    """Images per second (all ranks) since the previous reading."""

    def __init__(self, seen: int):
        self.t0 = self.t_last = time.perf_counter()
        self.seen_last = seen

    def images_per_s(self, seen: int) -> float:
        now = time.perf_counter()
        ips = (seen - self.seen_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.seen_last = now, seen
        return ips
