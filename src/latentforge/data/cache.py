"""The latent cache: every usable image VAE-encoded once, captions text-encoded once.

    CACHE/
      manifest.json                    settings, shard checksums, key -> (shard, row), entries
      latent-<h>.latent.npy            (n, C, h, w) float32 scaled latents
      text-<h>.context.npy, .mask.npy  (k, L, D) float32, (k, L) bool — one row per distinct caption
      skipped.jsonl                    every file that could not be used, with its reason

A latent's key is sha256(file bytes, preprocessing settings, VAE weights, flip), so a re-run
encodes only new or changed files, reuses the rest and drops removed ones. Shards are written
atomically and the manifest (rewritten after every shard, written last) is the only thing a reader
trusts: a killed run leaves a consistent manifest (`complete: false`) that the next run continues.

    build_cache("data/", vae, "default", "cache/", size=32)
    ds = LatentDataset("cache/")   # dict(latent, context, mask, label, id), never touches images
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from . import sources
from .images import MAX_PIXELS, MIN_SIZE, BadImage, load_image, to_tensor
from .shards import CacheCorruptError, ShardStore, fsync_dir, write_json

__all__ = ["build_cache", "LatentDataset", "CacheReport", "CacheCorruptError", "module_fingerprint"]

FORMAT, VERSION = "latentforge-latent-cache", 1
PREPROCESS = "rgb-white-alpha/lanczos-shorter-side/center-crop/v1"  # bump when image handling changes
MANIFEST = "manifest.json"


def module_fingerprint(module: torch.nn.Module, config=None) -> str:
    """sha256 of a model's config and weights (a cache key part: new weights -> new latents)."""
    h = hashlib.sha256()
    if config is not None:
        h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class CacheReport:
    out: str
    entries: int = 0  # latents in the finished cache (flipped twins included)
    encoded: int = 0  # images VAE-encoded by this run
    reused: int = 0
    removed: int = 0  # latents of files that are gone or changed
    texts_encoded: int = 0
    skipped: List[sources.Skip] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"cache {self.out}: {self.entries} latents ({self.encoded} encoded, {self.reused} reused, "
                f"{self.removed} dropped), {self.texts_encoded} captions encoded; "
                + sources.summary(self.skipped))


# ---- the manifest --------------------------------------------------------------------------


def read_manifest(cache_dir: str) -> Optional[dict]:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheCorruptError(f"{path}: not valid JSON ({e}) — delete the cache folder and rebuild it") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{path}: not a latentforge latent cache (version {VERSION}) — pick another --out folder")
    if manifest.pop("sha256", None) != _manifest_hash(manifest):
        raise CacheCorruptError(f"{path}: checksum mismatch, the manifest is corrupt — delete the cache folder "
                                "and rebuild it")
    return manifest


def _manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (without its own checksum field)."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(body).hexdigest()


def _write_manifest(path: str, manifest: dict) -> None:
    write_json(path, {**manifest, "sha256": _manifest_hash(manifest)})


def _check_out_folder(out: str) -> Optional[dict]:
    """The old manifest, or None for a fresh cache; refuses to write into an unrelated folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: exists and is not a folder — pass a new or existing cache folder as --out")
    os.makedirs(out, exist_ok=True)
    manifest = read_manifest(out)
    ours = ("latent-", "text-", "skipped.jsonl", MANIFEST)
    strangers = [n for n in os.listdir(out) if not n.startswith(ours)]
    if manifest is None and strangers:
        raise UserError(f"{out}: is not empty and not a latent cache (has {strangers[0]!r}) — "
                        "pass a new folder as --out")
    return manifest


# ---- build ---------------------------------------------------------------------------------


def build_cache(data_dir: str, vae, text_encoder: Union[str, object, None] = "default", out: str = "cache",
                size: Optional[int] = None, batch_size: int = 16, flip: bool = False, shard_size: int = 1024,
                caption_column: str = "text", labels: str = "auto", min_size: int = MIN_SIZE,
                max_pixels: int = MAX_PIXELS, strict: bool = False, progress: bool = True,
                text_max_length: Optional[int] = None) -> CacheReport:
    """Encode every usable image under `data_dir` into the cache folder `out` (incremental).

    vae: an AutoencoderKL (encode() gives scaled latents). text_encoder: a TextEncoder, a name or
    folder for TextEncoder.from_pretrained (loaded, with `text_max_length`, on the VAE's device only
    if the data has captions), or None (captions are then ignored).
    size defaults to the VAE's `sample_size`; flip also caches each image's mirror twin.
    strict: any skipped file raises UserError (after writing skipped.jsonl).
    """
    size = int(size or vae.config.sample_size)
    if size % vae.downsample_factor or size < vae.downsample_factor:
        raise UserError(f"--size {size}: must be a positive multiple of the VAE's downsampling factor "
                        f"{vae.downsample_factor}")
    if batch_size < 1 or shard_size < 1:
        raise UserError(f"--batch-size {batch_size} / --shard-size {shard_size}: must be at least 1")
    old = _check_out_folder(out)
    items, skipped = sources.scan(data_dir, caption_column, labels, min_size, max_pixels)
    report = CacheReport(out=out, skipped=skipped)
    _fail_if_strict(strict, out, skipped)

    captioned = any(it.caption is not None for it in items)
    if captioned and isinstance(text_encoder, (str, os.PathLike)):
        from ..text import TextEncoder

        text_encoder = TextEncoder.from_pretrained(text_encoder, max_length=text_max_length, device=vae.device)
    text_encoder = text_encoder if captioned else None
    settings = {"size": size, "flip": flip, "preprocess": PREPROCESS,
                "vae": module_fingerprint(vae, getattr(vae, "config", None)),
                "text_encoder": text_encoder.fingerprint() if text_encoder else None,
                "max_length": text_encoder.max_length if text_encoder else None,
                "text_dim": text_encoder.dim if text_encoder else None}
    state = {"format": FORMAT, "version": VERSION, "complete": False, "settings": settings,
             "classes": sources.class_names(items),
             "conditioning": "text" if text_encoder else "class" if sources.class_names(items) else "none",
             "entries": []}
    manifest_path = os.path.join(out, MANIFEST)

    def save_manifest():
        _write_manifest(manifest_path, {**state, "latents": latents.state(), "text": texts.state()})

    latents = ShardStore(out, "latent", (old or {}).get("latents"), shard_size, save_manifest)
    texts = ShardStore(out, "text", (old or {}).get("text"), shard_size, save_manifest)
    for store in (latents, texts):
        for problem in store.drop_bad_shards():
            print(f"warning: {problem}; re-encoding its rows", file=sys.stderr)
    before = set(latents.index)

    text_keys = _encode_texts(items, text_encoder, texts, settings, report, progress)
    entries = _encode_images(items, vae, latents, settings, size, batch_size, flip, report, progress, strict)
    for e in entries:
        e["text"] = text_keys[e["caption"]] if text_encoder else None
    live = {e["key"] for e in entries}
    report.removed = len(before - live)
    report.entries = len(entries)
    latents.keep_only(live)
    texts.keep_only(set(text_keys.values()))
    state.update(complete=True, entries=entries, null_text=text_keys.get("") if text_encoder else None,
                 latent_shape=_latent_shape(latents))
    save_manifest()  # the manifest last: it now names only finished shards
    _collect_garbage(out, latents.files() | texts.files())
    sources.write_skipped(os.path.join(out, "skipped.jsonl"), report.skipped)
    return report


def _fail_if_strict(strict: bool, out: str, skipped: List[sources.Skip]) -> None:
    if strict and skipped:
        sources.write_skipped(os.path.join(out, "skipped.jsonl"), skipped)
        s = skipped[0]
        raise UserError(f"--strict: {sources.summary(skipped)}; first: {s.path} ({s.reason}: {s.detail}); "
                        f"all listed in {os.path.join(out, 'skipped.jsonl')}")


def _latent_shape(latents: ShardStore) -> Optional[List[int]]:
    for name in latents.shards:
        return list(latents.arrays(name)["latent"].shape[1:])
    return None


def _encode_texts(items, text_encoder, texts: ShardStore, settings, report, progress) -> Dict[str, str]:
    """Encode each distinct caption (and "", the null context) once; caption -> text key."""
    if text_encoder is None:
        return {}
    captions = sorted({it.caption for it in items} | {""})
    keys = {c: _digest(settings["text_encoder"], c) for c in captions}
    todo = [c for c in captions if keys[c] not in texts]
    chunk = 64
    for i in tqdm(range(0, len(todo), chunk), desc="text", unit="batch", disable=not progress or not todo):
        context, mask = text_encoder.encode(todo[i:i + chunk])  # (b, L, D), (b, L)
        for c, ctx, m in zip(todo[i:i + chunk], context.cpu().numpy(), mask.cpu().numpy()):
            texts.add(keys[c], context=ctx.astype(np.float32), mask=m.astype(bool))
    texts.flush()
    report.texts_encoded = len(todo)
    return keys


def _encode_images(items, vae, latents: ShardStore, settings, size, batch_size, flip, report, progress, strict):
    """Hash every file; encode (in batches) those whose key is not cached; -> manifest entries."""
    base = json.dumps({k: settings[k] for k in ("size", "preprocess", "vae")}, sort_keys=True)
    entries, batch, queued = [], [], set()  # batch: [(key, (3, H, W) image)]

    def run_batch():
        if batch:
            x = torch.stack([t for _, t in batch]).to(vae.device, vae.dtype)  # (B, 3, H, W)
            with torch.no_grad():
                z = vae.encode(x).float().cpu().numpy()  # (B, C, h, w)
            for (key, _), row in zip(batch, z):
                latents.add(key, latent=row)
            report.encoded += len(batch)
            batch.clear()

    for item in tqdm(items, desc="encode", unit="img", disable=not progress):
        where = item.path if item.offset < 0 else f"{item.path}/{item.name}"
        try:
            data = item.read_bytes()
            file_hash = hashlib.sha256(data).hexdigest()
            twins = [(f, _digest(base, file_hash, "flip" if f else "plain")) for f in ((False, True) if flip else (False,))]
            todo = [(f, k) for f, k in twins if k not in latents and k not in queued]
            img = load_image(data, size, name=item.name) if todo else None
        except (OSError, BadImage) as e:
            reason, detail = (e.reason, e.detail) if isinstance(e, BadImage) else ("unreadable", e.strerror or str(e))
            report.skipped.append(sources.Skip(where, reason, detail))
            _fail_if_strict(strict, report.out, report.skipped)
            continue
        for flipped, key in todo:
            queued.add(key)
            batch.append((key, to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else img)))
            if len(batch) >= batch_size:
                run_batch()
        report.reused += len(twins) - len(todo)
        entries += [{"id": item.id + ("#flip" if f else ""), "key": k, "flip": f, "caption": item.caption,
                     "label": item.label} for f, k in twins]
    run_batch()
    latents.flush()
    return entries


def _collect_garbage(out: str, keep: set) -> None:
    """Delete shard files no manifest names (stale, repacked, or left by a killed run)."""
    for path in glob.glob(os.path.join(out, "latent-*")) + glob.glob(os.path.join(out, "text-*")):
        if os.path.basename(path) not in keep:
            os.remove(path)
    fsync_dir(out)


# ---- reading -------------------------------------------------------------------------------


class LatentDataset(torch.utils.data.Dataset):
    """Items from a finished cache: dict(latent (C, h, w), id) plus context (L, D) + mask (L,)
    for captioned data and label (int) for class folders. Shards are memory-mapped and verified
    against their checksums on open (`verify=False` skips that)."""

    def __init__(self, cache_dir: str, verify: bool = True):
        manifest = read_manifest(cache_dir)
        if manifest is None:
            raise UserError(f"{cache_dir}: no {MANIFEST} — build the cache first (latentforge cache --out {cache_dir} ...)")
        if not manifest["complete"]:
            raise UserError(f"{cache_dir}: the cache was interrupted while building — re-run latentforge cache to finish it")
        self.root, self.manifest = cache_dir, manifest
        self.latents = ShardStore(cache_dir, "latent", manifest["latents"], 1)
        self.texts = ShardStore(cache_dir, "text", manifest["text"], 1)
        if verify:
            for store in (self.latents, self.texts):
                for name in store.shards:
                    store.verify(name)
        self.entries = manifest["entries"]
        self.classes: Optional[List[str]] = manifest["classes"]
        self.num_classes = len(self.classes) if self.classes else None
        self.conditioning: str = manifest["conditioning"]
        self.latent_shape = tuple(manifest["latent_shape"] or ())
        null = manifest.get("null_text")
        row = self.texts.row(null) if null else None
        self.null_context = torch.from_numpy(row["context"].copy()) if row else None  # (L, D)
        self.null_mask = torch.from_numpy(row["mask"].copy()) if row else None  # (L,)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        item = {"latent": torch.from_numpy(self.latents.row(e["key"])["latent"].copy()), "id": e["id"]}  # (C, h, w)
        if e.get("text"):
            row = self.texts.row(e["text"])
            item["context"] = torch.from_numpy(row["context"].copy())  # (L, D)
            item["mask"] = torch.from_numpy(row["mask"].copy())  # (L,)
        if e.get("label") is not None:
            item["label"] = int(e["label"])
        return item
