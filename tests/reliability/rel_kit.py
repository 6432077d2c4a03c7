"""Shared helpers for the reliability suite: tiny models and data on disk, the real CLI as a child
process, waiting on a run's progress, bitwise weight comparison, and the figures each test measured.

Figures: `record(name, **values)` prints them and, when $LATENTFORGE_FIGURES names a folder, writes
`<folder>/<name>.json`; `make_doc.py` turns that folder into docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

# Child processes: one thread (bitwise equality with the in-process runs needs the same reductions),
# offline, no colour/progress noise on stderr.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def child_env(**extra) -> dict:
    env = {**os.environ, **CHILD_ENV, **extra}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---- the CLI as a child process --------------------------------------------------------------

def cli(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    """`python -m latentforge ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "latentforge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), cwd=kw.pop("cwd", None), **kw)


def spawn(*args, wrapper: str | None = None) -> subprocess.Popen:
    """`python -m latentforge ARGS` in the background; `wrapper` = a python file that patches
    something, then calls latentforge.cli.main(ARGS) (a fault injected inside the real entry point)."""
    head = [sys.executable, wrapper] if wrapper else [sys.executable, "-m", "latentforge"]
    return subprocess.Popen([*head, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())


def wait_for(cond, timeout=120.0, proc: subprocess.Popen | None = None, what="condition"):
    """Poll `cond()` until true; fail early (with its stderr) if `proc` exits first."""
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def run_cli(argv, capsys, want_stdout=False):
    """latentforge.cli.main(argv) in this process -> (exit code, stderr lines[, stdout]). An exception
    escaping main (a traceback for the user) becomes the code "traceback (...)", so a test can report it."""
    from latentforge.cli import main

    try:
        code = main([str(a) for a in argv])
    except BaseException as e:
        code = f"traceback ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    return (code, lines, out) if want_stdout else (code, lines)


def clear_error(code, lines, names: str, warnings_ok=True) -> str:
    """"ok" when a command failed the way a user should see it: exit 2, no traceback, exactly one
    `error: ...` line that contains `names` (other lines only `warning: ...`, if `warnings_ok`);
    else what is wrong."""
    if code == 0:
        return "exit 0"
    if isinstance(code, str) or any("Traceback" in l for l in lines):
        return f"traceback: {code}"
    errors = [l for l in lines if l.startswith("error: ")]
    others = [l for l in lines if not l.startswith("error: ") and not (warnings_ok and l.startswith("warning: "))]
    if code != 2 or len(errors) != 1 or others:
        return f"exit {code}, {len(errors)} error line(s), {len(others)} other line(s)"
    return "ok" if names in errors[0] else f"the error line does not name {names!r}"


# ---- runs and checkpoints --------------------------------------------------------------------

def logged_steps(run) -> list[int]:
    """Steps in `run/metrics.jsonl` (log_every=1 -> every finished optimizer step)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def ckpt_steps(run) -> list[int]:
    from latentforge.train import checkpoint

    return checkpoint.complete_steps(Path(run) / "checkpoints")


def weights(run, step) -> tuple[dict, dict]:
    """(model, EMA) tensors of `run/checkpoints/step-<step>`."""
    d = Path(run) / "checkpoints" / f"step-{step}"
    return load_file(str(d / "model.safetensors")), load_file(str(d / "ema.safetensors"))


def assert_bitwise(a: dict, b: dict) -> int:
    """Every tensor equal bit for bit; returns the number of tensors compared."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    return len(a)


def tree_digest(folder) -> dict:
    """{relative path: sha256} of every file under `folder` (to prove it was left untouched). The folder's
    lock file (latentforge.locks: who is working in it) is not the user's data and is left out."""
    import hashlib

    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


LOCK_NAME = ".latentforge.lock"  # latentforge.locks.LOCK_NAME (spelled out: the suite also runs on older trees)


# ---- tiny models and data --------------------------------------------------------------------

def tiny_vae(seed=0):
    from latentforge.config import preset
    from latentforge.models import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(preset("tiny").vae).eval()


def save_tiny_vae(folder, seed=0) -> Path:
    """A model root holding `vae/` (what --vae accepts)."""
    tiny_vae(seed).save_pretrained(str(Path(folder) / "vae"))
    return Path(folder)


def class_folders(folder, n_per_class=4, size=32, seed=0) -> Path:
    """Two class folders of small noisy solid-colour PNGs (no captions: no text encoder needed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, colour in (("reds", (200, 30, 30)), ("blues", (30, 30, 200))):
        os.makedirs(Path(folder) / cls, exist_ok=True)
        for i in range(n_per_class):
            x = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(x).save(Path(folder) / cls / f"{i}.png")
    return Path(folder)


def build_tiny_cache(data, vae_root, out):
    from latentforge.data.cache import build_cache
    from latentforge.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(Path(vae_root) / "vae"))
    return build_cache(str(data), vae, None, str(out), size=32, progress=False)


# ---- figures ---------------------------------------------------------------------------------

def record(name: str, **values) -> dict:
    print(f"[figures] {name}: {json.dumps(values, default=str)}")
    folder = os.environ.get("LATENTFORGE_FIGURES")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(values, f, indent=1, default=str)
    return values


# ---- the shared world: data, VAE, cache and an uninterrupted reference run ---------------------

# 8 latents, batch 4: an epoch is 2 steps; a checkpoint every 4. A constant LR (after warmup) makes
# max_steps bookkeeping, so a child that is going to be killed can run "forever" (max_steps=1000) and
# its resume still stop at MAX_STEPS — no race with a child that finishes before the kill.
MAX_STEPS, EVERY = 24, 4
SETTINGS = ["model=tiny", "batch_size=4", f"max_steps={MAX_STEPS}", "lr=1e-3", "lr_schedule=constant",
            "warmup_steps=2", "log_every=1", f"checkpoint_every={EVERY}", "keep_checkpoints=2", "sample_every=0"]
FOREVER = "max_steps=1000"


class World(dict):
    def train_argv(self, out, *extra) -> list[str]:
        return ["train", "--cache", str(self["cache"]), "--vae", str(self["vae"]), "--out", str(out), "--quiet",
                *SETTINGS, *extra]


def losses(run) -> list:
    return [json.loads(l)["loss"] for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def make_world(root) -> World:
    from latentforge.cli import main

    root = Path(root)
    vae = save_tiny_vae(root / "model")
    build_tiny_cache(class_folders(root / "data"), vae, root / "cache")
    w = World(root=root, vae=vae, cache=root / "cache", data=root / "data")
    ref = root / "reference"
    assert main(w.train_argv(ref, "keep_checkpoints=0")) == 0  # every checkpoint kept, to compare against
    w.update(ref=ref, ref_final=weights(ref, MAX_STEPS), ref_losses=losses(ref))
    return w


# ---- a tiny text-conditional model folder (second round) ---------------------------------------

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "green", "circle",
              "square", "at", "the", "top", "left", "bottom", "right", "on", "white", "black", "background"]


def text_model_folder(folder, max_length=16) -> Path:
    """A tiny BERT text encoder (its real 23-word tokenizer) + tiny UNet + tiny VAE, saved as a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from latentforge.config import ScheduleConfig, UNetConfig
    from latentforge.formats import save_model_folder
    from latentforge.models import UNet
    from latentforge.text import TextEncoder

    folder = Path(folder)
    tok_dir = folder.parent / (folder.name + "-bert")
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=4, max_position_embeddings=64))
    tok = BertTokenizer(str(tok_dir / "vocab.txt"), model_max_length=64)
    unet = UNet(UNetConfig(channels=(16, 32), layers_per_level=1, attention=(False, True), num_heads=2,
                           cross_attention_dim=32, norm_groups=8, sample_size=8, in_channels=4, out_channels=4))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # a fresh UNet predicts exactly 0
    return save_model_folder(folder, unet, tiny_vae(), ScheduleConfig(),
                             text_encoder=TextEncoder(bert, tok, max_length=max_length))


def check_case(cases: dict, before: dict, prefix: str, fault: str, *args) -> None:
    """Run the case `cases[fault]` (with the test's fixtures `args`), record what it did against what the earlier
    code did (`before[case]`) as `<prefix>_NN`, and assert it was handled."""
    case = cases[fault]
    ok, lines, figure = case(*args)
    now = " / ".join(lines) or "(nothing on stderr)"
    record(f"{prefix}_{list(cases).index(fault):02d}", fault=fault, before=before[case], now=now, figure=figure,
           verdict="ok" if ok else "NOT HANDLED")
    assert ok, (fault, lines, figure)
