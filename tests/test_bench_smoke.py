"""bench/: every benchmark runs end to end at a tiny size (`run_all.py --quick`), so the scripts cannot rot.

Asserts structure and the correctness checks the benchmarks make along the way (same weights give
the same outputs in latentforge and diffusers; a memory figure was measured; the plot is a PNG) —
never timings, which depend on the machine.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_all = _module("run_all")
    assert run_all.main(["--quick", "--out", str(out / "BENCHMARKS.md"), "--json", str(out / "raw.json")]) == 0
    return out, (out / "BENCHMARKS.md").read_text(), json.loads((out / "raw.json").read_text())


def bench_unet_arms():
    return _module("bench_unet").PRECISION_ARMS


def _rows(doc: str, first_cell: str):
    """Cells of the markdown table rows whose first cell starts with `first_cell`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in doc.splitlines()
            if line.startswith("| " + first_cell)]


def test_document_has_every_section_and_the_machine(quick):
    _, doc, _ = quick
    for heading in ("## At a glance", "## Machine", "## How it is measured", "## 1. UNet training step", "## 2. Text→image",
                    "## 3. The data path", "## 4. Steps vs quality", "## 5. GPU"):
        assert heading in doc
    assert "bench/run_all.py --quick --out" in doc  # the exact command
    assert re.search(r"Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", doc)
    for key in ("| cpu |", "| cores |", "| torch |", "| diffusers (oracle) |"):
        assert key in doc
    assert "No GPU was available for this run" in doc  # this machine has no CUDA
    assert len(_rows(doc, "training step vs diffusers, `tiny`")) == 1 and len(_rows(doc, "epoch on the fly")) == 1


def test_unet_step_same_weights_ratio_memory_and_flops(quick):
    _, doc, raw = quick
    (row,) = raw["unet"]["rows"]
    assert row["config"] == "tiny"
    assert row["max_abs_diff"] < 1e-4  # diffusers loaded our weights and computes the same function
    for arm in ("latentforge", "diffusers"):
        assert len(row[arm]["wall"]) == len(row[arm]["cpu"]) == 2  # interleaved rounds, both clocks
        assert row[arm]["images_per_s"] > 0 and row[arm]["memory"]["step_peak_mib"] > 0
    assert row["ratio_wall"] == pytest.approx(row["latentforge"]["images_per_s"] / row["diffusers"]["images_per_s"])
    assert set(row["ablations"]) == {"latentforge + fused AdamW", "latentforge + channels_last"}
    assert row["flops_per_image"] > 0 and set(row["profile"]) == {"latentforge", "diffusers"}
    assert set(row["precision"]) == set(bench_unet_arms())  # bf16 arms in the same rounds
    assert all(a["images_per_cpu_s"] > 0 and 0 < a["gemm_fraction"] for a in row["precision"].values())
    assert set(raw["unet"]["gemm_gflops"]) == {"fp32", "bf16"} and min(raw["unet"]["gemm_gflops"].values()) > 0
    assert 0 < row["latentforge"]["gemm_fraction"] and "fraction of the measured fp32 GEMM rate" in doc
    assert len(_rows(doc, "bf16 training step vs fp32, `tiny` (CPU)")) == 1
    arms = raw["threads"]["arms"]  # the step with a competing busy process, threads 1 / 2 / default
    assert len(arms) == 3 and arms["1 thread"]["threads"] == 1 and all(a["ms"] > 0 for a in arms.values())
    assert "## 8. Threads with a competing busy process" in doc
    # the SD 1.5 UNet's training FLOPs at 64x64: 3 x forward, forward ≈ 0.80 TFLOP (2 x its ~400 G MACs)
    assert 2.0e12 < raw["unet"]["flops_sd15_64"] < 2.8e12
    (cells,) = _rows(doc, "`tiny` (B=2")
    assert re.fullmatch(r"\*\*\d+\.\d\d×\*\*", cells[3])


def test_text2img_same_images_and_data_path(quick):
    _, doc, raw = quick
    assert raw["text2img"]["max_abs_diff"] < 1e-3  # StableDiffusionPipeline on our folder: the same images
    assert raw["text2img"]["latentforge"]["images_per_s"] > 0
    steps = raw["data"]["steps"]
    assert set(steps) == {"model only", "DataLoader(LatentDataset)", "train stream"}
    assert steps["model only"]["ratio_cpu"] == 1.0
    assert raw["data"]["epoch"]["ratio"] > 0
    assert len(_rows(doc, "train stream")) == 1
    assert raw["data"]["buckets"]["buckets"] == ["48x80", "64x64", "80x48"]  # one arm per bucket shape sequence
    assert len(_rows(doc, "bucket stream")) == 1 and raw["data"]["buckets"]["ratio_cpu"] > 0


def test_steps_vs_quality_table_and_plot(quick):
    out, doc, raw = quick
    points = raw["quality"]["points"]
    assert [(p["sampler"], p["steps"]) for p in points] == [
        ("ddim", 1), ("ddim", 2), ("euler", 1), ("euler", 2), ("dpmpp-2m", 1), ("dpmpp-2m", 2), ("ddpm", 3)]
    for p in points:
        assert len(p["correct"]) == 4 and p["scores"]["seen"]["all"]["n"] + p["scores"]["held_out"]["all"]["n"] == 4
    assert "a RANDOM `tiny` model" in doc  # says honestly that no trained model was used
    with Image.open(out / "steps_vs_quality.png") as im:
        assert im.format == "PNG" and im.size[0] <= 800


def test_steps_vs_quality_cache_reuses_the_reference_only(tmp_path):
    text2img, quality = _module("bench_text2img"), _module("bench_steps_quality")
    model = str(text2img.write_model(tmp_path / "model", "tiny"))
    cache = tmp_path / "reference.json"
    a = quality.run(model, samplers=("euler",), steps=(1,), reference=2, prompts=2, batch=2, cache=str(cache))
    b = quality.run(model, samplers=("euler",), steps=(1,), reference=2, prompts=2, batch=2, cache=str(cache))
    assert [p["from_cache"] for p in a["points"]] == [False, False]
    assert [p["from_cache"] for p in b["points"]] == [False, True]  # the sweep is recomputed, DDPM is read back
    assert a["points"][1]["correct"] == b["points"][1]["correct"]
    assert len(json.loads(cache.read_text())) == 1
    assert quality.main(["--model", str(tmp_path / "nothing")]) == 2  # one-line error, not a traceback


def test_finetune_section_runs_every_arm(quick):
    _, doc, raw = quick
    assert "## 7. Fine-tuning step" in doc
    arms = {(r["precision"], r["checkpointing"]) for r in raw["finetune"]}
    assert arms == {("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}
    assert all(r["loss_finite"] and r["wall_s"] > 0 for r in raw["finetune"])
