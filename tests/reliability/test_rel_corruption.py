"""Reliability 5: a flipped bit in a cache file or a checkpoint file is detected (by a checksum), named,
and never silently used.

Each case flips ONE bit where nothing but a checksum can notice it — inside a float of tensor data,
in a shard row number of the cache manifest, in the saved torch RNG state — then runs the real
command (`latentforge train --cache` / `train --resume`). Accepted outcomes: exit 2 with one `error:`
line naming the damaged file; or (checkpoints) a warning naming it, a resume from an older complete
checkpoint, and a final state bitwise equal to the uninterrupted run — proof the damage was not used.
"""

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from rel_kit import MAX_STEPS, assert_bitwise, clear_error, record, run_cli, weights

B64 = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def flip_bit(path: Path, offset: int, bit: int = 0) -> dict:
    raw = bytearray(path.read_bytes())
    before = raw[offset]
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))
    return {"file": path.name, "offset": offset, "byte": f"{before:#04x} -> {raw[offset]:#04x}"}


def safetensors_data_offset(path: Path, seed: int) -> int:
    """A seeded-random byte inside the tensor data (past the 8-byte length and the JSON header)."""
    raw = path.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    return random.Random(seed).randrange(start, len(raw))


def find(raw: bytes, needle: bytes, start: int = 0) -> int:
    i = raw.find(needle, start)
    assert i >= 0, needle
    return i


# ---- checkpoints -------------------------------------------------------------------------------

def damage_checkpoint(ckpt: Path, what: str) -> dict:
    if what.endswith(".safetensors"):
        return flip_bit(ckpt / what, safetensors_data_offset(ckpt / what, seed=len(what)), bit=0)
    # state.json: one base64 character of the saved torch RNG state, to its neighbour (still valid base64)
    raw = (ckpt / what).read_bytes()
    i = find(raw, b'"torch": "') + len('"torch": "') + 100
    while raw[i] not in B64 or raw[i] ^ 1 not in B64:
        i += 1
    return flip_bit(ckpt / what, i, bit=0)


@pytest.mark.parametrize("what", ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"])
def test_a_flipped_bit_in_a_checkpoint_is_detected_on_resume(world, tmp_path, capsys, what):
    out = tmp_path / "run"
    for step in (4, 8):  # a run that stopped at step 8, with an older complete checkpoint beside it
        shutil.copytree(world["ref"] / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    flipped = damage_checkpoint(out / "checkpoints" / "step-8", what)
    code, lines = run_cli(world.train_argv(out, "--resume"), capsys)
    named = [l for l in lines if what in l]
    if code == 0:  # recovered: it must say so and must not have used the damaged file
        same = all(torch_equal(a, b) for a, b in zip(weights(out, MAX_STEPS), world["ref_final"]))
        outcome = "resumed from an older checkpoint with a warning" if named and same else "SILENTLY USED"
    else:
        same = None
        verdict = clear_error(code, lines, what)
        outcome = "refused" if verdict == "ok" else f"failed badly ({verdict})"
    record(f"corrupt_checkpoint_{what.replace('.', '_')}", flipped=flipped, exit_code=code, stderr=lines,
           outcome=outcome)
    assert outcome in ("refused", "resumed from an older checkpoint with a warning"), (outcome, lines)


def torch_equal(a: dict, b: dict) -> bool:
    try:
        assert_bitwise(a, b)
        return True
    except AssertionError:
        return False


# ---- the latent cache --------------------------------------------------------------------------

def damage_cache(cache: Path, what: str) -> dict:
    if what == "latent shard":
        shard = sorted(cache.glob("latent-*.latent.npy"))[0]
        header = 10 + struct.unpack("<H", shard.read_bytes()[8:10])[0]  # .npy v1: magic, version, header length
        return flip_bit(shard, random.Random(5).randrange(header, shard.stat().st_size), bit=0)
    # manifest.json: the row number of the first index entry whose row is odd, to its even neighbour
    # (one bit: that key would now read another image's latent)
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    key, (shard, row) = next((k, v) for k, v in manifest["latents"]["index"].items() if v[1] % 2 == 1)
    raw = path.read_bytes()
    at = find(raw, json.dumps(key).encode())
    at = find(raw, json.dumps(shard).encode(), at) + len(json.dumps(shard))
    at = find(raw, str(row).encode(), at)
    return {**flip_bit(path, at, bit=0), "meaning": f"{key[:12]}…: row {row} -> {row ^ 1}"}


@pytest.mark.parametrize("what, names", [("latent shard", ".latent.npy"), ("manifest", "manifest.json")])
def test_a_flipped_bit_in_the_cache_is_detected_before_training(world, tmp_path, capsys, what, names):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    flipped = damage_cache(cache, what)
    argv = world.train_argv(tmp_path / "run")
    argv[argv.index("--cache") + 1] = str(cache)
    code, lines = run_cli(argv, capsys)
    ok = clear_error(code, lines, flipped["file"]) == "ok"
    outcome = "refused" if ok else ("SILENTLY USED" if code == 0 else f"failed badly (exit {code})")
    record(f"corrupt_cache_{what.replace(' ', '_')}", flipped=flipped, exit_code=code, stderr=lines, outcome=outcome)
    assert names in flipped["file"] and ok, f"{outcome}: {flipped}, exit {code}, stderr {lines}"
