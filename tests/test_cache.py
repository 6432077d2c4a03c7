"""The latent cache: equality with a direct AutoencoderKL.encode, incremental re-runs, a real kill
part-way, checksums, conditioning kinds, skipped files, and the `latentforge cache` command."""

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizer

from latentforge.cli import main
from latentforge.config import preset
from latentforge.data import shapes
from latentforge.data.cache import CacheCorruptError, LatentDataset, build_cache
from latentforge.errors import UserError
from latentforge.models import AutoencoderKL
from latentforge.text import TextEncoder
from tolerance import assert_same_function

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "green", "blue", "yellow", "circle",
         "square", "triangle", "at", "the", "top", "bottom", "left", "right", "on", "white", "black", "background"]


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(preset("tiny").vae).eval()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(d)
    BertTokenizer(str(d / "vocab.txt"), model_max_length=16).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def text(bert_dir):
    return TextEncoder.from_pretrained(bert_dir)


def data(tmp_path, n=8, seed=0, name="data"):
    shapes.write_dataset(str(tmp_path / name), n, size=32, seed=seed)
    return str(tmp_path / name)


def counting(vae):
    """Count the images that go through vae.encode."""
    vae.n_encoded, encode = 0, vae.encode

    def wrapped(x, **kw):
        vae.n_encoded += x.shape[0]
        return encode(x, **kw)

    vae.encode = wrapped
    return vae


def pixels(path):
    """Independent reference preprocessing of a 32x32 RGB png: (1, 3, 32, 32) in [-1, 1]."""
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def test_cached_latents_equal_direct_encode(tmp_path, text):
    d, vae = data(tmp_path, 6), tiny_vae()
    report = build_cache(d, vae, text, str(tmp_path / "c"), size=32, batch_size=4, flip=True, progress=False)
    assert (report.entries, report.encoded, report.reused, report.skipped) == (12, 12, 0, [])
    ds = LatentDataset(str(tmp_path / "c"))
    assert len(ds) == 12 and ds.conditioning == "text" and ds.latent_shape == (4, 8, 8)
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            png = os.path.join(d, item["id"].split("#")[0])
            x = pixels(png)
            if item["id"].endswith("#flip"):
                x = torch.flip(x, dims=[-1])
            torch.testing.assert_close(item["latent"], vae.encode(x)[0], atol=1e-6, rtol=0)
            caption = open(png[:-4] + ".txt", encoding="utf-8").read().strip()
            context, mask = text.encode([caption])
            torch.testing.assert_close(item["context"], context[0], atol=0, rtol=0)
            assert torch.equal(item["mask"], mask[0]) and "label" not in item
    null, null_mask = text.encode([""])
    torch.testing.assert_close(ds.null_context, null[0], atol=0, rtol=0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["latent"].shape == (5, 4, 8, 8) and batch["context"].shape == (5, 16, 16)
    blob = pickle.dumps(ds)  # what DataLoader workers under "spawn" receive: no copied arrays
    assert len(blob) < 20_000 and torch.equal(pickle.loads(blob)[7]["latent"], ds[7]["latent"])
    manifest = json.load(open(tmp_path / "c" / "manifest.json"))
    assert len(manifest["text"]["index"]) == len({e["caption"] for e in manifest["entries"]} | {""})  # deduplicated


def test_rerun_encodes_only_what_changed_and_drops_removed(tmp_path, text):
    d, out = data(tmp_path, 8), str(tmp_path / "c")
    build_cache(d, tiny_vae(), text, out, size=32, batch_size=3, shard_size=4, progress=False)
    vae = counting(tiny_vae())
    r = build_cache(d, vae, text, out, size=32, batch_size=3, shard_size=4, progress=False)
    assert (vae.n_encoded, r.encoded, r.reused, r.removed, r.texts_encoded) == (0, 0, 8, 0, 0)

    attrs = shapes.parse_caption(open(os.path.join(d, "00003.txt")).read())
    shapes.render(attrs, 32, jitter=0.0).save(os.path.join(d, "00003.png"))  # same caption, new pixels
    vae = counting(tiny_vae())
    r = build_cache(d, vae, text, out, size=32, batch_size=3, shard_size=4, progress=False)
    assert (vae.n_encoded, r.encoded, r.reused, r.removed, r.texts_encoded) == (1, 1, 7, 1, 0)
    ds = LatentDataset(out)
    torch.testing.assert_close(ds[3]["latent"], vae.encode(pixels(os.path.join(d, "00003.png")))[0], atol=1e-6, rtol=0)

    # Shards now: [0 1 2 3-stale] [4 5 6 7] [3]. Remove 6 of 8: the first shard is all stale (deleted),
    # the second has 1 live row of 4 (repacked into a new shard), the third stays.
    for i in (0, 1, 2, 4, 5, 6):
        os.remove(os.path.join(d, f"{i:05d}.png"))
        os.remove(os.path.join(d, f"{i:05d}.txt"))
    vae = counting(tiny_vae())
    r = build_cache(d, vae, text, out, size=32, batch_size=3, shard_size=4, progress=False)
    assert (vae.n_encoded, r.entries, r.removed) == (0, 2, 6)
    ds = LatentDataset(out)
    assert [ds[i]["id"] for i in range(len(ds))] == ["00003.png", "00007.png"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert sorted(s["rows"] for s in manifest["latents"]["shards"].values()) == [1, 1]
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(out, "latent-*"))}
    assert on_disk == {f["file"] for s in manifest["latents"]["shards"].values() for f in s["files"].values()}
    for i in range(2):
        png = os.path.join(d, ds[i]["id"])
        torch.testing.assert_close(ds[i]["latent"], vae.encode(pixels(png))[0], atol=1e-6, rtol=0)


def test_identical_files_are_encoded_once(tmp_path):
    d = data(tmp_path, 3)
    for ext in ("png", "txt"):
        os.link(os.path.join(d, f"00000.{ext}"), os.path.join(d, f"copy.{ext}"))
    vae = counting(tiny_vae())
    r = build_cache(d, vae, None, str(tmp_path / "c"), size=32, progress=False)
    assert (vae.n_encoded, r.entries) == (3, 4)
    ds = LatentDataset(str(tmp_path / "c"))
    assert ds.conditioning == "none" and "context" not in ds[0] and ds.null_context is None
    assert torch.equal(ds[0]["latent"], ds[3]["latent"])  # 00000.png and copy.png


def test_the_size_limits_given_are_the_ones_the_encode_applies(tmp_path):
    """`min_size` / `max_pixels` (cache --min-size / --max-pixels) hold for the encode as for the scan: a 12 px image
    under min_size=8 is cached (it was skipped as smaller than the default 16 px after the scan had accepted it)."""
    d = tmp_path / "small"
    d.mkdir()
    for name, side in (("a.png", 12), ("b.png", 40)):
        Image.fromarray(np.full((side, side, 3), 100, np.uint8)).save(d / name)
    r = build_cache(str(d), tiny_vae(), None, str(tmp_path / "c"), size=32, progress=False, min_size=8)
    assert (r.entries, r.skipped) == (2, []), [(s.path, s.detail) for s in r.skipped]
    r = build_cache(str(d), tiny_vae(), None, str(tmp_path / "c16"), size=32, progress=False)  # the default: 16 px
    assert r.entries == 1 and [s.reason for s in r.skipped] == ["too_small"]


KILLED_RUN = """
import sys, time, torch
torch.set_num_threads(1)
from latentforge.config import preset
from latentforge.data.cache import build_cache
from latentforge.models import AutoencoderKL
from latentforge.text import TextEncoder
torch.manual_seed(0)
vae = AutoencoderKL(preset("tiny").vae).eval()
encode = vae.encode
def slow(x, **kw):  # slow enough for the parent to kill us part-way
    time.sleep(0.3)
    return encode(x, **kw)
vae.encode = slow
build_cache(sys.argv[1], vae, TextEncoder.from_pretrained(sys.argv[3]), sys.argv[2], size=32, batch_size=2,
            shard_size=2, progress=False)
print("finished")
"""


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(tmp_path, bert_dir, text):
    d, out = data(tmp_path, 16), str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, d, out, bert_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest_path, deadline = os.path.join(out, "manifest.json"), time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(manifest_path) and json.load(open(manifest_path))["latents"]["shards"]:
            break  # at least one latent shard is finished
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.load(open(manifest_path))
    assert manifest["complete"] is False and 2 <= len(manifest["latents"]["index"]) < 16
    with pytest.raises(UserError, match="interrupted"):
        LatentDataset(out)

    vae = counting(tiny_vae())
    r = build_cache(d, vae, text, out, size=32, batch_size=2, shard_size=2, progress=False)
    assert r.reused >= 2 and r.encoded == vae.n_encoded == 16 - r.reused
    fresh = str(tmp_path / "fresh")
    build_cache(d, tiny_vae(), text, fresh, size=32, batch_size=5, shard_size=7, progress=False)
    a, b = LatentDataset(out), LatentDataset(fresh)
    assert len(a) == len(b) == 16
    for i in range(16):
        x, y = a[i], b[i]
        assert x["id"] == y["id"]
        torch.testing.assert_close(x["latent"], y["latent"], atol=1e-6, rtol=0)
        torch.testing.assert_close(x["context"], y["context"], atol=0, rtol=0)
        assert torch.equal(x["mask"], y["mask"])
    assert not glob.glob(os.path.join(out, "*.tmp-*"))
    assert sorted(a.manifest["entries"], key=str) == sorted(b.manifest["entries"], key=str)


def test_a_flipped_byte_is_a_named_error_and_the_next_build_repairs_it(tmp_path):
    d, out = data(tmp_path, 4), str(tmp_path / "c")
    build_cache(d, tiny_vae(), None, out, size=32, shard_size=2, progress=False)
    shard = sorted(glob.glob(os.path.join(out, "latent-*.npy")))[0]
    raw = bytearray(open(shard, "rb").read())
    raw[-3] ^= 0x01
    open(shard, "wb").write(bytes(raw))
    with pytest.raises(CacheCorruptError, match=f"{os.path.basename(shard)}: checksum mismatch"):
        LatentDataset(out)
    assert LatentDataset(out, verify=False)[0]["latent"].shape == (4, 8, 8)
    vae = counting(tiny_vae())
    build_cache(d, vae, None, out, size=32, shard_size=2, progress=False)
    assert vae.n_encoded == 2 and len(LatentDataset(out)) == 4  # only the corrupt shard's rows


def test_half_written_files_are_never_read_and_get_cleaned_up(tmp_path):
    d, out = data(tmp_path, 3), str(tmp_path / "c")
    build_cache(d, tiny_vae(), None, out, size=32, progress=False)
    open(os.path.join(out, "latent-0123456789abcdef.latent.npy.tmp-999"), "wb").write(b"\x93NUMPY half")
    open(os.path.join(out, "latent-fedcba9876543210.latent.npy"), "wb").write(b"\x93NUMPY half")
    assert len(LatentDataset(out)) == 3  # the manifest does not name them
    build_cache(d, tiny_vae(), None, out, size=32, progress=False)
    assert sorted(n for n in os.listdir(out) if "0123" in n or "fedc" in n) == []


def test_class_folders_give_labels_and_class_names(tmp_path):
    for cls, colour in (("reds", (200, 0, 0)), ("blues", (0, 0, 200))):
        os.makedirs(tmp_path / "d" / cls)
        for i in range(2):
            Image.new("RGB", (48, 32), colour).save(tmp_path / "d" / cls / f"{i}.png")
    build_cache(str(tmp_path / "d"), tiny_vae(), "default", str(tmp_path / "c"), size=32, progress=False)
    ds = LatentDataset(str(tmp_path / "c"))  # "default" is never loaded: no captions
    assert ds.classes == ["blues", "reds"] and ds.num_classes == 2 and ds.conditioning == "class"
    assert [(ds[i]["id"], ds[i]["label"]) for i in range(4)] == [
        ("blues/0.png", 0), ("blues/1.png", 0), ("reds/0.png", 1), ("reds/1.png", 1)]
    assert "context" not in ds[0]


def test_bad_files_go_to_skipped_jsonl_and_strict_fails(tmp_path):
    d = data(tmp_path, 3)
    full = open(os.path.join(d, "00001.png"), "rb").read()
    open(os.path.join(d, "00001.png"), "wb").write(full[: len(full) // 2])  # found only when decoding
    open(os.path.join(d, "empty.png"), "wb").close()
    out = str(tmp_path / "c")
    r = build_cache(d, tiny_vae(), None, out, size=32, progress=False)
    assert r.entries == 2 and sorted(s.reason for s in r.skipped) == ["truncated", "zero_bytes"]
    rows = [json.loads(line) for line in open(os.path.join(out, "skipped.jsonl"))]
    assert sorted((os.path.basename(r["path"]), r["reason"]) for r in rows) == [
        ("00001.png", "truncated"), ("empty.png", "zero_bytes")]
    with pytest.raises(UserError, match="--strict: skipped 1 file"):
        build_cache(d, tiny_vae(), None, str(tmp_path / "c2"), size=32, strict=True, progress=False)
    os.remove(os.path.join(d, "empty.png"))
    with pytest.raises(UserError, match=r"--strict: .*00001.png \(truncated"):
        build_cache(d, tiny_vae(), None, str(tmp_path / "c3"), size=32, strict=True, progress=False)


def test_bad_arguments_are_user_errors(tmp_path):
    d = data(tmp_path, 1)
    with pytest.raises(UserError, match="--size 30: must be a positive multiple"):
        build_cache(d, tiny_vae(), None, str(tmp_path / "c"), size=30, progress=False)
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "thesis.tex").write_text("important")
    with pytest.raises(UserError, match="not a latent cache"):
        build_cache(d, tiny_vae(), None, str(tmp_path / "other"), size=32, progress=False)
    with pytest.raises(UserError, match="no manifest.json"):
        LatentDataset(str(tmp_path / "other"))


def test_cli_cache_end_to_end(tmp_path, bert_dir, capsys):
    d, root = data(tmp_path, 4), tmp_path / "model"
    vae = tiny_vae()
    vae.save_pretrained(str(root / "vae"))
    argv = ["cache", "--data", d, "--vae", str(root), "--out", str(tmp_path / "c"), "--text-encoder", bert_dir,
            "--size", "32", "--batch-size", "3", "--flip", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    assert "8 latents (8 encoded, 0 reused" in capsys.readouterr().out
    argv[4] = str(root / "vae")  # a vae/ folder works too
    assert main(argv) == 0
    assert "8 latents (0 encoded, 8 reused" in capsys.readouterr().out
    ds = LatentDataset(str(tmp_path / "c"))
    with torch.no_grad():
        torch.testing.assert_close(ds[0]["latent"], vae.encode(pixels(os.path.join(d, "00000.png")))[0], atol=1e-6, rtol=0)
    assert main(["cache", "--data", str(tmp_path / "nope"), "--vae", str(root), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope: not a data folder" in err and err.count("\n") == 1
    assert main(["cache", "--data", d, "--vae", str(tmp_path / "novae"), "--out", str(tmp_path / "c")]) == 2
    assert "--vae" in capsys.readouterr().err


def test_sdxl_dual_encoder_cache_stores_pooled_and_zero_null(tmp_path):
    """SDXL's two encoders are cached like one: context (L, 64), mask and the pooled (24,) per caption;
    the null condition is force_zeros_for_empty_prompt's zeros."""
    from sdxl_kit import write_text_encoders

    enc = TextEncoder.from_pretrained(str(write_text_encoders(tmp_path / "te")))
    d, vae = data(tmp_path, 3), tiny_vae()
    build_cache(d, vae, enc, str(tmp_path / "c"), size=32, progress=False)
    ds = LatentDataset(str(tmp_path / "c"))
    assert ds.manifest["settings"]["pooled_dim"] == 24
    for i in range(len(ds)):
        caption = open(os.path.join(d, ds[i]["id"])[:-4] + ".txt", encoding="utf-8").read().strip()
        context, mask, pooled = enc.encode_pooled([caption])
        # batched (the cache) vs one caption: the same function, other GEMM shapes
        assert_same_function(ds[i]["context"], context[0], enc.models[0] if hasattr(enc, "models") else enc.model,
                             positions=3 * 77, what="context")
        assert_same_function(ds[i]["pooled"], pooled[0], enc.models[-1] if hasattr(enc, "models") else enc.model,
                             positions=3 * 77, what="pooled")
    assert ds.null_context.shape == (77, 64) and not ds.null_context.any()
    assert ds.null_pooled.shape == (24,) and not ds.null_pooled.any()
    again = build_cache(d, vae, enc, str(tmp_path / "c"), size=32, progress=False)  # incremental: nothing new
    assert again.texts_encoded == 0 and again.encoded == 0
