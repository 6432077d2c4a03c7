"""Training config: TOML load, key=value overrides, one-line errors, round-trip, math hash."""

import pytest

from latentforge.config import (
    PRESETS, TrainConfig, VAETrainConfig, config_hash, load_train_config, math_dict, to_toml,
)
from latentforge.errors import UserError


def test_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('model = "tiny"\nlr = 1e-3\nbatch_size = 4\n[unet]\nchannels = [16, 32]\n')
    cfg = load_train_config(f, ["lr=3e-4", "schedule.prediction_type=v_prediction", "lr_schedule=constant"])
    assert cfg.model == "tiny" and cfg.batch_size == 4  # from the file
    assert cfg.lr == 3e-4 and cfg.lr_schedule == "constant"  # override wins over the file
    assert cfg.unet.channels == (16, 32) and cfg.unet.cross_attention_dim == 32  # rest from `tiny`
    assert cfg.schedule.prediction_type == "v_prediction"
    vcfg = load_train_config(None, ["model=tiny", "vae.channels=[8,16]"], cls=VAETrainConfig)
    assert vcfg.vae.channels == (8, 16) and vcfg.vae.norm_groups == PRESETS["tiny"].vae.norm_groups


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_train_config(None, ["model=tiny", "unet.cross_attention_dim=none", "unet.num_heads=[1,2]"])
    assert cfg.unet.cross_attention_dim is None and cfg.unet.num_heads == (1, 2)
    f = tmp_path / "config.toml"
    f.write_text(to_toml(cfg))
    assert load_train_config(f) == cfg
    vcfg = load_train_config(None, ["model=tiny", "kl_weight=1e-5"], cls=VAETrainConfig)
    f.write_text(to_toml(vcfg))
    assert load_train_config(f, cls=VAETrainConfig) == vcfg


@pytest.mark.parametrize("override, words", [
    ("lr=fast", ["lr='fast'", "a number"]),
    ("lr_shedule=cosine", ["unknown key 'lr_shedule'", "lr_schedule"]),
    ("unet.zzyzx=1", ["unknown key 'unet.zzyzx'", "--print-config"]),
    ("batch_size=1.5", ["batch_size=1.5", "an integer"]),
    ("batch_size=true", ["an integer"]),
    ("ema_warmup=1", ["true/false"]),
    ("unet.channels=32", ["unet.channels", "a list of integers"]),
    ("model=huge", ["model='huge'", "tiny, small, sd15"]),
    ("precision=fp8", ["precision='fp8'", "fp32, bf16, fp16"]),
    ("nokey", ["expected key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_train_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert f"override {override!r}" in msg


def test_bad_file_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("lr = = 3\n")
    with pytest.raises(UserError, match="bad.toml: not valid TOML"):
        load_train_config(f)
    f.write_text("[unet]\nchanels = [1]\n")
    with pytest.raises(UserError, match=r"bad.toml: unknown key 'unet.chanels' — did you mean unet.channels"):
        load_train_config(f)
    with pytest.raises(UserError, match="missing.toml: file not found"):
        load_train_config(tmp_path / "missing.toml")


def test_hash_covers_math_only():
    base = load_train_config(None, ["model=tiny"])
    h = config_hash(base)
    for bookkeeping in ["checkpoint_every=7", "sample_every=3", "log_every=1", "device=cpu",
                        "nan_max_consecutive=2", "gradient_checkpointing=true"]:
        assert config_hash(load_train_config(None, ["model=tiny", bookkeeping])) == h, bookkeeping
    for math in ["lr=2e-3", "seed=1", "batch_size=3", "unet.channels=[16,32]", "min_snr_gamma=3.0",
                 "schedule.prediction_type=sample", "caption_dropout=0.0", "precision=bf16", "max_steps=7"]:
        assert config_hash(load_train_config(None, ["model=tiny", math])) != h, math
    # With a constant LR, max_steps does not change the math: the run may be extended.
    const = load_train_config(None, ["model=tiny", "lr_schedule=constant"])
    longer = load_train_config(None, ["model=tiny", "lr_schedule=constant", "max_steps=7"])
    assert config_hash(const) == config_hash(longer)
    assert "unet.channels" in math_dict(base) and "sample_every" not in math_dict(base)
    assert TrainConfig().model == "small"


@pytest.mark.parametrize("override, words", [
    ("batch_size=0", ["batch_size=0 is out of range", "at least 1"]),
    ("max_steps=-5", ["max_steps=-5", "at least 1"]),
    ("caption_dropout=1.5", ["caption_dropout=1.5", "between 0.0 and 1.0"]),
    ("lr=-1e-4", ["lr=-0.0001", "at least 0.0"]),
])
def test_out_of_range_values_are_refused(override, words):
    with pytest.raises(UserError) as e:
        load_train_config(None, [override])
    assert all(w in str(e.value) for w in words), str(e.value)
