"""Adapters (LoRA, DoRA, LoHa, LoKr) on the UNet's and the text encoder's layers: layers.py has the math,
inject.py puts them on a model, merges and removes them, dropout.py draws their dropout masks from
(sample, layer). Files: formats/lora.py."""

from .inject import (  # noqa: F401
    TEXT_TARGETS, UNET_TARGETS, adapter_parameters, adapter_state_dict, adapters, attach, inject, merge, remove,
    set_multiplier, target_paths, unmerge,
)
from .dropout import KeyedDropout, sample_keys  # noqa: F401
from .layers import KINDS, Adapter, LoHa, LoKr, LoRA, add_adapters, plain_layer  # noqa: F401
