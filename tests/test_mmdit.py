"""MMDiT (SD3/SD3.5 transformer): equal to diffusers' SD3Transformer2DModel on shared random weights, through both
folder formats; the released shapes counted on the meta device.

The oracle is diffusers 0.42.1 (tests only; src never imports it). Configs are tiny (16–32 channels).
"""

import json

import pytest
import torch

from diffusers import SD3Transformer2DModel
from latentforge.config import MMDIT_PRESETS, MMDiTConfig
from latentforge.errors import UserError
from latentforge.formats.diffusers import mmdit_from_diffusers, mmdit_to_diffusers
from latentforge.models import MMDiT
from latentforge.models.mmdit import sincos_2d
from tolerance import assert_same_function

CONFIGS = {
    # SD3-like: joint blocks only, no qk norm; heads of 8 channels (the padded CPU attention path).
    "sd3_like": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                     pooled_projection_dim=10, pos_embed_max_size=8),
    # SD3.5-like (MMDiT-X): 16 latent channels, qk RMSNorm, dual attention in the first two of three blocks,
    # 16-channel heads (the unpadded CPU attention path).
    "sd35_like": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=32,
                      pooled_projection_dim=12, pos_embed_max_size=6, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    # Other channel counts in and out, a patch of 1, one block (pre-only from the start), qk norm without dual
    # attention; run on non-square inputs (an off-centre crop of the position table).
    "nonsquare": dict(sample_size=6, patch_size=1, in_channels=3, out_channels=5, num_layers=1, attention_head_dim=4,
                      num_attention_heads=3, joint_attention_dim=7, caption_projection_dim=12,
                      pooled_projection_dim=6, pos_embed_max_size=9, qk_norm="rms_norm"),
}
SIZES = {"sd3_like": (8, 8), "sd35_like": (12, 12), "nonsquare": (5, 8)}  # latent (H, W) each is run at


def mmdit_from(cfg: dict) -> MMDiTConfig:
    """Our config for diffusers' config dict `cfg` (the translation formats/diffusers.py reads config.json with)."""
    return mmdit_from_diffusers(cfg, "config.json")


def _random_diffusers(cfg: dict) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the default init (ones for the RMSNorms) so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(cfg: dict, size):
    b, L = 2, 5
    x = torch.randn(b, cfg["in_channels"], *size)
    t = torch.tensor([300.0, 871.5])  # σ·1000, as StableDiffusion3Pipeline passes it
    return x, t, torch.randn(b, L, cfg["joint_attention_dim"]), torch.randn(b, cfg["pooled_projection_dim"])


def _positions(cfg: dict, x, ctx) -> int:
    """batch × the tokens attention sums over (image patches + text tokens)."""
    p = cfg["patch_size"]
    return x.shape[0] * ((x.shape[-2] // p) * (x.shape[-1] // p) + ctx.shape[1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_to_ours_and_back(name, tmp_path):
    cfg = CONFIGS[name]
    theirs = _random_diffusers(cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = MMDiT.from_pretrained(tmp_path / "theirs").eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, t, ctx, pooled = _inputs(cfg, SIZES[name])
    with torch.no_grad():
        expected = theirs(x, ctx, pooled, t).sample
        got = ours(x, t, ctx, pooled)
    assert got.shape == expected.shape == (2, cfg["out_channels"], *SIZES[name])
    n = _positions(cfg, x, ctx)
    diff = assert_same_function(got, expected, ours, positions=n, what=f"{name}: diffusers -> ours")
    print(f"{name}: max |ours − diffusers| = {diff:.3g} (output scale {expected.abs().max():.3g})")

    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert {k: saved[k] for k in cfg} == {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_same_function(back(x, ctx, pooled, t).sample, expected, ours, positions=n,
                             what=f"{name}: ours -> diffusers")


def test_position_table_is_diffusers():
    """A fresh model's position table (it is a stored buffer, so it matters for models built from a config) equals
    diffusers' PatchEmbed buffer: the same float64 sin-cos, rounded once to float32."""
    for name, cfg in CONFIGS.items():
        theirs = SD3Transformer2DModel(**cfg).pos_embed.pos_embed
        ours = MMDiT(mmdit_from(cfg)).pos_embed.pos_embed
        assert torch.equal(ours, theirs), name


def test_position_table_closed_form():
    """sincos_2d(8, grid 2, base 4): cells 4/2 = 2 apart, frequencies 1 and 10000^(-1/2) = 0.01; the first half of
    the channels codes the column as [sin, sin, cos, cos], the second half the row."""
    table = sincos_2d(8, grid=2, base=4).reshape(2, 2, 8)  # (row, column, channels)
    def code(pos):  # one axis: [sin(pos·1), sin(pos·0.01), cos(pos·1), cos(pos·0.01)]
        angles = torch.tensor([pos * 1.0, pos * 0.01], dtype=torch.float64)
        return angles.sin().tolist() + angles.cos().tolist()

    for row in range(2):
        for col in range(2):
            # the table is float32 of values in [-1, 1]: one rounding is at most 6e-8, so 1e-7 (under 2 ulp)
            assert torch.allclose(table[row, col], torch.tensor(code(2 * col) + code(2 * row)), atol=1e-7)


def _diffusers_count(cfg: MMDiTConfig) -> int:
    with torch.device("meta"):
        model = SD3Transformer2DModel(**{k: v for k, v in mmdit_to_diffusers(cfg).items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MMDIT_PRESETS))
def test_presets_count_as_diffusers(name):
    """The released shapes, built on the meta device (no memory): the same parameters as diffusers' model."""
    cfg = MMDIT_PRESETS[name]
    with torch.device("meta"):
        ours = MMDiT(cfg)
    n = ours.num_parameters()
    assert n == _diffusers_count(cfg)
    print(f"{name}: {n:,} parameters")


def test_preset_sizes():
    """What the releases are called: SD3 medium 2B, SD3.5 large 8B parameters (rounded; 2.03 B and 8.06 B)."""
    counts = {name: _diffusers_count(cfg) for name, cfg in MMDIT_PRESETS.items()}
    assert round(counts["sd3-medium"] / 1e9) == 2
    assert round(counts["sd3.5-large"] / 1e9) == 8


@pytest.mark.parametrize("key, value, says", [
    ("qk_norm", "layer_norm", 'unsupported qk_norm="layer_norm"'),
    ("caption_projection_dim", 24, "caption_projection_dim=24 — the joint attention needs it equal"),
    ("dual_attention_layers", [5], "dual_attention_layers=[5]"),
    ("_class_name", "FluxTransformer2DModel", "expected 'SD3Transformer2DModel'"),
    ("pos_embed_max_size", None, "unsupported pos_embed_max_size=null"),
    ("pos_embed_max_size", ..., None),  # absent: diffusers' default 96, not the stored 8 × 8 table: the key is named
])
def test_config_refusals_name_the_file(tmp_path, key, value, says):
    folder = tmp_path / "transformer"
    MMDiT(mmdit_from(CONFIGS["sd3_like"])).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    if value is ...:  # the key left out
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))
    if says is None:
        with pytest.raises(UserError, match="pos_embed.pos_embed"):  # the table's shape now differs from the file
            MMDiT.from_pretrained(tmp_path)
        return
    with pytest.raises(UserError) as err:
        MMDiT.from_pretrained(tmp_path)
    assert str(folder / "config.json") in str(err.value) and says in str(err.value)


def test_input_checks():
    model = MMDiT(mmdit_from(CONFIGS["sd3_like"]))
    ctx, pooled, t = torch.randn(1, 2, 12), torch.randn(1, 10), torch.tensor([1.0])
    with pytest.raises(ValueError, match="not a multiple of the patch size 2"):
        model(torch.randn(1, 4, 7, 8), t, ctx, pooled)
    with pytest.raises(ValueError, match="exceed pos_embed_max_size 8"):
        model(torch.randn(1, 4, 18, 8), t, ctx, pooled)


def test_gradient_checkpointing_is_the_same_function():
    """Recomputing each block in backward gives the same output and gradients (same kernels: bitwise)."""
    model = MMDiT(mmdit_from(CONFIGS["sd35_like"]))
    x, t, ctx, pooled = _inputs(CONFIGS["sd35_like"], (8, 8))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(flag)
        out = model(x, t, ctx, pooled)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
