"""Reliability 6: untrusted pickle files (.ckpt / .pt / .bin / .pth) are refused at every entry point
that reads weights, and the payload inside never runs.

Entry points: `cache --vae`, `cache --text-encoder`, `eval --inception-weights`, `train --vae`,
`train --resume` (a checkpoint folder holding .pt files), `sample --model` (a .ckpt, and a model
folder whose unet/ holds the pickle .bin). Each file is a real PyTorch checkpoint whose pickle, when
loaded the unsafe way, calls `open(MARKER, "w")` (a `__reduce__` payload). Each entry point is called
through `latentforge.cli.main` (the console script's function); afterwards the marker must be absent
and the command must have failed with one `error:` line (exit 2, no traceback; `warning:` lines
allowed). The last step loads one of the files the unsafe way and sees the marker appear — the proof
that the payload is live and the test could fail.
"""

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertTokenizer

from latentforge.train import checkpoint

from rel_kit import SETTINGS, clear_error, record, run_cli, save_tiny_vae


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")  # runs at unpickling time


def evil_checkpoint(path: Path, marker: Path, legacy=False) -> Path:
    """A checkpoint with real tensors and the payload beside them (torch zip format, or a raw pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"state_dict": {"conv_in.weight": torch.zeros(4, 3, 3, 3)}, "extra": Payload(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a blue square")
    return {"data": data, "vae": save_tiny_vae(tmp_path / "good_model"), "marker": tmp_path / "PAYLOAD_RAN"}


def cases(tmp_path, files, world):
    """(name, argv, what must appear in the error) for each entry point that could read a pickle."""
    m, data, good_vae = files["marker"], files["data"], files["vae"]
    ckpt = evil_checkpoint(tmp_path / "sd-v1-5.ckpt", m)
    legacy_pt = evil_checkpoint(tmp_path / "vae.pt", m, legacy=True)
    # a vae/ folder whose weights are the pickle file diffusers used to write
    bin_vae = tmp_path / "bin_model"
    (bin_vae / "vae").mkdir(parents=True)
    (bin_vae / "vae" / "config.json").write_text((good_vae / "vae" / "config.json").read_text())
    evil_checkpoint(bin_vae / "vae" / "diffusion_pytorch_model.bin", m)
    # a folder holding only a .ckpt
    ckpt_dir = tmp_path / "ckpt_only"
    evil_checkpoint(ckpt_dir / "model.ckpt", m)
    # a transformers text encoder whose weights are pytorch_model.bin
    te = tmp_path / "text_encoder"
    te.mkdir()
    (te / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "blue", "square"]))
    BertConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=16).save_pretrained(te)
    BertTokenizer(str(te / "vocab.txt"), model_max_length=8).save_pretrained(te)
    evil_checkpoint(te / "pytorch_model.bin", m)
    # FID Inception weights as a .pth
    pth = evil_checkpoint(tmp_path / "pt_inception-2015-12-05-6726825d.pth", m)
    # a run whose newest checkpoint holds .pt files (next to a real state.json and COMPLETE marker)
    run = tmp_path / "run"
    step8 = run / "checkpoints" / "step-8"
    step8.mkdir(parents=True)
    for name in ("state.json", checkpoint.MARKER):
        (step8 / name).write_bytes((world["ref"] / "checkpoints" / "step-8" / name).read_bytes())
    for stem in ("model", "ema", "optimizer"):
        evil_checkpoint(step8 / f"{stem}.pt", m)
    # a model folder whose unet weights are the pickle .bin
    bin_model = tmp_path / "bin_unet_model"
    shutil.copytree(world["ref"] / "model", bin_model)
    (bin_model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    evil_checkpoint(bin_model / "unet" / "diffusion_pytorch_model.bin", m)
    gen = lambda model: ["sample", "--model", model, "--out", tmp_path / "gen", "--steps", "1",  # noqa: E731
                         "--device", "cpu"]
    cache = lambda vae, *extra: ["cache", "--data", data, "--vae", vae, "--out", tmp_path / "c", "--quiet",  # noqa
                                 "--device", "cpu", "--text-encoder", "none", *extra]
    return [
        ("cache --vae X.ckpt", cache(ckpt), str(ckpt)),
        ("cache --vae X.pt (raw pickle)", cache(legacy_pt), str(legacy_pt)),
        ("cache --vae folder with vae/diffusion_pytorch_model.bin", cache(bin_vae), "diffusion_pytorch_model.bin"),
        ("cache --vae folder holding only model.ckpt", cache(ckpt_dir), str(ckpt_dir)),
        ("cache --text-encoder folder with pytorch_model.bin",
         cache(good_vae)[:-1] + [te], str(te)),
        ("eval --fid --inception-weights X.pth",
         ["eval", "--model", good_vae, "--fid", "--reference", data, "--inception-weights", pth], str(pth)),
        ("train --vae X.ckpt", world.train_argv(tmp_path / "run2")[:-len(SETTINGS)] + ["--vae", ckpt] + SETTINGS,
         str(ckpt)),
        ("train --resume with .pt checkpoint files", world.train_argv(run, "--resume"), str(step8)),
        ("sample --model X.ckpt", gen(ckpt), str(ckpt)),
        ("sample --model folder with unet/diffusion_pytorch_model.bin", gen(bin_model), "diffusion_pytorch_model.bin"),
    ]


def test_pickle_payloads_are_refused_and_never_run(tmp_path, files, world, capsys):
    marker, seen, problems = files["marker"], {}, []
    for name, argv, names in cases(tmp_path, files, world):
        code, lines = run_cli(argv, capsys)
        if marker.exists():
            problems.append(f"{name}: THE PICKLE PAYLOAD RAN")
            marker.unlink()
        verdict = clear_error(code, lines, names)
        if verdict != "ok":
            problems.append(f"{name}: {verdict}; stderr: {lines}")
        seen[name] = next((l for l in lines if l.startswith("error: ")), lines[-1] if lines else "")
    # The payload is live: loading the same file the unsafe way runs it.
    torch.load(tmp_path / "sd-v1-5.ckpt", weights_only=False)
    assert marker.exists()
    record("untrusted", entry_points=len(seen), errors=seen, problems=problems,
           payload_ran_when_unpickled_unsafely=True)
    assert not problems, "\n".join(problems)


def test_no_load_path_in_the_package_can_unpickle():
    """Static guard for the paths the test above cannot reach: every `torch.load` in src/latentforge passes
    weights_only=True, nothing calls pickle/marshal/dill loads, and no `np.load` allows pickles."""
    import ast

    src = Path(__file__).resolve().parents[2] / "src" / "latentforge"
    found, bad = [], []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(src)}:{node.lineno} {name}"
            if name.endswith("torch.load") or name == "torch.serialization.load":
                found.append(where)
                if kw.get("weights_only") != "True":
                    bad.append(f"{where} without weights_only=True")
            elif name.split(".")[-1] in ("load", "loads", "Unpickler") and name.split(".")[0] in (
                    "pickle", "cPickle", "marshal", "dill", "joblib", "_pickle"):
                bad.append(f"{where}: unpickles")
            elif name in ("np.load", "numpy.load") and kw.get("allow_pickle") not in (None, "False"):
                bad.append(f"{where} with allow_pickle={kw['allow_pickle']}")
    record("untrusted_static", torch_load_calls=found, problems=bad)
    assert not bad, bad
