"""latentforge: train latent-diffusion models on your own images and generate with them."""

import os

__version__ = "0.1.0"

# MKL's GEMMs give the same bits for the same numbers only in its "strict" reproducibility mode: on its AVX2 code
# path (processors without AVX-512, and MKL also dispatches by vendor) the result can depend on where in memory
# the weights lie, so a copy of a model (a resumed run's new allocations, a deep copy) need not give the same
# bits: seen on this project's Intel machine with MKL_ENABLE_INSTRUCTIONS=AVX2, where a deep-copied 1x1 conv gave
# another product and 8 bitwise tests failed (tests/kernel_settings.py); with this setting they pass.
# Read by MKL at its first call; a value the user set wins. docs/ARCHITECTURE.md, "Tolerances and kernels".
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def load(model_dir, **kwargs):
    """Load a model folder (diffusers layout) or an SD 1.x/2.x single file as a generation pipeline
    (see pipelines.py; a single file also takes `tokenizer=` a CLIP tokenizer folder); an SD3 folder
    (model_index.json naming StableDiffusion3Pipeline) as pipelines_sd3.SD3Pipeline."""
    from .formats.sd3 import is_sd3_folder
    from .pipelines import Pipeline

    if is_sd3_folder(model_dir):
        from .pipelines_sd3 import SD3Pipeline

        return SD3Pipeline.from_pretrained(model_dir, **kwargs)
    return Pipeline.from_pretrained(model_dir, **kwargs)
