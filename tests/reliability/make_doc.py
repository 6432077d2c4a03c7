"""Run the reliability suite and write docs/RELIABILITY.md from the figures its tests measured.

    .venv/bin/python tests/reliability/make_doc.py            # runs pytest, then writes the doc
    .venv/bin/python tests/reliability/make_doc.py --figures DIR --junit FILE   # render an earlier run

Each test calls `rel_kit.record(name, ...)`; with $LATENTFORGE_FIGURES set that becomes DIR/name.json.
The pass/fail of every test comes from pytest's JUnit XML.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/(popen-gw\d+/)?|/tmp/tmp[\w]+/")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

SECTIONS = [
    ("1. kill -9 at three seeded-random training steps", "test_rel_train_faults.py", "test_kill_9_at_a_random",
     "A child `python -m latentforge train` (tiny preset, class-conditional, 8 latents, batch 4, constant LR "
     "after 2 warmup steps, a checkpoint every 4; `max_steps=1000`, which a constant LR makes bookkeeping, so the "
     "child cannot finish before the kill) is killed with SIGKILL once `metrics.jsonl` shows the target step "
     "(drawn with `random.Random(2024)`). `train --resume` with `max_steps=24` then runs to step 24; its model and EMA tensors must equal the uninterrupted run's bit "
     "for bit, and its logged losses must equal the reference's, step for step.", "kill9_step"),
    ("2. kill -9 while a checkpoint is being written", "test_rel_train_faults.py", "test_kill_9_while_writing",
     "A wrapper around the real CLI SIGKILLs the process at three moments of writing checkpoint step-12: "
     "with `model.safetensors` half on disk, after the COMPLETE marker but before the rename, and after the "
     "rename but before old checkpoints are pruned. A spy on `checkpoint.load` records what `--resume` loads: "
     "it must be a folder with its marker (step-8, step-8, step-12), never the temporary one, and the resumed "
     "run must end bitwise equal to the reference. (No crash hook exists in the writer; the wrapper replaces "
     "`checkpoint.save_file` / `_write_synced` / `prune`.)", "kill9_in_checkpoint_"),
    ("3. Disk full while writing a checkpoint or a cache shard", "test_rel_disk_full.py", "test_disk_full",
     "Twice each: a real tmpfs mounted just too small (1.5 checkpoints for a run that keeps 2; 3 free pages "
     "for a 48-image cache update), and an injected `OSError(ENOSPC)` after a partial write. Required: exit 2 "
     "with one `error:` line about space; the previous checkpoint byte-identical to the reference's step-4 "
     "(or every cache file unchanged and every listed shard verifying); and, with space again, `--resume` "
     "ending bitwise equal to the reference (or the cache re-run encoding only the 48 new images).",
     "disk_full_"),
    ("4. A fuzzed bad-data folder", "test_rel_bad_data.py", "",
     "`latentforge cache` (child process) over a folder with 16 named kinds of broken input, 8 hard-but-valid "
     "images and 24 seeded random mutants of a good PNG/JPEG (truncated, bits flipped, bytes spliced in, "
     "header damaged). Required: exit 0, no traceback, every named file skipped with its exact reason in "
     "`skipped.jsonl` (absolute path, reason, detail), every good image cached, every mutant either cached or "
     "skipped — never both, never lost. Then mode-000 files once more without root's permission override.",
     "bad_data"),
    ("5. A flipped bit in a cache or checkpoint file", "test_rel_corruption.py", "",
     "One bit is flipped where only a checksum can see it: inside a float of each checkpoint tensor file, in "
     "the saved torch RNG state of `state.json`, inside a latent shard, and in a row number of the cache "
     "manifest. Then `train --resume` / `train --cache`. Accepted: exit 2 with one `error:` line naming the "
     "file, or (checkpoints) a warning naming it, a resume from an older intact checkpoint and a final state "
     "bitwise equal to the reference.", "corrupt_"),
    ("6. Untrusted pickle files", "test_rel_untrusted.py", "",
     "Real PyTorch checkpoints whose pickle calls `open(MARKER, 'w')` when unpickled are handed to every "
     "entry point that reads weights. Each must fail with one `error:` line naming the file (exit 2) and the "
     "marker must not exist; finally the same file is unpickled unsafely and the marker appears (the payload "
     "is live). A static check covers the load paths no entry point reaches.", "untrusted"),
    ("7. Command-line mistakes", "test_rel_cli_mistakes.py", "",
     "A table of mistakes, each a child `python -m latentforge ...`: non-zero exit, no traceback, and stderr "
     "exactly one line `error: ...` containing the flag / key / file at fault.", "cli_mistakes"),
    ("8. SIGTERM (and SIGINT) during training", "test_rel_train_faults.py", "test_signal",
     "The child training process gets SIGTERM (SIGINT) after the target step. Required: exit 0 with "
     "`stopped by SIGTERM at step S; checkpoint saved`, a complete checkpoint at exactly that step boundary "
     "(S within 3 steps of the last step logged before the signal; nothing logged after S), and a `--resume` ending bitwise equal to "
     "the reference.", "signal_"),
    ("9. Second round: broken model folders, folders of the wrong kind, prompts that do not fit",
     "test_rel_model_folders.py", "",
     "A tiny text-conditional model folder (a 23-word BERT tokenizer) is damaged five ways and given to "
     "`latentforge sample`: tokenizer/ deleted (transformers would build a 5-token tokenizer from the encoder's "
     "config.json: every word [UNK], every prompt the same image), tokenizer/ without a vocabulary file, a "
     "5-token vocabulary, model_index.json naming another text-encoder class, and a component named but absent. "
     "Required: exit 2, one `error:` line naming the part, no image written; the intact folder gives different "
     "images for different prompts (the control). Folders of other kinds given as `--vae` must be named for what "
     "they are. A prompt of 35 tokens for a max_length of 16: one warning naming the 19 dropped tokens; the "
     "PNG's `parameters` record the whole prompt and `Prompt tokens dropped: 19`, and `sample` given the recorded "
     "prompt makes the same PNG byte for byte. (Sections 9–11 are the second round of faults, "
     "issue points 1–9: run on the code before that round, 18 of their 19 tests failed, each on the fault it "
     "targets — the control passed.)", ("model_folder_", "long_prompt")),
    ("10. Second round: --resume that must refuse, and one process per run folder", "test_rel_resume.py", "",
     "From a copy of the reference run stopped at step 8: the cache re-built with one image added, one removed "
     "and one re-encoded (refused naming each, or with `--allow-changed-data` continued with a warning about the "
     "order); the same change given as `train --resume --data` (refused before RUN/cache is re-encoded: its "
     "files keep their bytes and mtimes); a resume refused for changed math (the run folder must stay byte-identical, and the correct resume "
     "then works); every checkpoint unusable (step-8 without COMPLETE, a flipped bit in step-4: refused listing "
     "both; without --resume refused too; `--restart` sets them aside byte for byte and starts over). A second "
     "`train` on the --out of a running child: one line naming the child's pid; after kill -9 of the child the "
     "next `--resume` runs (the OS lock died with it).", ("resume_", "lock_train_run")),
    ("11. Second round: outputs written atomically, --out checked first, one process per cache / VAE run",
     "test_rel_outputs.py", "",
     "A child `latentforge sample` whose PNG encoder writes half the file and then SIGKILLs its own process: no "
     "file may be left under a final name. A static check of src/latentforge: every file write goes through "
     "latentforge.io (temporary name in the same folder, fsync, rename), with three listed exceptions. `--out` "
     "naming an existing file, or a path under a file, in eight commands: one line naming it, before any model "
     "is loaded, the file unchanged. A second `cache` / `train-vae` on a folder a child holds: one line naming "
     "the child's pid; after its kill -9 the cache runs.", ("atomic_", "out_is_a_file", "lock_cache", "lock_train_vae")),
    ("12. Second round: more wrong turns, found by trying the CLI", "test_rel_wrong_turns.py", "",
     "Faults found in this round by running the real commands the way a careless user (or an unlucky machine) "
     "would; `before` is what the code before this round did with the same command, `now` what the test saw.",
     ("wrong_turn_",)),
    ("13. Third round: a careless user, an unlucky machine", "test_rel_careless.py", "",
     "Twelve more faults, found by running the real commands where the earlier rounds had not looked: memory running "
     "out in the middle of a step (an injected `torch.OutOfMemoryError` at step 6, after checkpoint step-4; a CPU "
     "allocator failure in `sample`), a latent shard rewritten in place by another program while training reads it, "
     "`export --diffusers` cut off by a full disk, two `sample` processes finishing into one `--out`, a file system "
     "without `flock` (an injected ENOLCK), caption and `--config` files as Windows Notepad saves them, `--resume "
     "max_steps` below the run's step, `train --out` a finished run whose checkpoints were deleted, the run's ssh "
     "session dropping (a child on a pseudo-terminal: the terminal is closed, then SIGHUP), `latentforge cache` on "
     "the cache a running child `train` reads, and a `--class` that selects no class (the null label, a text "
     "model). `before` is what the code before this round did (the same test, run on it: 12 of 12 failed), `now` "
     "what the test saw; where a run is involved it must end bitwise equal to the reference after `--resume`.",
     ("careless_",)),
]


def run_suite(figures: Path, junit: Path) -> str:
    env = {**os.environ, "LATENTFORGE_FIGURES": str(figures)}
    t, load = time.time(), os.getloadavg()[0]
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", str(HERE),
                    f"--junitxml={junit}"], cwd=ROOT, env=env)
    load = max(load, os.getloadavg()[0])
    return (f"in {time.time() - t:.0f} s wall (`pytest -n 2 --dist loadfile`, {os.cpu_count()} CPU cores, shared: "
            f"load average up to {load:.1f} while it ran)")


def outcomes(junit: Path) -> dict:
    """{(file name, test name): (status, seconds, short message)}."""
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        file = case.get("classname", "").split(".")[-1] + ".py"
        status, msg = "pass", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = {"failure": "FAIL", "error": "ERROR", "skipped": "SKIP"}[tag]
                msg = (el.get("message") or "").splitlines()[0][:300] if el.get("message") else ""
        out[(file, case.get("name"))] = (status, float(case.get("time", 0)), msg)
    return out


def clean(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace(sys.prefix, "$VENV")  # the Python environment the suite ran in, wherever it is
    return ANSI.sub("", TMP.sub("$TMP/", text)).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(clean(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def render(figures: Path, junit: Path, timing: str | None, rerun: Path | None = None) -> str:
    results = outcomes(junit)
    if rerun is not None:  # tests run again after a fix (their figures written into the same folder)
        again = outcomes(rerun)
        results.update(again)
        names = ", ".join(f"`{n}`" for _, n in sorted(again))
        timing = (timing or "") + f"; {len(again)} test(s) re-run after a fix, their results and figures from that re-run: {names}"
    n_pass = sum(1 for s, _, _ in results.values() if s == "pass")
    out = ["# Reliability: the faults we inject and what we measured", "",
           "Generated by `tests/reliability/make_doc.py` from one run of `tests/reliability/` (figures: each "
           "test's `rel_kit.record(...)`; status: pytest's JUnit XML). Paths under the test's temporary "
           "folder are shown as `$TMP/`, those of the Python environment as `$VENV`.", "",
           f"**Run:** {n_pass} of {len(results)} tests passed" + (f" {timing}" if timing else "") + ".", "",
           "Run everything: `.venv/bin/python -m pytest -q -n 2 --dist loadfile tests/reliability` "
           "(part of `make test`); regenerate this page: `.venv/bin/python tests/reliability/make_doc.py`.", ""]
    failing = [(f, n, m) for (f, n), (s, _, m) in sorted(results.items()) if s != "pass"]
    if failing:
        out += ["**Guarantees not met in this run** (each test fails until the feature provides it):", ""]
        out += [f"- `{f}::{clean(n)}` — {clean(m)[:200]}" for f, n, m in failing] + [""]
    for title, file, prefix, what, fig in SECTIONS:
        out += [f"## {title}", "", what, "",
                f"Run: `.venv/bin/python -m pytest -q tests/reliability/{file}" + (f" -k {prefix}`" if prefix else "`"),
                ""]
        tests = [(name, r) for (f, name), r in sorted(results.items()) if f == file and name.startswith(prefix or "")]
        out += ["| test | status | seconds | failure |", "|---|---|---|---|"]
        out += [f"| `{clean(n)}` | {s} | {t:.1f} | {clean(m)} |" for n, (s, t, m) in tests]
        out.append("")
        for prefix in (fig,) if isinstance(fig, str) else fig:
            out += figures_for(figures, prefix)
    return "\n".join(out) + "\n"


def figures_for(folder: Path, prefix: str) -> list[str]:
    found = sorted(folder.glob(f"{prefix}*.json"))
    if not found:
        return ["(no figures recorded)", ""]
    if prefix == "cli_mistakes":
        d = json.loads(found[0].read_text())
        rows = [{"mistake": k, "exit": v["exit"], "verdict": v["verdict"], "stderr lines": v["stderr_lines"],
                 "stderr": " / ".join(v["stderr"]), "s": v["seconds"]} for k, v in d["table"].items()]
        return [f"Figures: {d['one_clear_line']} of {d['rows']} mistakes gave one clear `error:` line.", ""] + \
            table(rows) + [""]
    if prefix == "untrusted":
        lines = []
        if (folder / "untrusted.json").is_file():
            d = json.loads((folder / "untrusted.json").read_text())
            rows = [{"entry point": k, "what the user sees": v} for k, v in d["errors"].items()]
            lines += [f"Figures: {d['entry_points']} entry points; payload ran when unpickled unsafely: "
                      f"{d['payload_ran_when_unpickled_unsafely']}; problems: {len(d['problems'])}.", ""]
            lines += table(rows) + [""]
        if (folder / "untrusted_static.json").is_file():
            d = json.loads((folder / "untrusted_static.json").read_text())
            lines += [f"Static check of src/latentforge: `torch.load` calls {clean(d['torch_load_calls'])} "
                      f"(each must pass weights_only=True), no pickle/marshal loads, no np.load(allow_pickle=True);"
                      f" problems: {clean(d['problems'])}.", ""]
        return lines
    if prefix == "bad_data":
        lines = []
        for f in found:
            d = json.loads(f.read_text())
            lines += [f"Figures (`{f.stem}`):", ""] + [f"- {k}: {clean(v)}" for k, v in d.items()] + [""]
        return lines
    nested = [f for f in found if all(isinstance(v, dict) for v in json.loads(f.read_text()).values())]
    lines = []
    for f in nested:  # one record = a table of its own (a row per case)
        rows = [{"case": k, **v} for k, v in json.loads(f.read_text()).items()]
        lines += [f"Figures (`{f.stem}`):", ""] + table(rows) + [""]
    found = [f for f in found if f not in nested]
    if not found:
        return lines
    rows = [{"case": f.stem[len(prefix):] or f.stem, **json.loads(f.read_text())} for f in found]
    groups: dict = {}  # one table per kind of row (same keys)
    for r in rows:
        groups.setdefault(tuple(r), []).append(r)
    lines += ["Figures:", ""]
    for group in groups.values():
        lines += table(group) + [""]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figures", type=Path, help="render an earlier run's figures folder instead of running")
    p.add_argument("--junit", type=Path, help="that run's JUnit XML")
    p.add_argument("--rerun", type=Path, help="JUnit XML of tests re-run after a fix (with --figures: same folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    args = p.parse_args()
    timing = None
    if args.junit is not None:
        suite = ET.parse(args.junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        timing = f"in {float(suite.get('time', 0)):.0f} s wall (`pytest -n 2 --dist loadfile`, {suite.get('timestamp', '')})"
    if args.figures is None:
        tmp = Path(tempfile.mkdtemp(prefix="lf-reliability-"))
        args.figures, args.junit = tmp / "figures", tmp / "junit.xml"
        timing = run_suite(args.figures, args.junit)
        print(f"figures and JUnit XML kept in {tmp}")
    args.out.write_text(render(args.figures, args.junit, timing, args.rerun))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
