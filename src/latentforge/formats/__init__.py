"""On-disk model formats. The diffusers folder layout is our native one."""

from .diffusers import load_model_folder, save_model_folder

__all__ = ["load_model_folder", "save_model_folder"]
