"""Reliability, second round, point 10: more wrong turns of a careless user and bad moments of a machine,
found by trying the real CLI (each failed on the code before this round: a traceback, a silently wrong
result, or a user's file overwritten or deleted). Each case records the fault, what happens now, and a
figure it measured."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rel_kit import check_case, clear_error, logged_steps, run_cli


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def sample_argv(world, out, *extra):
    return ["sample", "--model", world["ref"] / "model", "--class", "0", "--steps", "2", "--out", out, *extra]


def case_demo_into_a_users_folder(world, tmp, capsys, monkeypatch):
    proj = tmp / "my_project"
    (proj / "data").mkdir(parents=True)
    (proj / "notes.txt").write_text("months of notes\n")
    code, lines = run_cli(["demo", "--budget", "tiny", "--out", proj], capsys)
    kept = (proj / "notes.txt").is_file()
    return clear_error(code, lines, "not a demo folder") == "ok" and kept, lines, f"notes.txt kept: {kept}"


def case_torn_metrics_line(world, tmp, capsys, monkeypatch):
    run = tmp / "run"
    shutil.copytree(world["ref"] / "checkpoints" / "step-8", run / "checkpoints" / "step-8")
    shutil.copy(world["ref"] / "config.toml", run / "config.toml")
    rows = (world["ref"] / "metrics.jsonl").read_text().splitlines()[:10]
    (run / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 11, "lo')  # killed mid-append
    code, lines = run_cli(["train", "--cache", world["cache"], "--vae", world["vae"], "--out", run, "--resume",
                           "--quiet", "max_steps=9"], capsys)
    steps = logged_steps(run)
    return code == 0 and steps == list(range(1, 10)), lines, f"logged steps after resume: {steps[0]}..{steps[-1]}"


def case_device_that_does_not_exist(world, tmp, capsys, monkeypatch):
    results = [run_cli(sample_argv(world, tmp / d, "--device", d), capsys) for d in ("cuda:99", "gpu0")]
    ok = all(clear_error(c, l, "--device") == "ok" for c, l in results)
    return ok, results[0][1] + results[1][1], "2 of 2 refused in one line"


def case_non_finite_guidance(world, tmp, capsys, monkeypatch):
    results = [run_cli(sample_argv(world, tmp / v, "--cfg", v), capsys) for v in ("nan", "inf")]
    pngs = len(list(tmp.rglob("*.png")))
    ok = all(clear_error(c, l, "--cfg") == "ok" for c, l in results) and pngs == 0
    return ok, results[0][1], f"black PNGs written: {pngs}"


def case_seed_past_64_bits(world, tmp, capsys, monkeypatch):
    code, lines = run_cli(sample_argv(world, tmp / "o", "--seed", str(2 ** 64)), capsys)
    return clear_error(code, lines, "--seed") == "ok", lines, "seed 2^64"


def case_decompression_bomb_image(world, tmp, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)  # so a 32x32 image stands for a 200-megapixel one
    code, lines = run_cli(["img2img", "--model", world["ref"] / "model", "--class", "0", "--steps", "2",
                           "--strength", "1", "--image", world["data"] / "reds" / "0.png", "--out", tmp / "o"], capsys)
    return clear_error(code, lines, "--image") == "ok", lines, "1024 px over a 512 px bomb limit"


def case_image_over_the_bomb_warning_limit(world, tmp, capsys, monkeypatch):
    import warnings

    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # a 32x32 image (1,024 px) stands for a 100-megapixel one
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, lines = run_cli(["img2img", "--model", world["ref"] / "model", "--class", "0", "--steps", "2",
                               "--strength", "1", "--image", world["data"] / "reds" / "0.png", "--out", tmp / "o"],
                              capsys)
    raw = [str(w.message) for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    said = [l for l in lines if "decompression" in l.lower()]
    ok = code == 0 and not raw and len(said) == 1 and said[0].startswith("warning: --image ") and "1,024" in said[0]
    return ok, lines + [f"python warning: {m}" for m in raw], f"Python warnings: {len(raw)}, warning lines: {len(said)}"


def case_shapes_into_a_users_folder(world, tmp, capsys, monkeypatch):
    mine = tmp / "photos"
    mine.mkdir()
    shutil.copy(world["data"] / "reds" / "0.png", mine / "00000.png")
    (mine / "00000.txt").write_text("my caption\n")
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    before = sha(mine / "00000.png")
    code, lines = run_cli(["shapes", "--out", mine, "--n", "2"], capsys)
    same = sha(mine / "00000.png") == before and (mine / "00000.txt").read_text() == "my caption\n"
    return clear_error(code, lines, "not a shapes data set") == "ok" and same, lines, f"user's files unchanged: {same}"


def case_run_folder_inside_the_data(world, tmp, capsys, monkeypatch):
    data = tmp / "data"
    shutil.copytree(world["data"], data)
    code, lines = run_cli(["train", "--data", data, "--out", data / "run", "--vae", world["vae"], "--quiet",
                           "model=tiny", "batch_size=4", "max_steps=1"], capsys)
    return clear_error(code, lines, "inside --data") == "ok", lines, f"run folder created: {(data / 'run').exists()}"


def case_sampling_again_into_the_same_folder(world, tmp, capsys, monkeypatch):
    out = tmp / "o"
    first = run_cli(sample_argv(world, out), capsys)
    before = {p.name: sha(p) for p in out.glob("*.png")}
    second = run_cli(sample_argv(world, out, "--class", "1"), capsys)
    after = {p.name: sha(p) for p in out.glob("*.png")}
    kept = all(after.get(n) == h for n, h in before.items())
    ok = first[0] == second[0] == 0 and kept and len(after) == 2
    return ok, second[1], f"files: {sorted(after)}; first kept: {kept}"


def case_non_finite_learning_rate(world, tmp, capsys, monkeypatch):
    results = [run_cli(world.train_argv(tmp / v, f"lr={v}"), capsys) for v in ("nan", "inf")]
    ok = all(clear_error(c, l, "lr=") == "ok" for c, l in results)
    return ok, results[0][1], "lr=nan and lr=inf refused"


def case_adherence_eval_of_a_class_model(world, tmp, capsys, monkeypatch):
    code, lines = run_cli(["eval", "--model", world["ref"] / "model", "--n", "1", "--out", tmp / "e"], capsys)
    made = (tmp / "e").exists()
    return clear_error(code, lines, "no text encoder") == "ok" and not made, lines, f"eval folder made: {made}"


def case_disk_full_while_writing_a_png(world, tmp, capsys, monkeypatch):
    import latentforge.io as lio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lio.os, "fsync", full)
    code, lines = run_cli(sample_argv(world, tmp / "o"), capsys)
    monkeypatch.undo()
    left = sorted(p.name for p in (tmp / "o").iterdir()) if (tmp / "o").is_dir() else []
    return clear_error(code, lines, "No space left") == "ok" and left == [], lines, f"files left: {left}"


CASES = {
    "demo --out a folder of the user's that has a data/ sub-folder": case_demo_into_a_users_folder,
    "kill -9 mid-append left a torn last line in metrics.jsonl, then --resume": case_torn_metrics_line,
    "sample --device cuda:99 / gpu0": case_device_that_does_not_exist,
    "sample --cfg nan / inf": case_non_finite_guidance,
    "sample --seed 2^64": case_seed_past_64_bits,
    "img2img --image over PIL's decompression-bomb limit": case_decompression_bomb_image,
    "shapes --out a folder of the user's photos": case_shapes_into_a_users_folder,
    "train --data D --out D/run (run folder inside the data)": case_run_folder_inside_the_data,
    "sample twice into the same --out": case_sampling_again_into_the_same_folder,
    "train lr=nan / lr=inf": case_non_finite_learning_rate,
    "eval (shapes benchmark) of a class-conditional model": case_adherence_eval_of_a_class_model,
    "disk full while sample writes its PNG": case_disk_full_while_writing_a_png,
    "img2img --image over PIL's decompression-bomb warning limit, under its error limit":
        case_image_over_the_bomb_warning_limit,
}
BEFORE = {  # what the code before this round did (measured by hand with the same commands)
    case_demo_into_a_users_folder: "deleted the whole folder (notes.txt gone), then ran the demo",
    case_torn_metrics_line: "traceback (json.decoder.JSONDecodeError)",
    case_device_that_does_not_exist: "traceback (AssertionError: Torch not compiled with CUDA / RuntimeError)",
    case_non_finite_guidance: "exit 0, an all-black PNG (mean pixel 0.0)",
    case_seed_past_64_bits: "traceback (ValueError: Overflow when unpacking long long)",
    case_decompression_bomb_image: "traceback (PIL.Image.DecompressionBombError)",
    case_shapes_into_a_users_folder: "overwrote the user's 00000.png and 00000.txt",
    case_run_folder_inside_the_data: "trained; the next cache took run/loss.png and run/samples/*.png as class 'run'",
    case_sampling_again_into_the_same_folder: "the second run overwrote 00000-0.png",
    case_non_finite_learning_rate: "lr=nan: traceback (ValueError: Invalid learning rate); lr=inf: trained to NaN",
    case_adherence_eval_of_a_class_model: "started generating, then 'error: --prompt: …' about a flag not given",
    case_disk_full_while_writing_a_png: "traceback (OSError errno 28), a partial 00000-0.png left",
    case_image_over_the_bomb_warning_limit: "PIL's DecompressionBombWarning as a Python warning (PIL/Image.py:3593: "
                                            "... and its `warnings.warn(` source line)",
}


@pytest.mark.parametrize("fault", list(CASES))
def test_a_wrong_turn_is_handled(world, tmp_path, capsys, monkeypatch, fault):
    check_case(CASES, BEFORE, "wrong_turn", fault, world, tmp_path, capsys, monkeypatch)
