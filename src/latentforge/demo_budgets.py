"""The demo's budgets (`latentforge demo --budget`) and its precision choices (`--precision`): plain data, the
one owner of both lists. Imports no torch (only config.py), so the CLI builds the demo's flags without loading
the demo itself (latentforge.demo, which pulls the models, the training loop and the pipelines).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config import PRESETS, ScheduleConfig, TrainConfig, VAETrainConfig

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Budget:
    """Sizes and steps of one demo run."""

    images: int  # shapes images written (seen combinations only)
    image_size: int
    vae: VAETrainConfig
    unet: TrainConfig
    text_max_length: int  # MiniLM tokens; the longest shapes caption is 14 with [CLS]/[SEP]
    eval_images_per_prompt: int
    sampler: str = "dpmpp-2m"
    steps: int = 20
    cfg: float = 4.0
    img2img_strengths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    # Guidance off for the img2img figure: at CFG 4 this small model follows the prompt from the
    # lowest strength on, so the strengths would all look alike.
    img2img_cfg: float = 1.0
    seed: int = 0
    notes: dict = field(default_factory=dict)


_VAE, _UNET = PRESETS["demo"].vae, PRESETS["demo"].unet  # `model=demo` trains the same model on your own data
_SCHEDULE = ScheduleConfig()  # SD's scaled_linear, ε-prediction

BUDGETS = {
    "full": Budget(
        images=2048, image_size=32,
        # Adam's default betas and 800 steps: with the GAN-style (0.5, 0.9) betas, or after only 500 steps,
        # red shapes decoded as orange/yellow.
        vae=VAETrainConfig(model="demo", vae=_VAE, image_size=32, batch_size=32, max_steps=800, lr=3e-3,
                           warmup_steps=50,
                           adam_beta1=0.9, adam_beta2=0.999, kl_weight=1e-6, checkpoint_every=10_000,
                           sample_every=0, log_every=10),
        # min-SNR-5 weighting (Hang et al. 2023) shifts the loss towards the noisy steps that decide
        # layout; position was the last attribute to be learned.
        unet=TrainConfig(model="demo", unet=_UNET, schedule=_SCHEDULE, batch_size=32, max_steps=1500, lr=1e-3,
                         warmup_steps=100,
                         min_snr_gamma=5.0, ema_decay=0.999, caption_dropout=0.1, checkpoint_every=10_000,
                         sample_every=1500, log_every=10, image_size=32,  # one validation grid, at the end
                         val_fraction=0.0),  # every image trains; the demo measures on held-out combinations
        text_max_length=16, eval_images_per_prompt=2,
    ),
    "tiny": Budget(
        images=64, image_size=32,
        vae=VAETrainConfig(vae=replace(_VAE, channels=(8, 16, 16), norm_groups=8), image_size=32, batch_size=8,
                           max_steps=3, warmup_steps=1, checkpoint_every=10_000, sample_every=0, log_every=1,
                           holdout=4),
        unet=TrainConfig(unet=replace(_UNET, channels=(16, 32), num_heads=2, norm_groups=8), schedule=_SCHEDULE,
                         batch_size=8, max_steps=3, warmup_steps=1, checkpoint_every=10_000, sample_every=0,
                         log_every=1, image_size=32),
        text_max_length=16, eval_images_per_prompt=1, steps=2, img2img_strengths=(0.5, 1.0),
    ),
}
