"""Reliability 6: untrusted pickle files (.ckpt / .pt / .bin / .pth) are refused at every entry point
that reads weights, and the payload inside never runs.

Each file is a real PyTorch checkpoint whose pickle, when loaded the unsafe way, calls
`open(MARKER, "w")` (a `__reduce__` payload). Each entry point is called through
`latentforge.cli.main` (the console script's function); afterwards the marker must be absent and the
command must have failed with one `error:` line. The last step loads one of the files the unsafe way
and sees the marker appear — the proof that the payload is live and the test could fail.
"""

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertTokenizer

from latentforge.cli import main

from rel_kit import record, save_tiny_vae


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


def run(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    return code, lines


@pytest.fixture
def world(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a blue square")
    return {"data": data, "vae": save_tiny_vae(tmp_path / "good_model"), "marker": tmp_path / "PAYLOAD_RAN"}


def cases(tmp_path, world):
    """(name, argv, what must appear in the error) for each entry point that could read a pickle."""
    m, data, good_vae = world["marker"], world["data"], world["vae"]
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
    ]


def test_pickle_payloads_are_refused_and_never_run(tmp_path, world, capsys):
    marker, seen, problems = world["marker"], {}, []
    for name, argv, names in cases(tmp_path, world):
        try:
            code, lines = run(argv, capsys)
        except BaseException as e:  # escaped main(): the user would see a traceback
            code, lines = "traceback", [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
            capsys.readouterr()
        if marker.exists():
            problems.append(f"{name}: THE PICKLE PAYLOAD RAN")
            marker.unlink()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or names not in lines[0]:
            problems.append(f"{name}: exit {code}, want 2 and one 'error:' line naming {names}; got {lines}")
        seen[name] = lines[0] if lines else ""
    # The payload is live: loading the same file the unsafe way runs it.
    torch.load(tmp_path / "sd-v1-5.ckpt", weights_only=False)
    assert marker.exists()
    record("untrusted", entry_points=len(seen), errors=seen, problems=problems,
           payload_ran_when_unpickled_unsafely=True)
    assert not problems, "\n".join(problems)
