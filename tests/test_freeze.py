"""`unet.freeze` patterns: which parameters train, typos named, frozen weights bitwise unchanged by AdamW."""

import pytest
import torch

from latentforge.config import PRESETS
from latentforge.errors import UserError
from latentforge.models import UNet
from latentforge.train.freeze import apply_freeze, frozen_names

NAMES = ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "down_blocks.1.attentions.0.transformer_blocks.0."
         "attn2.to_k.weight", "mid_block.attentions.0.proj_in.weight", "up_blocks.0.attentions.0.transformer_blocks.0."
         "attn1.to_q.weight"]


def test_patterns_apply_in_order_with_negation():
    assert frozen_names(NAMES, []) == set()
    assert frozen_names(NAMES, ["*", "!*attn*"]) == {NAMES[0], NAMES[1], NAMES[3]}  # train only attention
    assert frozen_names(NAMES, ["down_blocks.*"]) == {NAMES[1], NAMES[2]}
    assert frozen_names(NAMES, ["*", "!*attn*", "*attn1*"]) == {NAMES[0], NAMES[1], NAMES[3], NAMES[4]}


def test_typos_and_freezing_everything_are_refused():
    with pytest.raises(UserError, match=r"unet.freeze: '\*atn\*' matches no UNet parameter"):
        frozen_names(NAMES, ["*atn*"])
    with pytest.raises(UserError, match="freezes every parameter"):
        apply_freeze(UNet(PRESETS["tiny"].unet), ["*"])


def test_frozen_weights_stay_bitwise_under_adamw_with_weight_decay():
    unet = UNet(PRESETS["tiny"].unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trained = apply_freeze(unet, ["*", "!*attn2*"])
    assert trained == sum(p.numel() for n, p in unet.named_parameters() if "attn2" in n)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(2):
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]) != ("attn2" in k), k
