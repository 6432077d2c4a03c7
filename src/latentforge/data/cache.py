"""The latent cache: every usable image VAE-encoded once, captions text-encoded once.

    CACHE/
      manifest.json                    settings, shard checksums, key -> (shard, row), entries
      latent-<h>.latent.npy            (n, C, h, w) float32 scaled latents (square cache)
      latent-<W>x<H>-<h>.latent.npy    (n, C, H/f, W/f) one store per aspect-ratio bucket (--buckets)
      text-<h>.context.npy, .mask.npy  (k, L, D) float32, (k, L) bool — one row per distinct caption
      text-<h>.pooled.npy              (k, P) float32 pooled text embeddings (SDXL's DualTextEncoder only)
      skipped.jsonl                    every file that could not be used, with its reason

A latent's key is sha256(file bytes, preprocessing settings, VAE weights, flip), so a re-run
encodes only new or changed files, reuses the rest and drops removed ones. Shards are written
atomically and the manifest (rewritten after every shard, written last) is the only thing a reader
trusts: a killed run leaves a consistent manifest (`complete: false`) that the next run continues.

    build_cache("data/", vae, "default", "cache/", size=32)
    ds = LatentDataset("cache/")   # dict(latent, context, mask, label, id), never touches images

With `buckets=BucketSpec()` every image goes to its aspect-ratio bucket at the area size² (see
data/buckets.py) instead of a size x size square; each entry then records `bucket`. Every entry (square
or bucketed) records SDXL's `original_size` (H, W), `crop_top_left` (top, left) and `target_size` (H, W);
items carry them as `time_ids` (6,) (models.unet.time_ids), the micro-conditioning of SDXL training.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import io
from ..errors import UserError
from ..locks import LOCK_NAME, folder_lock
from ..models.unet import time_ids
from ..text import TextEncoder
from . import sources
from . import buckets as bk
from .images import MAX_PIXELS, MIN_SIZE, BadImage, load_image, open_checked, oriented_size, to_rgb, to_tensor
from ..io import fsync_dir
from .shards import CacheCorruptError, ShardStore, write_json

__all__ = ["build_cache", "BucketSpec", "LatentDataset", "open_cache", "CacheReport", "CacheCorruptError",
           "module_fingerprint"]

FORMAT, VERSION = "latentforge-latent-cache", 1
PREPROCESS = "rgb-white-alpha/lanczos-shorter-side/center-crop/v1"  # bump when image handling changes
BUCKET_PREPROCESS = "rgb-white-alpha/nearest-log-aspect-bucket/lanczos-cover/crop/v1"
MANIFEST = "manifest.json"


_NOT_FINGERPRINTED = {"force_upcast"}  # config fields that do not change a float32 encode (caches stay valid)


def module_fingerprint(module: torch.nn.Module, config=None) -> str:
    """sha256 of a model's config and weights (a cache key part: new weights -> new latents)."""
    h = hashlib.sha256()
    if config is not None:
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_FINGERPRINTED}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    io.hash_weights(h, module)
    return h.hexdigest()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class BucketSpec:
    """Aspect-ratio buckets at the area size x size: sides multiples of `step` (0 = the VAE factor x 8,
    64 px for SD), ratios within 1:max_ratio..max_ratio:1, at most `max_upscale` x enlargement."""

    step: int = 0
    max_ratio: float = bk.MAX_RATIO
    max_upscale: float = bk.MAX_UPSCALE
    crop: str = "center"  # center | random (seeded by the file's hash; the offset is recorded)


@dataclass
class CacheReport:
    out: str
    entries: int = 0  # latents in the finished cache (flipped twins included)
    encoded: int = 0  # images VAE-encoded by this run
    reused: int = 0
    removed: int = 0  # latents of files that are gone or changed
    texts_encoded: int = 0
    skipped: List[sources.Skip] = field(default_factory=list)
    buckets: List[tuple] = field(default_factory=list)  # (bucket name, latents), bucketed caches only

    def __str__(self) -> str:
        hist = "; buckets " + ", ".join(f"{n}: {c}" for n, c in self.buckets) if self.buckets else ""
        return (f"cache {self.out}: {self.entries} latents ({self.encoded} encoded, {self.reused} reused, "
                f"{self.removed} dropped), {self.texts_encoded} captions encoded{hist}; "
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
    ours = ("latent-", "text-", "skipped.jsonl", MANIFEST, LOCK_NAME)
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
                text_max_length: Optional[int] = None, buckets: Optional[BucketSpec] = None) -> CacheReport:
    """Encode every usable image under `data_dir` into the cache folder `out` (incremental).

    vae: an AutoencoderKL (encode() gives scaled latents). text_encoder: a TextEncoder, a name or
    folder for TextEncoder.from_pretrained (loaded, with `text_max_length`, on the VAE's device only
    if the data has captions), or None (captions are then ignored).
    size defaults to the VAE's `sample_size`; flip also caches each image's mirror twin.
    strict: any skipped file raises UserError (after writing skipped.jsonl).
    buckets: a BucketSpec caches each image in its aspect-ratio bucket at the area size x size.
    One process at a time per cache folder (an OS lock, see locks.py); a second one gets one line.
    """
    params = dict(locals())  # every argument, passed on unchanged
    _check_out_folder(out)  # a file, or a folder that is not a cache: refused before anything is written there
    with folder_lock(out, "latentforge cache"):
        return _build_cache(**params)


def _build_cache(data_dir, vae, text_encoder, out, size, batch_size, flip, shard_size, caption_column, labels,
                 min_size, max_pixels, strict, progress, text_max_length, buckets) -> CacheReport:
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
        text_encoder = TextEncoder.from_pretrained(text_encoder, max_length=text_max_length, device=vae.device)
    text_encoder = text_encoder if captioned else None
    settings = {"size": size, "flip": flip, "preprocess": BUCKET_PREPROCESS if buckets else PREPROCESS,
                "buckets": _bucket_settings(buckets, size, vae.downsample_factor),
                "vae": module_fingerprint(vae, getattr(vae, "config", None)),
                "text_encoder": text_encoder.fingerprint() if text_encoder else None,
                "max_length": text_encoder.max_length if text_encoder else None,
                "text_dim": text_encoder.dim if text_encoder else None,
                "pooled_dim": getattr(text_encoder, "pooled_dim", None) if text_encoder else None}
    state = {"format": FORMAT, "version": VERSION, "complete": False, "settings": settings,
             "classes": sources.class_names(items),
             "conditioning": "text" if text_encoder else "class" if sources.class_names(items) else "none",
             "entries": []}
    manifest_path = os.path.join(out, MANIFEST)

    def save_manifest():
        _write_manifest(manifest_path, {**state, **latents.state(), "text": texts.state()})

    latents = LatentStores(out, old or {}, shard_size, save_manifest)
    texts = ShardStore(out, "text", (old or {}).get("text"), shard_size, save_manifest)
    for store in (*latents.stores(), texts):
        for problem in store.drop_bad_shards():
            print(f"warning: {problem}; re-encoding its rows", file=sys.stderr)
    before = latents.keys()

    text_keys, null_key = _encode_texts(items, text_encoder, texts, settings, report, progress)
    entries = _encode_images(items, vae, latents, settings, size, batch_size, flip, report, progress, strict,
                             (max_pixels, min_size))
    for e in entries:
        e["text"] = text_keys[e["caption"]] if text_encoder else None
    live = {e["key"] for e in entries}
    report.removed = len(before - live)
    report.entries = len(entries)
    latents.keep_only(live)
    texts.keep_only(set(text_keys.values()) | {null_key})
    state.update(complete=True, entries=entries, null_text=null_key,
                 latent_shape=_latent_shape(latents.square), bucket_shapes=latents.shapes() if buckets else None)
    report.buckets = bk.histogram([e["bucket"] for e in entries]) if buckets else []
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


def _bucket_settings(spec: Optional[BucketSpec], size: int, f: int) -> Optional[dict]:
    """The bucket settings a cache key depends on (None: square images)."""
    if spec is None:
        return None
    step = spec.step or f * 8
    if step % f or step < f:
        raise UserError(f"--bucket-step {step}: must be a positive multiple of the VAE's downsampling factor {f}")
    if size < step:
        raise UserError(f"--size {size}: the bucket area {size}x{size} is below one {step}x{step} bucket — "
                        f"use --size {step} or more, or a smaller --bucket-step")
    if spec.crop not in bk.CROPS or spec.max_upscale < 1 or spec.max_ratio < 1:
        raise UserError(f"buckets: crop={spec.crop!r}, max_upscale={spec.max_upscale}, max_ratio={spec.max_ratio} — "
                        f"crop is one of {', '.join(bk.CROPS)}, the others at least 1")
    return {"area": size * size, "step": step, "max_ratio": spec.max_ratio, "max_upscale": spec.max_upscale,
            "crop": spec.crop}


class LatentStores:
    """The square cache's store (`latent-*`) and one store per bucket (`latent-<W>x<H>-*`)."""

    def __init__(self, out: str, manifest: dict, shard_size: int, on_flush=None):
        self.out, self.shard_size, self.on_flush = out, shard_size, on_flush
        self.square = ShardStore(out, "latent", manifest.get("latents"), shard_size, on_flush)
        self.buckets = {n: ShardStore(out, f"latent-{n}", st, shard_size, on_flush)
                        for n, st in (manifest.get("bucket_latents") or {}).items()}

    def store(self, bucket: Optional[str]) -> ShardStore:
        if not bucket:
            return self.square
        if bucket not in self.buckets:
            self.buckets[bucket] = ShardStore(self.out, f"latent-{bucket}", None, self.shard_size, self.on_flush)
        return self.buckets[bucket]

    def stores(self) -> List[ShardStore]:
        return [self.square, *self.buckets.values()]

    def state(self) -> dict:
        return {"latents": self.square.state(),
                "bucket_latents": {n: s.state() for n, s in sorted(self.buckets.items()) if s.shards}}

    def keys(self) -> set:
        return {k for s in self.stores() for k in s.index}

    def __contains__(self, key: str) -> bool:
        return any(key in s for s in self.stores())

    def shapes(self) -> Dict[str, List[int]]:
        return {n: _latent_shape(s) for n, s in sorted(self.buckets.items()) if s.shards}

    def flush(self) -> None:
        for s in self.stores():
            s.flush()

    def keep_only(self, live: set) -> None:
        for s in self.stores():
            s.keep_only(live)

    def files(self) -> set:
        return set().union(*(s.files() for s in self.stores()))


def _square_side(spec: Optional[dict], shapes: Dict[str, tuple]) -> Optional[int]:
    """A bucketed cache's latent side of its square bucket (the trained model's default size)."""
    if not spec or not shapes:
        return None
    name, shape = next(iter(shapes.items()))
    f = bk.Bucket.parse(name).width // shape[-1]
    return math.isqrt(spec["area"]) // spec["step"] * spec["step"] // f


def _latent_shape(latents: ShardStore) -> Optional[List[int]]:
    for name in latents.shards:
        return list(latents.arrays(name)["latent"].shape[1:])
    return None


def _encode_texts(items, text_encoder, texts: ShardStore, settings, report, progress):
    """Encode each distinct caption once -> (caption -> text key, key of the null condition).

    The null condition is the encoded "" — or, for an encoder with pooled embeddings (SDXL's
    DualTextEncoder), its `null_pooled()`, which is all zeros under force_zeros_for_empty_prompt.
    """
    if text_encoder is None:
        return {}, None
    pooled = getattr(text_encoder, "pooled_dim", None) is not None
    captions = sorted({it.caption for it in items} | ({""} if not pooled else set()))
    keys = {c: _digest(settings["text_encoder"], c) for c in captions}
    todo = [c for c in captions if keys[c] not in texts]
    chunk = 64
    for i in tqdm(range(0, len(todo), chunk), desc="text", unit="batch", disable=not progress or not todo):
        out = text_encoder.encode_pooled(todo[i:i + chunk]) if pooled else text_encoder.encode(todo[i:i + chunk])
        for c, *row in zip(todo[i:i + chunk], *(o.cpu().numpy() for o in out)):  # (L, D), (L,) [, (P,)]
            _add_text(texts, keys[c], row)
    null_key = keys[""] if not pooled else _digest(settings["text_encoder"], "\0null")
    if pooled and null_key not in texts:
        _add_text(texts, null_key, [o[0].cpu().numpy() for o in text_encoder.null_pooled()])
    texts.flush()
    report.texts_encoded = len(todo)
    return keys, null_key


def _add_text(texts: ShardStore, key: str, row) -> None:
    arrays = dict(context=row[0].astype(np.float32), mask=row[1].astype(bool))
    if len(row) > 2:
        arrays["pooled"] = row[2].astype(np.float32)
    texts.add(key, **arrays)


def _encode_images(items, vae, latents: LatentStores, settings, size, batch_size, flip, report, progress, strict,
                   limits):
    """Hash every file; encode (in batches, one per bucket) those whose key is not cached; -> manifest entries."""
    entries, batches = [], {}  # batches: bucket ("" = square) -> [(key, (3, H, W) image)]

    def run_batch(bucket):
        batch = batches.pop(bucket, [])
        if batch:
            x = torch.stack([t for _, t in batch]).to(vae.device, vae.dtype)  # (B, 3, H, W)
            with torch.no_grad():
                z = vae.encode(x).float().cpu().numpy()  # (B, C, h, w)
            for (key, _), row in zip(batch, z):
                latents.store(bucket).add(key, latent=row)
            report.encoded += len(batch)

    for item_entries, todo, bucket in _usable(items, settings, size, flip, latents.__contains__, report, strict,
                                              progress, limits):
        for key, image in todo:
            batches.setdefault(bucket, []).append((key, image))
            if len(batches[bucket]) >= batch_size:
                run_batch(bucket)
        entries += item_entries
    for bucket in sorted(batches):
        run_batch(bucket)
    latents.flush()
    return entries


def _usable(items, settings, size, flip, cached, report, strict, progress, limits):
    """Per usable item: (its entries, [(key, (3, H, W) image)] to encode, its bucket ("" = square)). Every file
    is hashed and its header read; the pixels are decoded only for keys neither `cached(key)` nor queued
    before. Unusable files (by `limits` = (max_pixels, min_size) too) go to report.skipped."""
    spec = settings["buckets"]
    base = json.dumps({k: settings[k] for k in ("size", "preprocess", "vae") + (("buckets",) if spec else ())},
                      sort_keys=True)
    blist = bk.bucket_list(spec["area"], spec["step"], spec["max_ratio"]) if spec else None
    queued = set()
    for item in tqdm(items, desc="encode", unit="img", disable=not progress):
        where = item.path if item.offset < 0 else f"{item.path}/{item.name}"
        try:
            data = item.read_bytes()
            file_hash = hashlib.sha256(data).hexdigest()
            twins = [(f, _digest(base, file_hash, "flip" if f else "plain")) for f in ((False, True) if flip else (False,))]
            todo = [(f, k) for f, k in twins if not cached(k) and k not in queued]
            img, placed = _prepare(data, item.name, size, spec, blist, file_hash, bool(todo), limits)
        except (OSError, BadImage) as e:
            reason, detail = (e.reason, e.detail) if isinstance(e, BadImage) else ("unreadable", e.strerror or str(e))
            report.skipped.append(sources.Skip(where, reason, detail))
            _fail_if_strict(strict, report.out, report.skipped)
            continue
        queued.update(k for _, k in todo)
        report.reused += len(twins) - len(todo)
        yield ([{"id": item.id + ("#flip" if f else ""), "key": k, "flip": f, "caption": item.caption,
                 "label": item.label, **_micro_record(placed.flipped() if f else placed, bucketed=bool(spec))}
                for f, k in twins],
               [(k, to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else img)) for f, k in todo],
               placed.bucket.name if spec else "")


def planned_entries(data_dir: str, vae, out: str, size: Optional[int] = None, flip: bool = False,
                    caption_column: str = "text", labels: str = "auto", min_size: int = MIN_SIZE,
                    max_pixels: int = MAX_PIXELS, buckets: Optional[BucketSpec] = None) -> List[dict]:
    """The entries (id, key, ...) `build_cache` of `data_dir` into `out` would write, in its order, found
    without encoding or writing anything: files are hashed and their headers read; only the files whose
    latents `out` does not hold are decoded (to know whether they are usable). For a check before a build."""
    size = int(size or vae.config.sample_size)
    items, _ = sources.scan(data_dir, caption_column, labels, min_size, max_pixels)
    settings = {"size": size, "preprocess": BUCKET_PREPROCESS if buckets else PREPROCESS,
                "buckets": _bucket_settings(buckets, size, vae.downsample_factor),
                "vae": module_fingerprint(vae, getattr(vae, "config", None))}
    old = read_manifest(out) if os.path.isdir(out) else None
    cached = {e["key"] for e in (old or {}).get("entries", [])}
    report = CacheReport(out=out)
    return [e for entries, _, _ in _usable(items, settings, size, flip, cached.__contains__, report, False, False,
                                           (max_pixels, min_size))
            for e in entries]


def _prepare(data: bytes, name: str, size: int, spec, blist, file_hash: str, pixels: bool, limits):
    """(the image to encode or None if not `pixels`, its Placement). Square caches: the placement of
    `load_image`'s shorter-side resize + center crop, in a size x size "bucket" (for the SDXL record)."""
    img = open_checked(data, name, *limits)  # the --max-pixels / --min-size the scan used
    if spec is None:
        w, h = oriented_size(img)  # from the header: a reused latent needs no pixel decode
        placed = bk.place(w, h, [bk.Bucket(size, size)], "center", max_upscale=math.inf)
        image = load_image(data, size, name=name, max_pixels=limits[0], min_size=limits[1]) if pixels else None
        return image, placed
    w, h = oriented_size(img)  # from the header: a reused latent needs no pixel decode
    rng = random.Random(int(file_hash[:16], 16)) if spec["crop"] == "random" else None
    placed = bk.place(w, h, blist, spec["crop"], rng, spec["max_upscale"])
    return (bk.fit(to_rgb(img), placed) if pixels else None), placed


def _micro_record(placed, bucketed: bool) -> dict:
    """An entry's SDXL fields: original_size, crop_top_left, target_size (+ its bucket in bucketed caches)."""
    record = placed.record()
    if not bucketed:
        record.pop("bucket")  # square caches have one latent store
    return record


def _collect_garbage(out: str, keep: set) -> None:
    """Delete shard files no manifest names (stale, repacked, or left by a killed run)."""
    for path in glob.glob(os.path.join(out, "latent-*")) + glob.glob(os.path.join(out, "text-*")):
        if os.path.basename(path) not in keep:
            os.remove(path)
    fsync_dir(out)


# ---- reading -------------------------------------------------------------------------------


def open_cache(cache_dir: str, vae, text_encoder_name: str, device):
    """(LatentDataset, the text encoder it was built with, on `device`; None if not captioned). Refuses a VAE
    or a text encoder other than the ones the cache was built with (their fingerprints in the manifest)."""
    dataset = LatentDataset(cache_dir)
    settings = dataset.manifest["settings"]
    if settings.get("vae") and settings["vae"] != module_fingerprint(vae.cpu(), vae.config):
        raise UserError(f"--vae: {cache_dir} was encoded with a different VAE — pass the VAE used by "
                        "`latentforge cache`, or rebuild the cache with this one")
    vae.to(device)
    if dataset.conditioning != "text":
        return dataset, None

    text_encoder = TextEncoder.from_pretrained(text_encoder_name, max_length=settings.get("max_length"), device=device)
    if settings.get("text_encoder") and text_encoder.fingerprint() != settings["text_encoder"]:
        raise UserError(f"--text-encoder {text_encoder_name}: {cache_dir} was built with a different text encoder "
                        "— pass the one given to `latentforge cache`")
    return dataset, text_encoder


class LatentDataset(torch.utils.data.Dataset):
    """Items from a finished cache: dict(latent (C, h, w), id) plus context (L, D) + mask (L,)
    for captioned data and label (int) for class folders; `buckets` names each item's bucket
    (None for a square cache). Shards are memory-mapped and verified
    against their checksums on open (`verify=False` skips that)."""

    def __init__(self, cache_dir: str, verify: bool = True):
        manifest = read_manifest(cache_dir)
        if manifest is None:
            raise UserError(f"{cache_dir}: no {MANIFEST} — build the cache first (latentforge cache --out {cache_dir} ...)")
        if not manifest["complete"]:
            raise UserError(f"{cache_dir}: the cache was interrupted while building — re-run latentforge cache to finish it")
        self.root, self.manifest = cache_dir, manifest
        self.latent_stores = LatentStores(cache_dir, manifest, 1)
        self.latents = self.latent_stores.square  # the square cache's store (empty when bucketed)
        self.texts = ShardStore(cache_dir, "text", manifest["text"], 1)
        if verify:
            for store in (*self.latent_stores.stores(), self.texts):
                for name in store.shards:
                    store.verify(name)
        self.entries = manifest["entries"]
        self.classes: Optional[List[str]] = manifest["classes"]
        self.num_classes = len(self.classes) if self.classes else None
        self.conditioning: str = manifest["conditioning"]
        self.latent_shape = tuple(manifest["latent_shape"] or ())  # () for a bucketed cache
        # bucketed caches: each item's bucket name ("WxH" in pixels) and each bucket's latent (C, h, w)
        self.buckets: Optional[List[str]] = [e["bucket"] for e in self.entries] if manifest["settings"].get(
            "buckets") else None
        self.bucket_shapes = {n: tuple(s) for n, s in (manifest.get("bucket_shapes") or {}).items()}
        self.latent_side = _square_side(manifest["settings"].get("buckets"), self.bucket_shapes)  # model default
        null = manifest.get("null_text")
        row = self.texts.row(null) if null else None
        self.null_context = torch.from_numpy(row["context"].copy()) if row else None  # (L, D)
        self.null_mask = torch.from_numpy(row["mask"].copy()) if row else None  # (L,)
        self.null_pooled = torch.from_numpy(row["pooled"].copy()) if row and "pooled" in row else None  # (P,)

    def __len__(self) -> int:
        return len(self.entries)

    def check_unchanged(self) -> None:
        """CacheCorruptError if a shard file this dataset reads changed on disk since it was verified."""
        for store in (*self.latent_stores.stores(), self.texts):
            store.check_unchanged()

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        row = self.latent_stores.store(e.get("bucket")).row(e["key"])
        item = {"latent": torch.from_numpy(row["latent"].copy()), "id": e["id"]}  # (C, h, w)
        if e.get("text"):
            row = self.texts.row(e["text"])
            item["context"] = torch.from_numpy(row["context"].copy())  # (L, D)
            item["mask"] = torch.from_numpy(row["mask"].copy())  # (L,)
            item["caption"] = e.get("caption")  # the text the context encodes
            if "pooled" in row:
                item["pooled"] = torch.from_numpy(row["pooled"].copy())  # (P,)
        if e.get("original_size") is not None:  # SDXL micro-conditioning: (6,) size/crop numbers
            item["time_ids"] = time_ids(e["original_size"], e["crop_top_left"], e["target_size"])
        if e.get("label") is not None:
            item["label"] = int(e["label"])
        return item
