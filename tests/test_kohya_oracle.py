"""kohya-format adapter files against kohya's own code (sd-scripts), not ours and not diffusers' converter.

tests/fixtures/kohya/locon_sd1.safetensors was written by kohya-ss/sd-scripts' `networks/lora.py` (a LoCon:
LoRA on the attention/feed-forward linears and the resnets' 3×3 convs, rank 2, α 1.5 / conv α 1.0) for the tiny
seeded SD 1.x folder of script_oracle_kit.py; merged.json.gz holds what its `networks/merge_lora.py`
(`merge_to_sd_model`, ratio 0.7) changed in that folder's UNet and text encoder, each change as
`script_oracle_kit.probe` numbers; both made by tests/fixtures/make_kohya_outputs.py, which names the commit and
the two files' sha256. Here `latentforge merge` folds the same file into the same folder: the same weights must
change, by the same amounts.
"""

import gzip
import hashlib
import json
from pathlib import Path

import pytest

import script_oracle_kit as kit
from latentforge.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "kohya"


@pytest.fixture(scope="module")
def doc():
    return json.loads(gzip.decompress((FIXTURES / "merged.json.gz").read_bytes()))


def test_latentforge_merge_equals_kohyas_merge(doc, tmp_path):
    assert len(doc["sd_scripts_commit"]) == 40 and set(doc["files_sha256"]) == {"networks/lora.py",
                                                                                "networks/merge_lora.py"}
    folder = kit.write_folder(tmp_path, "sd1")
    assert kit.source_digest(folder) == doc["source_sha256"], \
        "the seeded folder is not the one kohya's code saw (torch's generator changed?): rerun make_kohya_outputs.py"
    for kind, net in doc["networks"].items():
        path = FIXTURES / net["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == net["sha256"], f"{path} is not the file kohya wrote"
        out = tmp_path / f"merged-{kind}"
        assert main(["merge", "--model", str(folder), "--lora", f"{path}:{doc['ratio']}", "--out", str(out)]) == 0
        base, merged = kit.folder_weights(folder), kit.folder_weights(out)
        changed = sorted(k for k in base if not (merged[k] == base[k]).all())
        assert changed == sorted(net["merged"]), f"{kind}: kohya changed {sorted(set(net['merged']) - set(changed))[:3]}, " \
                                                 f"we changed {sorted(set(changed) - set(net['merged']))[:3]}"
        for key, want in net["merged"].items():
            got = kit.probe(key, merged[key].float() - base[key].float())
            # Both add ratio·(α/r)·up·down to the same fp32 weight, in another order of operations, and the change
            # is read back as W' - W: the two differ by fp32 rounding (≲ 1e-7 relative), measured ≤ 6e-7 of ‖ΔW‖
            # (‖ΔW‖ is 0.17–1.5 here). Each probe differs by ~N(0, ‖ΔW - ΔW'‖²), so 1e-5·‖ΔW‖ holds for rounding,
            # and a wrong scale or a missing or transposed term (‖ΔW - ΔW'‖ ~ ‖ΔW‖) breaks every probe.
            tol = 1e-5 * want["norm"]
            assert abs(got["norm"] - want["norm"]) <= tol, f"{kind}: {key}"
            assert all(abs(a - b) <= tol for a, b in zip(got["probes"], want["probes"])), f"{kind}: {key}"
