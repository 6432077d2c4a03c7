"""Reliability, second round: what latentforge writes, and where.

6. SIGKILL while an output is being written never leaves a 0-byte or truncated file under its final name:
   every output goes to a temporary name in the same folder and is renamed when complete (latentforge.io).
   A child `latentforge sample` is killed halfway through writing its PNG; a static check finds every
   other write in src/ going through latentforge.io.
7. `--out` naming an existing file (or a path under a file): one line before any work, in every command.
3. (cache, train-vae) A second process on the same cache folder / VAE run folder gets one line naming the
   holder's pid; after kill -9 of the holder the next run goes ahead (the OS lock died with it).
"""

import ast
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from rel_kit import ROOT, clear_error, logged_steps, record, run_cli, spawn, wait_for

SRC = ROOT / "src" / "latentforge"

KILL_IN_SAVE = '''
import io as _io, os, signal, sys
from PIL import Image
_save = Image.Image.save

def save(self, fp, format=None, **kw):  # the PNG's first half reaches the disk, then the process dies
    buf = _io.BytesIO()
    _save(self, buf, format=format or "PNG", **kw)
    f = open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

Image.Image.save = save
from latentforge.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_sigkill_while_a_png_is_written_leaves_no_truncated_file(world, tmp_path):
    wrapper = tmp_path / "kill_in_save.py"
    wrapper.write_text(KILL_IN_SAVE)
    out = tmp_path / "out"
    child = spawn("sample", "--model", world["ref"] / "model", "--class", "0", "--steps", "1", "--out", out,
                  wrapper=str(wrapper))
    _, err = child.communicate(timeout=300)
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    final = [n for n in files if n.endswith(".png")]
    record("atomic_sigkill_sample", exit=child.returncode, files_left=files, under_a_final_name=final)
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    assert final == [], files  # a temporary name at most; never 00000-0.png half written


# (file, function) -> why it may write without latentforge.io
ALLOWED = {
    ("train/checkpoint.py", "save"): "tensors into the temporary checkpoint folder; the folder's rename is atomic",
    ("train/checkpoint.py", "_write_synced"): "state.json / COMPLETE inside that temporary folder",
    ("train/report.py", "log"): "metrics.jsonl is append-only; a torn last line is skipped by read_metrics",
}
WRITERS = {"write_text", "write_bytes", "savefig", "save", "save_file"}  # as methods (x.save(...))
BARE_WRITERS = {"save_file"}  # as plain names (safetensors' `save` only returns bytes)


def _is_atomic_path(node) -> bool:
    f = getattr(node, "func", None)
    return (isinstance(f, ast.Attribute) and f.attr == "atomic_path") or (isinstance(f, ast.Name) and f.id == "atomic_path")


def _own_modules(tree) -> set:
    """Names bound to latentforge modules (`from . import io`, `from . import resume as runs`): a call on one of
    them is checked where that module defines it."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("latentforge")):
            names |= {a.asname or a.name for a in node.names}
    return names


def _writes(tree):
    """(function name, line, what) of each call that writes a file directly."""
    own = _own_modules(tree)
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        guarded = {id(c) for w in ast.walk(fn) if isinstance(w, ast.With) and any(_is_atomic_path(i.context_expr)
                                                                                 for i in w.items)
                   for c in ast.walk(w)}  # inside `with io.atomic_path(...) as tmp:` the name is a temporary one
        for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call) and id(n) not in guarded]:
            f = call.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            receiver = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            first = call.args[0].id if call.args and isinstance(call.args[0], ast.Name) else ""
            method = isinstance(f, ast.Attribute)
            if (name in WRITERS if method else name in BARE_WRITERS) and receiver not in own and first != "f":
                yield fn.name, call.lineno, name
            if name == "open" and not receiver:
                mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+"):
                    yield fn.name, call.lineno, f"open(..., {mode.value!r})"


def test_every_write_in_src_goes_through_the_atomic_helper():
    found, allowed = [], []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if rel == "io.py":
            continue
        for fn, line, what in _writes(ast.parse(path.read_text())):
            (allowed if (rel, fn) in ALLOWED else found).append(f"{rel}:{line} {fn}: {what}")
    record("atomic_static", direct_writes=found, allowed=allowed, reasons=list(ALLOWED.values()))
    assert found == [], found


# ---- --out that cannot be a folder --------------------------------------------------------------

def out_cases(world, tmp):
    model = world["ref"] / "model"
    return {
        "train": world.train_argv("{out}", "max_steps=1"),
        "train-vae": ["train-vae", "--data", world["data"], "--out", "{out}", "model=tiny", "max_steps=1"],
        "cache": ["cache", "--data", world["data"], "--vae", world["vae"], "--out", "{out}", "--text-encoder", "none"],
        "sample": ["sample", "--model", model, "--class", "0", "--steps", "1", "--out", "{out}"],
        "img2img": ["img2img", "--model", model, "--class", "0", "--steps", "1", "--strength", "1", "--image",
                    world["data"] / "reds" / "0.png", "--out", "{out}"],
        "shapes": ["shapes", "--n", "4", "--out", "{out}"],
        "demo": ["demo", "--budget", "tiny", "--out", "{out}"],
        "eval": ["eval", "--model", model, "--n", "1", "--out", "{out}"],
    }


@pytest.mark.parametrize("where", ["an existing file", "a path under a file"])
def test_out_naming_a_file_is_one_line_before_any_work(world, tmp_path, capsys, monkeypatch, where):
    import latentforge
    from latentforge.pipelines import Pipeline

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(latentforge, "load", no_work)
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(no_work))
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("the user's notes\n")
    out = blocker if where == "an existing file" else blocker / "sub"
    rows = {}
    for command, argv in out_cases(world, tmp_path).items():
        t = time.perf_counter()
        code, lines = run_cli([str(out) if a == "{out}" else a for a in argv], capsys)
        rows[command] = {"exit": code, "verdict": clear_error(code, lines, str(blocker)), "stderr": " / ".join(lines),
                         "s": round(time.perf_counter() - t, 2)}
    record(f"out_is_a_file_{where.replace(' ', '_')}", **rows)
    assert blocker.read_text() == "the user's notes\n"
    assert {c: r["verdict"] for c, r in rows.items() if r["verdict"] != "ok"} == {}, rows


# ---- one process per cache folder / VAE run ------------------------------------------------------

SLOW_ENCODE = '''
import sys, time
import latentforge.models.vae as vae
vae.AutoencoderKL.encode = lambda self, x: time.sleep(600)  # holds the cache folder "forever"
from latentforge.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _holder_pid(folder):
    lock = Path(folder) / ".latentforge.lock"
    return lock.is_file() and lock.read_text().split(" ")[0]


def test_a_second_cache_on_the_same_folder_is_refused_until_the_first_dies(world, tmp_path, capsys):
    wrapper = tmp_path / "slow_encode.py"
    wrapper.write_text(SLOW_ENCODE)
    out = tmp_path / "cache"
    argv = ["cache", "--data", world["data"], "--vae", world["vae"], "--out", out, "--text-encoder", "none", "--quiet"]
    child = spawn(*argv, wrapper=str(wrapper))
    try:
        wait_for(lambda: _holder_pid(out) == str(child.pid), proc=child, what="the first cache to hold the lock")
        code, lines = run_cli(argv, capsys)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    code2, lines2 = run_cli(argv, capsys)
    verdict = clear_error(code, lines, f"pid {child.pid}")
    record("lock_cache", second_process=verdict, stderr=" / ".join(lines), after_kill_9_exit=code2)
    assert verdict == "ok", lines
    assert code2 == 0, lines2


def test_a_second_train_vae_on_the_same_run_is_refused(world, tmp_path, capsys):
    out = tmp_path / "vae_run"
    settings = ["model=tiny", "batch_size=4", "max_steps=100000", "log_every=1", "checkpoint_every=100000",
                "sample_every=0", "holdout=0"]
    child = spawn("train-vae", "--data", world["data"], "--out", out, "--quiet", *settings)
    try:
        wait_for(lambda: logged_steps(out), proc=child, what="the first train-vae's first step")
        code, lines = run_cli(["train-vae", "--data", world["data"], "--out", out, "--quiet", "--resume", *settings,
                               "max_steps=2"], capsys)  # (bounded, should it not be refused)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    verdict = clear_error(code, lines, f"pid {child.pid}")
    record("lock_train_vae", second_process=verdict, stderr=" / ".join(lines))
    assert verdict == "ok", lines
