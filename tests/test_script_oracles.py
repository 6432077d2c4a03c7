"""Single files against what diffusers' own repo scripts write — not our code, and not diffusers' in-library
converter (which accepts two spellings of a VAE key, so it passed a wrong one).

The scripts, `scripts/convert_diffusers_to_original_stable_diffusion.py` (SD 1.x, 2.x) and
`scripts/convert_diffusers_to_original_sdxl.py` (SDXL) of github.com/huggingface/diffusers, were run once on the
tiny seeded diffusers folders of script_oracle_kit.py; tests/fixtures/script_outputs/*.json.gz hold every key of
the files they wrote, its shape and the sha256 of its values, with the script's path, sha256 and commit
(tests/fixtures/make_script_outputs.py made them). Here, for each family, the same folder is rebuilt and:

    folder --latentforge export--> single file       every key, shape and value equal to the script's file
    the script's file (rebuilt from the folder and the fixture alone) --latentforge--> models
                                                     outputs equal diffusers' models of the folder
    the script's file --export --diffusers--> folder    the source folder's weights
                      --export --single-file--> file     the script's file again
"""

import gzip
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import script_oracle_kit as kit
from latentforge.cli import main
from latentforge.formats.single_file import load_single_file

FIXTURES = Path(__file__).parent / "fixtures" / "script_outputs"
FAMILY = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}


def _fixture(name: str) -> dict:
    return json.loads(gzip.decompress((FIXTURES / f"{name}.json.gz").read_bytes()))


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def world(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(f"oracle_{name}")
    folder = kit.write_folder(tmp, name)
    doc = _fixture(name)
    assert kit.source_digest(folder) == doc["source_sha256"], \
        "the seeded folder is not the one the scripts saw (torch's generator changed?): rerun make_script_outputs.py"
    path = tmp / f"{name}.safetensors"
    assert main(["export", "--model", str(folder), "--single-file", str(path), "--dtype", "fp32"]) == 0
    return {"name": name, "tmp": tmp, "folder": folder, "file": path, "doc": doc}


def _assert_script_file(path: Path, doc: dict) -> None:
    """The file holds exactly the script's keys, shapes and values."""
    want, got = doc["tensors"], kit.file_digests(load_file(str(path)))
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{doc['script']} writes {missing[:4]}, we write {extra[:4]}"
    differ = [k for k in want if want[k] != got[k]]
    assert not differ, f"shape or values differ from {doc['script']}'s file: {differ[:4]}"


def test_our_single_file_is_the_diffusers_scripts_file(world):
    doc = world["doc"]
    assert doc["script"].startswith("scripts/convert_diffusers_to_original_") and len(doc["diffusers_commit"]) == 40
    _assert_script_file(world["file"], doc)


def _diffusers_text(folder: Path, sub: str):
    cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
    return cls.from_pretrained(folder / sub).eval()


def test_the_scripts_file_reads_into_the_models_of_the_folder(world):
    """The script's file, rebuilt from the folder's tensors and the fixture's keys, shapes and digests (no key map
    of ours involved), reads into models whose outputs equal diffusers' models of the folder."""
    folder, name = world["folder"], world["name"]
    path = world["tmp"] / "script.safetensors"
    save_file(kit.rebuild_file(folder, world["doc"]["tensors"]), str(path))
    _assert_script_file(path, world["doc"])
    tokenizer = folder if name == "sdxl" else folder / "tokenizer"
    sf = load_single_file(path, tokenizer=tokenizer)
    assert sf.family == FAMILY[name]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = DAutoencoderKL.from_pretrained(folder / "vae").eval()
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([[kit.BOS, 3, 4, kit.EOS]])
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    extra = {}
    if name == "sdxl":  # the pooled text (B, 32) and the 6 size/crop numbers (B, 6)
        extra = dict(text_embeds=torch.randn(2, 32, generator=g), time_ids=torch.randn(2, 6, generator=g))
    # The same fp32 weights through two implementations of the same layers: rounding only. The outputs here are
    # at most ~0.5, where one fp32 ulp is 6e-8; measured: ≤ 3e-8 (UNet), 0 (VAE, text). 1e-6 (~16 ulp) leaves room
    # for other BLAS kernels; a wrong or misplaced tensor moves these outputs by 1e-2 or more.
    tol = dict(atol=1e-6, rtol=0)
    with torch.no_grad():
        t = torch.tensor([10, 900])
        want = unet(x, t, ctx, added_cond_kwargs=extra or None).sample
        torch.testing.assert_close(sf.unet(x, t, ctx, **extra), want, **tol)
        torch.testing.assert_close(sf.vae.decode(x[:1]), vae.decode(x[:1] / sf.vae.config.scaling_factor).sample, **tol)
        torch.testing.assert_close(sf.vae.encode(images), vae.encode(images).latent_dist.mode()
                                   * sf.vae.config.scaling_factor, **tol)
        subs = ["text_encoder"] + (["text_encoder_2"] if name == "sdxl" else [])
        for ours, sub in zip([sf.text_model, sf.text_model_2], subs):
            torch.testing.assert_close(ours(ids).last_hidden_state, _diffusers_text(folder, sub)(ids).last_hidden_state,
                                       **tol)


def test_round_trip_through_a_folder_gives_back_the_scripts_file(world):
    """The script's file -> export --diffusers: the folder's weights are the source folder's (so the script run
    on it writes the same file) -> export --single-file: the script's file again, value for value."""
    folder, tmp, name = world["folder"], world["tmp"], world["name"]
    script_file, out, again = tmp / "script-rt.safetensors", tmp / "exported", tmp / "again.safetensors"
    save_file(kit.rebuild_file(folder, world["doc"]["tensors"]), str(script_file))
    tokenizer = folder if name == "sdxl" else folder / "tokenizer"
    # ε-prediction, as the folder's scheduler says: an SD 2.x file without a marker reads as v-prediction (the
    # SD 2.x-768 default, diffusers' rule), which the file written back would then mark
    assert main(["export", "--model", str(script_file), "--diffusers", str(out), "--tokenizer", str(tokenizer),
                 "--prediction-type", "epsilon"]) == 0
    source, exported = kit.folder_weights(folder), kit.folder_weights(out)
    assert sorted(source) == sorted(exported)
    assert all(torch.equal(source[k], exported[k]) for k in source)
    assert main(["export", "--model", str(out), "--single-file", str(again), "--dtype", "fp32"]) == 0
    _assert_script_file(again, world["doc"])
