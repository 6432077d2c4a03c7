"""End to end: `latentforge demo --budget tiny` runs every stage through the library and writes
every promised file, with the numbers in report.md."""

import json
import re

from PIL import Image

from latentforge.cli import main
from latentforge.demo import grid_prompts


def test_demo_tiny_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--budget", "tiny", "--threads", "1", "--precision", "bf16",
                 "--seed", "3"]) == 0
    for name in ("grid.png", "img2img.png", "inpaint.png", "loss.png", "report.md", "demo.json",
                 "eval/eval.json", "eval/eval.md", "eval/eval_grid.png", "unet/model/model_index.json",
                 "vae/vae/config.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "demo.json").read_text())
    assert list(summary["seconds"]) == ["shapes data set", "VAE", "latent cache", "UNet", "samples", "evaluation"]
    seen, held = summary["scores"]["seen"]["all"], summary["scores"]["held_out"]["all"]
    assert seen["n"] == 88 and held["n"] == 8  # every prompt of the grammar, one image each
    report = (out / "report.md").read_text()
    assert summary["precision"] == "bf16" and 'precision = "bf16"' in (out / "unet" / "config.toml").read_text()
    assert "UNet training precision: **bf16**" in report and "chosen with --precision bf16" in report
    assert summary["seed"] == 3 and "seed 3." in report and 'seed = 3' in (out / "unet" / "config.toml").read_text()
    assert f"**{seen['accuracy']:.3f}** (95 % CI {seen['low']:.3f}–{seen['high']:.3f}, n = 88)" in report
    assert f"**{held['accuracy']:.3f}** (95 % CI {held['low']:.3f}–{held['high']:.3f}, n = 8)" in report
    for stage, seconds in summary["seconds"].items():
        assert re.search(rf"\| {stage} \| {seconds:.1f} \|", report), stage
    grid = Image.open(out / "grid.png")
    assert grid.size == (8 * (96 + 8), 3 * (96 + 8 + 58))  # 24 prompts, 8 per row
    assert "all-attribute accuracy: seen" in capsys.readouterr().out
    # `latentforge eval` on the demo's model folder: the same benchmark from the command line.
    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(out / "unet" / "model"), "--benchmark", "shapes", "--n", "1",
                 "--steps", "2", "--sampler", "euler", "--cfg", "3", "--seed", "5", "--out", str(ev)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((ev / "eval.json").read_text())
    assert result["settings"]["sampler"] == "euler" and result["seed"] == 5
    assert result["scores"]["seen"]["all"]["n"] == 88 and "**all attributes**" in printed
    # A second run into the same folder replaces the old demo; a foreign folder is refused.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(foreign), "--budget", "tiny"]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_grid_prompts_hold_all_held_out_and_16_or_more():
    prompts = grid_prompts()
    assert len(prompts) >= 16 and len({p.caption for p in prompts}) == len(prompts)
    assert sum(p.held_out for p in prompts) == 8
