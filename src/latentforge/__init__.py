"""latentforge: train latent-diffusion models on your own images and generate with them."""

__version__ = "0.1.0"


def load(model_dir, **kwargs):
    """Load a model folder (diffusers layout) or an SD 1.x/2.x single file as a generation pipeline
    (see pipelines.py; a single file also takes `tokenizer=` a CLIP tokenizer folder)."""
    from .pipelines import Pipeline

    return Pipeline.from_pretrained(model_dir, **kwargs)
