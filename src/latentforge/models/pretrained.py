"""What the networks share as modules: their diffusers folder format (read and written by
formats/diffusers.py), the parameter count and the gradient-checkpointing switch."""

from __future__ import annotations

from torch import nn


class PretrainedModule(nn.Module):
    """Base of `UNet`, `MMDiT` and `AutoencoderKL`; `component` is the diffusers sub-folder they live in."""

    component: str = ""

    @classmethod
    def from_pretrained(cls, folder):
        """Load from a diffusers `<component>/` folder (`unet/`, `transformer/`, `vae/`), or a model root that contains one."""
        return _diffusers_format().load_component(cls.component, folder)

    def save_pretrained(self, folder) -> None:
        """Write diffusers' `config.json` + `diffusion_pytorch_model.safetensors` into `folder`."""
        _diffusers_format().save_component(self, folder)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def enable_gradient_checkpointing(self, flag: bool = True):
        """Recompute each ResnetBlock/attention in backward instead of storing its activations."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = flag
        return self


def _diffusers_format():
    # The one import of formats/ in models/, and late on purpose: formats/ builds these networks (it imports
    # models/ at module level), so an import of formats/ when models/ loads would be a circle.
    from ..formats import diffusers

    return diffusers
