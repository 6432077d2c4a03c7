"""Reliability 7: command-line mistakes. Each row runs `python -m latentforge ...` as a child process and
must give a non-zero exit, no traceback, and exactly one stderr line `error: ...` that names the
problem (the flag, key, file or value in the row's last column).

All rows run once, two at a time, in a module fixture; one test per row reads its result.
"""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from rel_kit import cli, record, save_tiny_vae

pytestmark = pytest.mark.slow


class Ctx:
    """Paths the rows refer to: the shared world plus a few prepared mistakes."""

    def __init__(self, w, tmp: Path):
        self.w, self.tmp, self.nope = w, tmp, str(tmp / "does-not-exist")
        self.cache, self.vae, self.data = str(w["cache"]), str(w["vae"]), str(w["data"])
        self.model, self.ref = str(w["ref"] / "model"), str(w["ref"])
        (tmp / "a_file").write_text("x")
        (tmp / "thesis").mkdir()
        (tmp / "thesis" / "chapter1.tex").write_text("important")
        (tmp / "bad.toml").write_text("lr = [unclosed\n")
        self.other_vae = str(save_tiny_vae(tmp / "other_vae", seed=1))
        self.changed = tmp / "changed"  # a run stopped at step 8, to be resumed with another learning rate
        shutil.copytree(w["ref"] / "checkpoints" / "step-8", self.changed / "checkpoints" / "step-8")
        Image.new("RGB", (32, 32)).save(tmp / "in.png")
        Image.new("L", (16, 16)).save(tmp / "small_mask.png")
        self.img = ["--image", str(tmp / "in.png")]

    def cache_cmd(self, *extra, data=None, vae=None, out=None):
        return ["cache", "--data", data or self.data, "--vae", vae or self.vae, "--out", out or str(self.tmp / "c"),
                "--text-encoder", "none", "--quiet", "--device", "cpu", *extra]

    def train(self, *extra, out=None, cache=None, vae=None):
        # a run folder per row: rows run two at a time, and a run folder admits one process (latentforge.locks)
        self.runs = getattr(self, "runs", 0) + 1
        out = out or str(self.tmp / f"run-{self.runs}")
        return ["train", "--cache", cache or self.cache, "--vae", vae or self.vae, "--out", out, "--quiet",
                "model=tiny", "max_steps=2", "sample_every=0", *extra]

    def gen(self, cmd, *extra, model=None):
        return [cmd, "--model", model or self.model, "--out", str(self.tmp / "gen"), "--steps", "2", "--device", "cpu",
                *extra]


# (row id, argv from a Ctx, the text the one error line must contain)
ROWS = [
    # --- the latent cache ---
    ("cache: data folder missing", lambda c: c.cache_cmd(data=c.nope), "does-not-exist"),
    ("cache: --vae folder missing", lambda c: c.cache_cmd(vae=c.nope), "--vae"),
    ("cache: --vae is a UNet folder", lambda c: c.cache_cmd(vae=c.model + "/unet"), "unet"),
    ("cache: --size not a multiple of 4", lambda c: c.cache_cmd("--size", "30"), "--size 30"),
    ("cache: negative --size", lambda c: c.cache_cmd("--size", "-32"), "--size"),
    ("cache: --out is a file", lambda c: c.cache_cmd(out=str(c.tmp / "a_file")), "a_file"),
    ("cache: --out is someone's folder", lambda c: c.cache_cmd(out=str(c.tmp / "thesis")), "thesis"),
    ("cache: unknown --device", lambda c: c.cache_cmd("--device", "gpu7"), "--device"),
    ("cache: --batch-size not a number", lambda c: c.cache_cmd("--batch-size", "many"), "--batch-size"),
    ("cache: --data missing", lambda c: ["cache", "--vae", c.vae, "--out", str(c.tmp / "c")], "--data"),
    # --- training settings ---
    ("train: unknown key", lambda c: c.train("colour=red"), "colour"),
    ("train: misspelt key", lambda c: c.train("max_step=10"), "max_steps"),
    ("train: wrong type", lambda c: c.train("lr=fast"), "lr"),
    ("train: negative steps", lambda c: c.train("max_steps=-5"), "max_steps"),
    ("train: batch_size 0", lambda c: c.train("batch_size=0"), "batch_size"),
    ("train: unknown prediction type", lambda c: c.train("schedule.prediction_type=noise"), "prediction_type"),
    ("train: unknown preset", lambda c: c.train("model=huge"), "huge"),
    ("train: override without =", lambda c: c.train("lr"), "lr"),
    ("train: fp16 on a CPU", lambda c: c.train("precision=fp16", "device=cpu"), "fp16"),
    ("train: --config missing", lambda c: c.train("--config", c.nope + ".toml"), "does-not-exist.toml"),
    ("train: --config not TOML", lambda c: c.train("--config", str(c.tmp / "bad.toml")), "bad.toml"),
    # --- training inputs ---
    ("train: --cache missing", lambda c: c.train(cache=c.nope), "--cache"),
    ("train: --cache is a data folder", lambda c: c.train(cache=c.data), "manifest.json"),
    ("train: --out missing", lambda c: ["train", "--cache", c.cache, "--vae", c.vae, "model=tiny"], "--out"),
    ("train: --vae is not the cache's VAE", lambda c: c.train(vae=c.other_vae), "--vae"),
    ("train: --out already a run, no --resume", lambda c: c.train(out=c.ref), "--resume"),
    ("train: --resume with changed math",
     lambda c: c.w.train_argv(c.changed, "lr=5e-4", "--resume"), "lr (0.001 -> 0.0005)"),
    # --- generation ---
    ("sample: --model missing", lambda c: c.gen("sample", model=c.nope), "does-not-exist"),
    ("sample: --model is a VAE folder", lambda c: c.gen("sample", model=c.model + "/vae"), "vae"),
    ("sample: unknown sampler", lambda c: c.gen("sample", "--sampler", "euler-z"), "euler-z"),
    ("sample: --size not WxH", lambda c: c.gen("sample", "--size", "big"), "--size big"),
    ("sample: --steps 0", lambda c: c.gen("sample", "--steps", "0"), "--steps"),
    ("sample: --class out of range", lambda c: c.gen("sample", "--class", "99"), "--class"),
    ("img2img: --strength 1.5", lambda c: c.gen("img2img", *c.img, "--strength", "1.5"), "--strength"),
    ("inpaint: mask of another size",
     lambda c: c.gen("inpaint", *c.img, "--mask", str(c.tmp / "small_mask.png")), "mask"),
    ("shapes: --n -1", lambda c: ["shapes", "--out", str(c.tmp / "s"), "--n", "-1"], "--n"),
    ("eval: --model missing", lambda c: ["eval", "--model", c.nope], "does-not-exist"),
    ("unknown command", lambda c: ["trian", "--out", str(c.tmp / "x")], "trian"),
]


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    c = Ctx(world, tmp_path_factory.mktemp("cli_mistakes"))
    rows = [(name, argv(c), names) for name, argv, names in ROWS]
    def timed(row):
        t = time.perf_counter()
        return cli(*row[1], timeout=240), time.perf_counter() - t

    with ThreadPoolExecutor(2) as pool:  # two at a time: the rows are independent processes
        done = list(pool.map(timed, rows))
    out = {}
    for (name, argv, names), (p, seconds) in zip(rows, done):
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        out[name] = {"argv": argv, "names": names, "code": p.returncode, "lines": lines,
                     "traceback": "Traceback" in p.stderr, "seconds": round(seconds, 1)}
    ok = sum(1 for r in out.values() if verdict(r) == "ok")
    record("cli_mistakes", rows=len(out), one_clear_line=ok,
           table={k: {"exit": r["code"], "stderr": r["lines"][-1:] if r["traceback"] else r["lines"][:2],
                      "stderr_lines": len(r["lines"]), "verdict": verdict(r), "seconds": r["seconds"]}
                  for k, r in out.items()})
    return out


def verdict(r) -> str:
    if r["code"] == 0:
        return "exit 0"
    if r["traceback"]:
        return "traceback"
    if len(r["lines"]) != 1 or not r["lines"][0].startswith("error: "):
        return f"{len(r['lines'])} lines"
    return "ok" if r["names"] in r["lines"][0] else f"does not name {r['names']!r}"


@pytest.mark.parametrize("name", [row[0] for row in ROWS])
def test_mistake_gives_one_error_line(results, name):
    r = results[name]
    v = verdict(r)
    assert v == "ok", f"{v}: latentforge {' '.join(map(str, r['argv']))} -> exit {r['code']}: " + " / ".join(
        r["lines"][-3:])
