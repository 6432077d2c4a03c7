"""latentforge: train latent-diffusion models on your own images and generate with them."""

__version__ = "0.1.0"


def load(model_dir, **kwargs):
    """Load a model folder (diffusers layout) as a generation pipeline (see pipelines.py)."""
    from .pipelines import Pipeline

    return Pipeline.from_pretrained(model_dir, **kwargs)
