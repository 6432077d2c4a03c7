"""UNet: equal to diffusers' UNet2DConditionModel on shared random weights, through both folder formats.

The oracle is diffusers 0.42.1 (tests only; src never imports it). Configs are tiny (8–32 channels).
"""

import pytest
import torch

from diffusers import UNet2DConditionModel
from latentforge.config import UNetConfig
from latentforge.models import UNet
from tolerance import assert_same_function

# Random diffusers configs varying levels, channels, attention levels, head counts, projection,
# cross-attention (some / none), class embeddings, transformer depth, time-embedding options.
DIFFUSERS_CONFIGS = {
    # SD 1.x shape: conv projection, attention on the top levels, `attention_head_dim` = number of heads.
    "sd1_like": dict(block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                     attention_head_dim=2,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x shape: linear projection, per-level heads, upcast attention, 2 transformer layers, 2 resnets.
    "sd2_like": dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
                     attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                     transformer_layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # Class-conditional, no cross-attention: self-attention-only Attn blocks (attention_head_dim = head dim).
    "class_self_attn": dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                            attention_head_dim=4, num_class_embeds=5, mid_block_type="UNetMidBlock2D",
                            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # Unconditional, no attention anywhere.
    "plain": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, mid_block_type="UNetMidBlock2D",
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    # Cross-attention on the low levels only, plus class labels; other channel counts and time embedding.
    "low_attn_class": dict(block_out_channels=(8, 16, 24), layers_per_block=1, norm_num_groups=4,
                           cross_attention_dim=10, attention_head_dim=(1, 4, 2), num_class_embeds=3,
                           in_channels=3, out_channels=6, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # One level: no down/up sampling at all; cross-attention without a mid-block attention; one head of 16
    # channels (head_dim >= 16 takes the unpadded CPU attention path, smaller head dims the padded one).
    "one_level": dict(block_out_channels=(16,), layers_per_block=2, norm_num_groups=8, cross_attention_dim=8,
                      attention_head_dim=1, mid_block_type="UNetMidBlock2D",
                      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)),
}


# SDXL-style: per-level transformer depth, attention-free levels and the `text_time` micro-conditioning
# (sinusoidal size/crop ids + pooled text -> added to the timestep embedding).
_SDXL = dict(addition_embed_type="text_time", use_linear_projection=True, norm_num_groups=4)
SDXL_CONFIGS = {
    # SDXL-base's shape, shrunk: no attention on the first level, depth 1/2/3, heads of 4 channels.
    "xl_base_like": dict(_SDXL, block_out_channels=(8, 16, 32), layers_per_block=2, cross_attention_dim=12,
                         attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3),
                         addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 + 6 * 4,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # Attention-free middle level, uniform depth 2 as an int, one head per level, odd time width.
    "xl_attn_free_middle": dict(_SDXL, block_out_channels=(8, 16, 16), layers_per_block=1, cross_attention_dim=10,
                                attention_head_dim=1, transformer_layers_per_block=2, addition_time_embed_dim=5,
                                projection_class_embeddings_input_dim=4 + 6 * 5, upcast_attention=True,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")),
    # Refiner-like: attention on the first levels only, 5 time ids (sizes, crop, aesthetic score), conv projection,
    # 16-channel heads (the unpadded CPU attention path), depth 3 then 1.
    "xl_refiner_like": dict(_SDXL, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=8,
                            attention_head_dim=(1, 2), transformer_layers_per_block=(3, 1), use_linear_projection=False,
                            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 + 5 * 8,
                            mid_block_type="UNetMidBlock2D",
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # Two attention-free levels before a deep last level; other time-embedding options.
    "xl_deep_last": dict(_SDXL, block_out_channels=(8, 8, 16), layers_per_block=1, cross_attention_dim=6,
                         attention_head_dim=(2, 2, 4), transformer_layers_per_block=[1, 1, 4], addition_time_embed_dim=6,
                         projection_class_embeddings_input_dim=3 + 6 * 6, flip_sin_to_cos=False, freq_shift=1,
                         down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
}


def _random_diffusers(cfg: dict) -> UNet2DConditionModel:
    model = UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the default init (zeros/ones) so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(cfg: dict, size: int = 12):
    b = 2
    x = torch.randn(b, cfg.get("in_channels", 4), size, size)
    t = torch.tensor([7, 901])
    ctx = torch.randn(b, 5, cfg["cross_attention_dim"]) if "cross_attention_dim" in cfg else None
    labels = torch.tensor([1, 2]) if cfg.get("num_class_embeds") else None
    return x, t, ctx, labels


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_diffusers_to_ours_and_back(name, tmp_path):
    cfg = DIFFUSERS_CONFIGS[name]
    theirs = _random_diffusers(cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = UNet.from_pretrained(tmp_path / "theirs").eval()
    x, t, ctx, labels = _inputs(cfg)
    with torch.no_grad():
        expected = theirs(x, t, ctx, class_labels=labels).sample
        got = ours(x, t, ctx, class_labels=labels)
    assert got.shape == expected.shape
    assert_same_function(got, expected, ours, positions=x.shape[0] * x.shape[-1] ** 2, what="diffusers -> ours")

    ours.save_pretrained(tmp_path / "ours")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_same_function(back(x, t, ctx, class_labels=labels).sample, expected, ours,
                             positions=x.shape[0] * x.shape[-1] ** 2, what="ours -> diffusers")


def _added_cond(name: str, b: int = 2) -> dict:
    """diffusers' `added_cond_kwargs`: pooled text (B, P) and size/crop ids (B, K) as SDXL's pipeline builds."""
    cfg = SDXL_CONFIGS[name]
    k = 5 if name == "xl_refiner_like" else 6  # the refiner's ids: original size, crop, aesthetic score
    pooled = cfg["projection_class_embeddings_input_dim"] - k * cfg["addition_time_embed_dim"]
    ids = torch.tensor([[1024.0, 768, 0, 16, 1024, 1024, 6.0][:k], [512.0, 512, 64, 0, 768, 1024, 2.5][:k]])
    return {"text_embeds": torch.randn(b, pooled), "time_ids": ids[:b]}


@pytest.mark.parametrize("name", sorted(SDXL_CONFIGS))
def test_sdxl_configs_match_diffusers_both_ways(name, tmp_path):
    cfg = SDXL_CONFIGS[name]
    theirs = _random_diffusers(cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = UNet.from_pretrained(tmp_path / "theirs").eval()
    x, t, ctx, _ = _inputs(cfg)
    added = _added_cond(name)
    with torch.no_grad():
        expected = theirs(x, t, ctx, added_cond_kwargs=added).sample
        got = ours(x, t, ctx, **added)
        other = ours(x, t, ctx, text_embeds=added["text_embeds"], time_ids=added["time_ids"].flip(0))
    assert_same_function(got, expected, ours, positions=x.shape[0] * x.shape[-1] ** 2, what="SDXL diffusers -> ours")
    assert not torch.allclose(other, got, atol=1e-3)  # the size/crop ids change the prediction

    ours.save_pretrained(tmp_path / "ours")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    assert back.config.addition_embed_type == "text_time"
    with torch.no_grad():
        assert_same_function(back(x, t, ctx, added_cond_kwargs=added).sample, expected, ours,
                             positions=x.shape[0] * x.shape[-1] ** 2, what="SDXL ours -> diffusers")


def test_sdxl_per_level_depth_and_missing_micro_conditioning():
    from latentforge.formats.diffusers import unet_from_diffusers

    model = UNet(unet_from_diffusers(SDXL_CONFIGS["xl_base_like"], "config.json"))
    assert not model.down_blocks[0].attentions  # the attention-free first level
    assert [len(lv.attentions[0].transformer_blocks) for lv in model.down_blocks[1:]] == [2, 3]
    assert [len(lv.attentions[0].transformer_blocks) for lv in model.up_blocks[:2]] == [3, 2]  # mirrored
    assert len(model.mid_block.attentions[0].transformer_blocks) == 3  # the last level's depth
    x, t, ctx, _ = _inputs(SDXL_CONFIGS["xl_base_like"])
    with pytest.raises(ValueError, match="time_ids"):
        model(x, t, ctx)


def test_odd_sizes_and_scalar_timestep_match_diffusers():
    """A side that does not halve evenly (13 -> 7 -> 4) upsamples to the skip's size, like diffusers."""
    cfg = DIFFUSERS_CONFIGS["sd1_like"]
    theirs = _random_diffusers(cfg)
    ours = UNet(UNetConfig(channels=(8, 16, 32), layers_per_level=1, norm_groups=4, cross_attention_dim=12,
                           num_heads=2, attention=(True, True, False))).eval()
    ours.load_state_dict(theirs.state_dict())  # same keys, no renaming
    x, _, ctx, _ = _inputs(cfg, size=13)
    with torch.no_grad():
        assert_same_function(ours(x, 500, ctx), theirs(x, 500, ctx).sample, ours, positions=x.shape[0] * 13 * 13)


def test_context_mask_matches_diffusers_and_hides_padding():
    cfg = DIFFUSERS_CONFIGS["sd2_like"]
    theirs = _random_diffusers(cfg)
    from latentforge.formats.diffusers import unet_from_diffusers

    ours = UNet(unet_from_diffusers({**cfg, "_class_name": "UNet2DConditionModel"}, "config.json")).eval()
    ours.load_state_dict(theirs.state_dict())
    x, t, ctx, _ = _inputs(cfg)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        got = ours(x, t, ctx, context_mask=mask)
        expected = theirs(x, t, ctx, encoder_attention_mask=mask.float()).sample
        assert_same_function(got, expected, ours, positions=x.shape[0] * x.shape[-1] ** 2)
        changed = ctx.clone()
        changed[0, 3:] = 100.0  # only padded positions change
        torch.testing.assert_close(ours(x, t, changed, context_mask=mask), got, atol=1e-5, rtol=0)
        assert not torch.allclose(ours(x, t, changed), ours(x, t, ctx), atol=1e-3)  # unmasked: it matters


def _grads(model, x, t, ctx, labels):
    model.zero_grad(set_to_none=True)
    model(x, t, ctx, class_labels=labels).square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["sd1_like", "class_self_attn"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    cfg = DIFFUSERS_CONFIGS[name]
    from latentforge.formats.diffusers import unet_from_diffusers

    model = UNet(unet_from_diffusers(cfg, "config.json"))
    x, t, ctx, labels = _inputs(cfg)
    plain = _grads(model, x, t, ctx, labels)
    model.enable_gradient_checkpointing(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = _grads(model, x, t, ctx, labels)
    assert plain.keys() == checkpointed.keys()
    for k in plain:  # the same ops on the same shapes, recomputed: bit for bit
        assert torch.equal(checkpointed[k], plain[k]), k
    assert sum(g.abs().sum() for g in plain.values()) > 0


def test_class_conditional_model_requires_labels():
    model = UNet(UNetConfig(channels=(8,), layers_per_level=1, attention=(False,), cross_attention_dim=None,
                            mid_attention=False, num_class_embeds=3, norm_groups=4))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    a = model(torch.zeros(1, 4, 8, 8), torch.tensor([1]), class_labels=torch.tensor([0]))
    b = model(torch.zeros(1, 4, 8, 8), torch.tensor([1]), class_labels=torch.tensor([2]))
    assert not torch.allclose(a, b)  # the label changes the prediction


def test_mid_attention_without_cross_attention_is_rejected():
    with pytest.raises(ValueError, match="mid_attention"):
        UNet(UNetConfig(channels=(8,), attention=(True,), cross_attention_dim=None, norm_groups=4, num_heads=2))


def test_head_dim_sets_heads_per_level():
    """SD 2.x style: 8 channels per head -> (1, 2) heads on (8, 16) channels."""
    model = UNet(UNetConfig(channels=(8, 16), attention=(True, True), head_dim=8, num_heads=None, norm_groups=4,
                            cross_attention_dim=4, layers_per_level=1))
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 1
    assert model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert model.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 2
    with pytest.raises(ValueError, match="do not split"):
        UNet(UNetConfig(channels=(8, 12), attention=(True, True), head_dim=8, norm_groups=4, cross_attention_dim=4))
