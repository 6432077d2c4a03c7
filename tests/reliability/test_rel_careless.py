"""Reliability, third round: faults a careless user (or an unlucky machine) meets through the CLI where the
earlier rounds did not look — memory running out mid-step, a cache file changed under a running train, an export
cut off half-way, two `sample`s into one folder, a file system without locks, Notepad's encodings, a resume past
its own end, a finished run overwritten, an ssh session that drops, a cache rebuilt under a running train, a
--class that selects no class.
Each failed on the code before this round (see BEFORE); each case records the fault, what happens now, and a
figure it measured."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rel_kit import (FOREVER, MAX_STEPS, SETTINGS, assert_bitwise, check_case, child_env, ckpt_steps, class_folders,
                     clear_error, logged_steps, run_cli, text_model_folder, tree_digest, wait_for, weights)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def own_cache(world, tmp) -> Path:
    """A copy of the shared cache (a case may damage or lock it)."""
    return Path(shutil.copytree(world["cache"], tmp / "cache"))


def train_argv(world, out, cache, *extra):
    return ["train", "--cache", cache, "--vae", world["vae"], "--out", out, "--quiet", *SETTINGS, *extra]


def resumes_to_the_reference(world, run, cache, capsys) -> int:
    """`train --resume` to MAX_STEPS; the number of tensors bitwise equal to the uninterrupted run's (0: failed)."""
    code, lines = run_cli(train_argv(world, run, cache, "--resume"), capsys)
    if code != 0:
        return 0
    model, ema = weights(run, MAX_STEPS)
    return assert_bitwise(model, world["ref_final"][0]) + assert_bitwise(ema, world["ref_final"][1])


# ---- the cases -------------------------------------------------------------------------------------------------

def case_out_of_memory_mid_step(world, tmp, capsys, monkeypatch):
    import torch

    import latentforge.pipelines as pipelines
    import latentforge.train.loop as loop

    calls, real = [0], loop.train_step

    def step(*a, **k):  # the 6th micro-batch (step 6: after checkpoint step-4) needs more memory than there is
        calls[0] += 1
        if calls[0] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)")
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_step", step)
    run, cache = tmp / "run", world["cache"]
    code, lines = run_cli(train_argv(world, run, cache), capsys)
    monkeypatch.undo()
    train_ok = clear_error(code, lines, "out of memory") == "ok" and "gradient_checkpointing=true" in lines[-1] \
        and "step-4, which is intact" in lines[-1] and ckpt_steps(run) == [4]
    intact = assert_bitwise(weights(run, 4)[0], weights(world["ref"], 4)[0]) if train_ok else 0
    equal = resumes_to_the_reference(world, run, cache, capsys) if train_ok else 0

    def generate(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(pipelines.Pipeline, "_generate", generate)
    code2, lines2 = run_cli(["sample", "--model", world["ref"] / "model", "--class", "0", "--n", "512", "--out",
                             tmp / "o"], capsys)
    sample_ok = clear_error(code2, lines2, "lower --n") == "ok"
    return train_ok and intact and equal and sample_ok, lines + lines2, \
        f"step-4 intact ({intact} tensors), resumed bitwise: {equal} tensors"


def case_cache_file_changed_while_training(world, tmp, capsys, monkeypatch):
    import latentforge.train.loop as loop

    cache = own_cache(world, tmp)
    shard = next(cache.glob("latent-*.latent.npy"))
    original = shard.read_bytes()
    real = loop._periodic

    def periodic(r, state, stopped):  # after step 5 another program rewrites one float of the shard in place
        if state.step == 5:
            with open(shard, "r+b") as f:
                f.seek(len(original) - 7)
                f.write(bytes([original[-7] ^ 0x40]))
        return real(r, state, stopped)

    monkeypatch.setattr(loop, "_periodic", periodic)
    run = tmp / "run"
    code, lines = run_cli(train_argv(world, run, cache), capsys)
    monkeypatch.undo()
    kept = ckpt_steps(run)
    shard.write_bytes(original)  # the cache rebuilt (the same images give the same bytes)
    equal = resumes_to_the_reference(world, run, cache, capsys) if kept == [4] else 0
    ok = clear_error(code, lines, shard.name) == "ok" and "continues from step-4" in lines[-1] and kept == [4] and equal
    return ok, lines, f"checkpoints after the change: {kept}; resumed after the rebuild: {equal} tensors bitwise equal"


def case_export_cut_off_half_way(world, tmp, capsys, monkeypatch):
    import latentforge.formats.diffusers as fd
    import latentforge.formats.single_file as sf
    from latentforge.text import TextEncoder

    model = text_model_folder(tmp / "textmodel" / "model")
    parts = fd.load_model_folder(model)
    single = SimpleNamespace(unet=parts["unet"], vae=parts["vae"], schedule_config=parts["schedule_config"],
                             scheduler_config=None,
                             text_encoder=lambda: TextEncoder.from_pretrained(str(model)))
    monkeypatch.setattr(sf, "load_single_file", lambda *a, **k: single)  # (stands for a real SD .safetensors)
    real, calls = fd.save_component, [0]

    def save_component(module, folder):  # the disk fills up after the UNet is written
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))
        return real(module, folder)

    monkeypatch.setattr(fd, "save_component", save_component)
    (tmp / "model.safetensors").write_bytes(b"stands for a single file")
    out = tmp / "exported"
    argv = ["export", "--model", tmp / "model.safetensors", "--diffusers", out]
    code, lines = run_cli(argv, capsys)
    left = sorted(p.name for p in tmp.iterdir() if p.name not in ("textmodel", "model.safetensors"))
    monkeypatch.setattr(fd, "save_component", real)  # space again
    code2, lines2 = run_cli(argv, capsys)
    loads = code2 == 0 and fd.load_model_folder(out)["unet"] is not None
    ok = clear_error(code, lines, "No space left") == "ok" and left == [] and loads
    return ok, lines + lines2, f"left after the failure: {left}; the re-run exported a loadable folder: {loads}"


def case_two_samples_into_one_folder(world, tmp, capsys, monkeypatch):
    import latentforge.png as png

    out, theirs = tmp / "o", world["data"] / "blues" / "0.png"
    real = png.save_png

    def save_png(image, path, *a, **k):  # the other `sample` writes its 00000-0.png just before this one does
        if not (out / "00000-0.png").exists():
            shutil.copy(theirs, out / "00000-0.png")
        return real(image, path, *a, **k)

    monkeypatch.setattr(png, "save_png", save_png)
    code, lines = run_cli(["sample", "--model", world["ref"] / "model", "--class", "0", "--steps", "2", "--out", out],
                          capsys)
    files = sorted(p.name for p in out.iterdir())
    kept = sha(out / "00000-0.png") == sha(theirs)
    return code == 0 and kept and len(files) == 2, lines, f"files: {files}; the other process's image kept: {kept}"


def case_file_system_without_locks(world, tmp, capsys, monkeypatch):
    import latentforge.locks as locks

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # NFS without lockd, some SMB/FUSE mounts

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    run = tmp / "run"
    code, lines = run_cli(train_argv(world, run, world["cache"], "max_steps=2"), capsys)
    warned = [l for l in lines if l.startswith("warning: ") and "cannot lock" in l]
    ok = code == 0 and logged_steps(run)[-1:] == [2] and len(warned) == 2 and len(lines) == 2
    return ok, lines, f"trained to step {logged_steps(run)[-1:]}, warning lines: {len(warned)} (--out, --cache)"


def case_notepad_caption_encodings(world, tmp, capsys, monkeypatch):
    import json

    from PIL import Image

    data = tmp / "data"
    data.mkdir()
    captions = {"a": ("a red circle", "utf-16"), "b": ("a blue square", "utf-16-le"), "c": ("a green circle", "utf-8-sig")}
    for name, (text, encoding) in captions.items():
        shutil.copy(world["data"] / "reds" / "0.png", data / f"{name}.png")
        (data / f"{name}.txt").write_bytes(text.encode(encoding))  # utf-16: with its BOM; utf-16-le: without
    Image.open(world["data"] / "reds" / "1.png").save(data / "d.png")
    (data / "d.txt").write_bytes(b"a red \x00circle")  # a NUL inside UTF-8: refused, not tokenized
    model = text_model_folder(tmp / "textmodel" / "model")
    code, lines, out = run_cli(["cache", "--data", data, "--vae", model, "--text-encoder", model, "--out", tmp / "c",
                                "--size", "32", "--quiet"], capsys, want_stdout=True)
    manifest = json.loads((tmp / "c" / "manifest.json").read_text()) if code == 0 else {"entries": []}
    got = {e["id"]: e["caption"] for e in manifest["entries"]}
    skipped = (tmp / "c" / "skipped.jsonl").read_text() if code == 0 else ""
    ok = got == {f"{n}.png": t for n, (t, _) in captions.items()} and "caption_not_utf8" in skipped and "NUL" in skipped
    return ok, lines or [out.strip()], f"captions cached: {got}"


def case_notepad_config_encodings(world, tmp, capsys, monkeypatch):
    text = 'model = "tiny"\nbatch_size = 4\n'
    results = {}
    for name, data in (("bom", b"\xef\xbb\xbf" + text.encode()), ("utf16", text.encode("utf-16")),
                       ("latin1", ("# caf\xe9\n" + text).encode("latin-1"))):
        (tmp / f"{name}.toml").write_bytes(data)
        results[name] = run_cli(["train", "--config", tmp / f"{name}.toml", "--print-config"], capsys, want_stdout=True)
    read = [n for n in ("bom", "utf16") if results[n][0] == 0 and "batch_size = 4" in results[n][2]]
    latin = clear_error(results["latin1"][0], results["latin1"][1], "--config")
    return read == ["bom", "utf16"] and latin == "ok", results["bom"][1] + results["latin1"][1], \
        f"read: {read}; Latin-1 file: {latin}"


def case_resume_with_max_steps_below_the_step(world, tmp, capsys, monkeypatch):
    run = Path(shutil.copytree(world["ref"], tmp / "run"))
    before = tree_digest(run)
    code, lines = run_cli(["train", "--cache", world["cache"], "--vae", world["vae"], "--out", run, "--resume",
                           "--quiet", "max_steps=10"], capsys)
    same = tree_digest(run) == before
    return clear_error(code, lines, "max_steps=10") == "ok" and same, lines, f"run folder unchanged: {same}"


def case_finished_run_without_checkpoints(world, tmp, capsys, monkeypatch):
    run = Path(shutil.copytree(world["ref"], tmp / "run"))
    shutil.rmtree(run / "checkpoints")  # deleted to save disk space: the run is finished, model/ is what counts
    model = tree_digest(run / "model")
    code, lines = run_cli(train_argv(world, run, world["cache"], "max_steps=2"), capsys)
    kept = tree_digest(run / "model") == model
    code2, lines2 = run_cli(train_argv(world, run, world["cache"], "max_steps=2", "--restart"), capsys)
    aside = (run / "model-set-aside-1").is_dir() and tree_digest(run / "model-set-aside-1") == model
    ok = clear_error(code, lines, "model/") == "ok" and kept and code2 == 0 and aside
    return ok, lines + lines2, f"model/ kept: {kept}; --restart set it aside byte for byte: {aside}"


def case_ssh_session_drops(world, tmp, capsys, monkeypatch):
    run = tmp / "run"
    master, slave = os.openpty()  # the child's terminal, as in an ssh session (progress bar on)
    argv = ["train", "--cache", world["cache"], "--vae", world["vae"], "--out", run, *SETTINGS, FOREVER]
    # SIGHUP at its default, as in a login shell: the test itself may run under nohup (SIGHUP ignored, inherited)
    child = subprocess.Popen([sys.executable, "-m", "latentforge", *map(str, argv)], stdin=subprocess.DEVNULL,
                             stdout=slave, stderr=slave, env=child_env(),
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    os.close(slave)
    os.set_blocking(master, False)

    def at_step_6():
        try:
            os.read(master, 1 << 16)  # keep the terminal drained, as a terminal is
        except OSError:
            pass
        return logged_steps(run)[-1:] >= [6]

    wait_for(at_step_6, proc=child, what="step 6")
    os.close(master)  # the connection drops: the terminal is gone ...
    child.send_signal(signal.SIGHUP)  # ... and the kernel hangs up its processes
    code = child.wait(60)
    stop = ckpt_steps(run)[-1:]
    equal = resumes_to_the_reference(world, run, world["cache"], capsys) if code == 0 else 0
    ok = code == 0 and stop and stop[0] >= 6 and equal
    return ok, [f"exit {code}"], f"checkpoint at step {stop} (signal after step >= 6); resumed: {equal} tensors bitwise equal"


def case_cache_rebuilt_under_a_running_train(world, tmp, capsys, monkeypatch):
    cache = own_cache(world, tmp)
    data = class_folders(tmp / "data")
    shutil.copy(world["data"] / "reds" / "0.png", data / "reds" / "new.png")  # one more image to encode
    run = tmp / "run"
    child = subprocess.Popen([sys.executable, "-m", "latentforge", "train", "--cache", str(cache), "--vae",
                              str(world["vae"]), "--out", str(run), "--quiet", *SETTINGS, FOREVER],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        wait_for(lambda: logged_steps(run), proc=child, what="the first step")
        before = tree_digest(cache)
        code, lines = run_cli(["cache", "--data", data, "--vae", world["vae"], "--out", cache, "--size", "32",
                               "--quiet"], capsys)
        same = tree_digest(cache) == before
    finally:
        child.kill()
        child.wait()
    code2, _ = run_cli(["cache", "--data", data, "--vae", world["vae"], "--out", cache, "--size", "32", "--quiet"],
                       capsys)
    ok = clear_error(code, lines, f"pid {child.pid} (latentforge train)") == "ok" and same and code2 == 0
    return ok, lines, f"cache unchanged while the train ran: {same}; rebuilt after it ended: exit {code2}"


def case_class_that_selects_nothing(world, tmp, capsys, monkeypatch):
    text_model = text_model_folder(tmp / "textmodel" / "model")
    base = ["sample", "--steps", "2", "--out", tmp / "o"]
    null = run_cli([*base, "--model", world["ref"] / "model", "--class", "2"], capsys)  # 2 classes: 0, 1 (2 = null)
    text = run_cli([*base, "--model", text_model, "--prompt", "a red circle", "--class", "1"], capsys)
    pngs = len(list(tmp.rglob("*.png")))
    ok = clear_error(*null, "labels count from 0") == "ok" and clear_error(*text, "--class 1") == "ok" and pngs == 0
    return ok, null[1] + text[1], f"PNGs written: {pngs}"


CASES = {
    "out of memory in the middle of a training step (and sample --n 512)": case_out_of_memory_mid_step,
    "a latent cache file changed in place while training read it": case_cache_file_changed_while_training,
    "export --diffusers cut off half-way (disk full after the UNet)": case_export_cut_off_half_way,
    "two sample processes finishing into the same --out": case_two_samples_into_one_folder,
    "run folder on a file system without locks (NFS without lockd, SMB)": case_file_system_without_locks,
    "caption files saved by Notepad (UTF-16 with and without BOM, UTF-8 with BOM)": case_notepad_caption_encodings,
    "--config saved by Notepad (UTF-8 with BOM, UTF-16) or in Latin-1": case_notepad_config_encodings,
    "train --resume max_steps=10 on a run at step 24": case_resume_with_max_steps_below_the_step,
    "train --out a finished run whose checkpoints were deleted": case_finished_run_without_checkpoints,
    "the ssh session of a training run drops (SIGHUP, terminal gone)": case_ssh_session_drops,
    "latentforge cache rebuilds the cache a running train reads": case_cache_rebuilt_under_a_running_train,
    "sample --class 2 on a model of classes 0, 1 (counted from 1), --class on a text model":
        case_class_that_selects_nothing,
}
BEFORE = {  # what the code before this round did with the same command (this test, run on that code)
    case_out_of_memory_mid_step: "traceback (torch.OutOfMemoryError: CUDA out of memory…) from train; sample: "
                                 "traceback (RuntimeError: DefaultCPUAllocator: can't allocate memory…)",
    case_cache_file_changed_while_training: "exit 0, nothing said: trained on through step 24 over the changed "
                                            "latents and wrote checkpoints step-20, step-24 and model/ from them",
    case_export_cut_off_half_way: "error: …/exported/vae: No space left on device …, and exported/ left holding unet/ "
                                  "only; the re-run with space again: error: --diffusers …/exported: already exists",
    case_two_samples_into_one_folder: "exit 0; its 00000-0.png replaced the other process's (one file left)",
    case_file_system_without_locks: "traceback (OSError: [Errno 37] No locks available)",
    case_notepad_caption_encodings: "UTF-16 with BOM: image skipped (caption_not_utf8); UTF-16 without BOM and a "
                                    "caption with a NUL byte: cached as 'a\\x00 \\x00b\\x00l…' (garbage tokens)",
    case_notepad_config_encodings: "UTF-8 BOM / UTF-16: error: not valid TOML (Invalid statement (at line 1, column 1)) "
                                   "— fix the file; Latin-1: traceback (UnicodeDecodeError)",
    case_resume_with_max_steps_below_the_step: "exit 0 'done: 24 steps', report.md '24 of 10', config.toml rewritten "
                                               "with max_steps = 10",
    case_finished_run_without_checkpoints: "trained from step 0 and replaced the finished run's model/, metrics.jsonl "
                                           "and report.md",
    case_ssh_session_drops: "killed by SIGHUP (exit -1); checkpoint step-4 the last, the steps after it lost",
    case_cache_rebuilt_under_a_running_train: "exit 0: the cache was re-encoded under the running train (its manifest "
                                              "and shards changed)",
    case_class_that_selects_nothing: "exit 0 both: --class 2 drew with the null (guidance) class on both branches, "
                                     "i.e. no class, and --class on the text model was ignored; each PNG records "
                                     "'Class: 2' / 'Class: 1'",
}


@pytest.mark.parametrize("fault", list(CASES))
def test_a_careless_turn_is_handled(world, tmp_path, capsys, monkeypatch, fault):
    check_case(CASES, BEFORE, "careless", fault, world, tmp_path, capsys, monkeypatch)
