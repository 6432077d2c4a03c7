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
                    "## 3. The data path", "## 4. Steps vs quality", "## 5. GPU", "## 6. LoRA vs full fine-tune",
                    "## 7. Fine-tuning step", "## 8. Threads", "## 9. bf16 training quality", "## 10. SDXL-size UNet"):
        assert heading in doc
    assert "RUN IN PROGRESS" not in doc  # rewritten after every section; the last write is the whole run
    # every speed goal (and the LoRA memory goal) has a line at a glance; the GPU ones say why they are missing
    glance = doc.split("## At a glance")[1].split("## Machine")[0]
    for goal in ("fp32 step's fraction", "bf16 training step", "no host sync per step", "fp32 training step vs diffusers",
                 "text→image", "bf16 inference", "step with a competing busy process", "GPU bf16 step", "LoRA rank 16"):
        assert len(_rows(glance, goal)) >= 1, goal
    assert [r[3] for r in _rows(glance, "no host sync per step")] == ["not measurable here: no GPU"]
    assert "No demo runs were given" in doc  # §9 reads two demo runs only when --demo-runs names them
    assert "bench/run_all.py --quick --out" in doc  # the exact command
    assert re.search(r"Date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", doc)
    for key in ("| cpu |", "| cores |", "| torch |", "| diffusers (oracle) |"):
        assert key in doc
    assert "No GPU was available for this run" in doc  # this machine has no CUDA
    assert len(_rows(doc, "fp32 training step vs diffusers, `tiny`")) == 1 and len(_rows(doc, "epoch on the fly")) == 1


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
    ops = row["profile_ops"]  # per aten op, both arms; the categories are sums of these
    assert ops["latentforge"]["aten::convolution"]["calls"] > 0
    assert sum(o["ms"] for o in ops["diffusers"].values()) == pytest.approx(sum(row["profile"]["diffusers"].values()))
    assert "By aten op" in doc and "zero-sum" in doc
    assert set(row["precision"]) == set(bench_unet_arms())  # bf16 arms in the same rounds
    assert all(a["images_per_cpu_s"] > 0 and 0 < a["gemm_fraction"] for a in row["precision"].values())
    assert set(raw["unet"]["gemm_gflops"]) == {"fp32", "bf16"} and min(raw["unet"]["gemm_gflops"].values()) > 0
    assert 0 < row["latentforge"]["gemm_fraction"] and "fraction of the measured fp32 GEMM rate" in doc
    assert len(_rows(doc, "bf16 training step vs fp32, `tiny` (CPU)")) == 1
    assert len(row["rounds"]) == 2 and all(x["gemm_bf16"] > 0 and x["gemm_fp32"] > 0 for x in row["rounds"])
    assert not any(arm.startswith("GEMM") for arm in row["ablations"])  # the GEMM arms are not ablations
    routes = raw["unet"]["attention_routes"]  # both routes timed on every shape and dtype, and the one picked
    for rows in (routes["training"], routes["sampling"]):
        assert len(rows) == 12 and all(min(r["ms"].values()) > 0 and r["picked"] in r["ms"] for r in rows)
    assert "**Attention routes on CPU**" in doc
    arms = raw["threads"]["arms"]  # the step with a competing busy process, threads 1 / 2 / default
    assert len(arms) == 3 and arms["1 thread"]["threads"] == 1 and all(a["ms"] > 0 for a in arms.values())
    assert arms["1 thread"]["paired_vs_one_thread"] == 1.0  # paired with itself, round by round
    assert "## 8. Threads with a competing busy process" in doc
    # the SD 1.5 UNet's training FLOPs at 64x64: 3 x forward, forward ≈ 0.80 TFLOP (2 x its ~400 G MACs)
    assert 2.0e12 < raw["unet"]["flops_sd15_64"] < 2.8e12
    (cells,) = _rows(doc, "`tiny` (B=2")
    assert re.fullmatch(r"\*\*\d+\.\d\d×\*\*", cells[3])


def test_text2img_same_images_and_data_path(quick):
    _, doc, raw = quick
    assert raw["text2img"]["max_abs_diff"] < 1e-3  # StableDiffusionPipeline on our folder: the same images
    assert raw["text2img"]["latentforge"]["images_per_s"] > 0
    bf16 = raw["text2img"]["bf16"]  # the UNet in bf16: a third arm of the same rounds, close to fp32's images
    assert 0 < bf16["mean_abs_diff"] <= bf16["max_abs_diff"] < 0.25 and bf16["images_per_cpu_s"] > 0
    t2i = raw["text2img"]  # where one call's time goes, both pipelines, by aten op
    assert set(t2i["profile"]) == {"latentforge", "diffusers"}
    assert t2i["profile_ops"]["diffusers"]["aten::convolution"]["calls"] > 0
    assert "| `tiny text→image` | total |" in doc and "In the profiled calls aten ops take" in doc
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


def test_lora_and_sdxl_sections_run(quick):
    _, doc, raw = quick
    arms = raw["lora"]["arms"]
    assert set(arms) == {"full", "lora4", "lora16"}
    assert arms["lora4"]["trainable"] < arms["lora16"]["trainable"] < arms["full"]["trainable"] == arms["full"]["parameters"]
    t = arms["lora16"]["trainable"]  # AdamW: two fp32 moments per parameter (+ a step counter per tensor)
    assert 8 * t <= arms["lora16"]["optimizer_bytes"] < 8 * t + 8 * 1000
    sdxl = raw["sdxl"]
    assert 0 < sdxl["trainable"] < sdxl["parameters"] and sdxl["wall_s"] > 0 and sdxl["first_loss"] == sdxl["first_loss"]
    assert len(_rows(doc, "LoRA rank 16")) == 1


def test_demo_precision_reads_two_runs(tmp_path):
    """bench_demo_precision: the final loss is the mean of the last n logged losses; the goal is ≥ 0.95 seen
    accuracy in bf16 and a final loss within 10 % of fp32's."""
    quality = _module("bench_demo_precision")

    def fake_run(name, precision, losses, accuracy):
        d = tmp_path / name
        (d / "unet").mkdir(parents=True)
        (d / "unet" / "config.toml").write_text(f'model = "demo"\nprecision = "{precision}"\n')
        (d / "unet" / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * i, "loss": l}) + "\n"
                                                          for i, l in enumerate(losses)))
        score = {"accuracy": accuracy, "low": 0.9, "high": 1.0, "n": 176, "correct": round(176 * accuracy)}
        (d / "eval").mkdir()
        (d / "eval" / "eval.json").write_text(json.dumps({"scores": {"seen": {"all": score}}, "seed": 1000,
                                                          "images_per_prompt": 2, "settings": settings}))
        (d / "demo.json").write_text(json.dumps({"seconds": {"UNet": 100.0}}))
        return d

    settings = {"sampler": "dpmpp-2m", "steps": 20, "cfg": 4.0}

    a = fake_run("fp32", "fp32", [1.0, 0.5, 0.10, 0.10], 1.0)
    b = fake_run("bf16", "bf16", [1.0, 0.5, 0.11, 0.12], 0.96)
    r = quality.compare(a, b, n=2)
    assert r["fp32"]["precision"] == "fp32" and r["bf16"]["precision"] == "bf16"
    assert r["loss_ratio"] == pytest.approx(0.115 / 0.10) and not r["met"]  # 15 % above fp32
    assert quality.compare(a, b, n=3)["loss_ratio"] == pytest.approx((0.5 + 0.11 + 0.12) / (0.5 + 0.10 + 0.10))
    c = fake_run("bf16-ok", "bf16", [1.0, 0.5, 0.105, 0.10], 0.96)
    assert quality.compare(a, c, n=2)["met"]
    d = fake_run("bf16-bad", "bf16", [1.0, 0.5, 0.10, 0.10], 0.94)
    assert not quality.compare(a, d, n=2)["met"]  # same loss, adherence below 0.95
    assert "NOT met" in quality.markdown(r) and "mean of the last 2" in quality.markdown(r)
    assert quality.main([str(a), str(tmp_path / "missing")]) == 2  # one-line error, not a traceback
    settings["steps"] = 10
    e = fake_run("bf16-other-eval", "bf16", [1.0, 0.5, 0.10, 0.10], 1.0)
    assert quality.main([str(a), str(e)]) == 2  # evaluated with other settings: not comparable
    # many runs: one row each (seed and kernel setting from demo.json), per precision the lowest and mean accuracy
    (b / "demo.json").write_text(json.dumps({"seconds": {"UNet": 60.0}, "seed": 2,
                                             "kernels": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AUTO,STRICT"}}))
    s = quality.spread([a, b, c], n=2)
    assert [r["seed"] for r in s["runs"]] == [0, 2, 0] and s["runs"][1]["kernels"] == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert s["summary"]["bf16"] == {"runs": 2, "min": 0.96, "mean": 0.96} and s["summary"]["fp32"]["min"] == 1.0
    assert "bf16: 2 run(s), seen accuracy lowest 0.960" in quality.spread_markdown(s)
    assert quality.main([str(a), str(b), str(c), "--n", "2", "--out", str(tmp_path / "PRECISION.md")]) == 0
    page = (tmp_path / "PRECISION.md").read_text()
    assert page.startswith("# The demo's accuracy") and "| bf16 | 2 | ONEDNN_MAX_CPU_ISA=AVX2 |" in page
