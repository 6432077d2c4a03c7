"""Generation with an SD3/SD3.5 model: encode the prompt (text_sd3.py), integrate the flow ODE from noise
(flow_sampling.py) with classifier-free guidance (guidance.py), decode (models/vae.py owns (z − shift)·scale).

    pipe = latentforge.load("sd3-folder")                    # SD3Pipeline.from_pretrained
    images = pipe.text2img("a red circle", steps=28, cfg=7)  # list of PIL images, with their PNG parameters
    pipe.img2img("in.png", "a red circle", strength=0.6)

Equal to diffusers' StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline for the same seed: the model gets
t = σ·1000, image i draws its noise from a generator seeded seed + i (image→image: first the VAE posterior sample,
then the noise, from that generator, as diffusers' img2img does), the σ grid is the folder scheduler's (static
shift, or the resolution-dependent shift from the image's token count). tests/test_pipelines_sd3.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from PIL import Image

from . import flow
from .data.images import fit_image, to_pil, to_tensor
from .errors import UserError
from .flow_sampling import FLOW_SAMPLERS, model_timestep, start_at
from .formats.sd3 import FlowSchedule, load_sd3_folder
from .guidance import classifier_free_guidance
from .pipelines import _reading, dropped_token_settings, starting_noise
from .png import format_parameters
from .text_sd3 import T5_LENGTH, SD3TextEncoder

ImageLike = Union[str, Path, Image.Image]
Size = Tuple[int, int]
SAMPLER_DISPLAY = {"euler": "Euler", "heun": "Heun"}  # the A1111 names written to the PNG


@dataclass(frozen=True)
class _Request:
    prompt: str
    negative_prompt: Optional[str]
    sampler: str
    steps: int
    cfg: float
    seed: int
    n: int
    size: Size
    latents: Optional[torch.Tensor]
    output: str
    progress: Optional[bool]


def _refuse_unet_options(class_label=None, karras=None, eta=0.0, spacing=None, **micro) -> None:
    """The UNet pipeline's options (the CLI passes them to every model): one line if one is set for SD3."""
    given = [flag for flag, set_ in (("--class", class_label is not None), ("--karras", bool(karras)),
                                     ("--eta", bool(eta)), ("--spacing", spacing is not None)) if set_]
    given += ["--" + k.replace("_", "-") for k, v in micro.items() if v not in (None, (0, 0))]
    if given:
        raise UserError(f"{', '.join(given)}: not options of an SD3 (flow) model — leave them out")


class SD3Pipeline:
    """An MMDiT, a VAE, the SD3 text stack and the flow scheduler's grid settings."""

    def __init__(self, transformer, vae, text_encoder: SD3TextEncoder, schedule: FlowSchedule = FlowSchedule(),
                 name: str = ""):
        self.transformer, self.vae, self.text_encoder = transformer.eval(), vae.eval(), text_encoder
        self.schedule, self.name = schedule, name
        cfg = transformer.config
        if text_encoder.dim != cfg.context_dim or text_encoder.pooled_dim != cfg.pooled_dim:
            raise UserError(f"{name or 'model'}/text_encoder: widths {text_encoder.dim} (context) and "
                            f"{text_encoder.pooled_dim} (pooled) are not the transformer's {cfg.context_dim} and "
                            f"{cfg.pooled_dim} — use the text encoders it was trained with")
        if vae.config.latent_channels != cfg.in_channels:
            raise UserError(f"{name or 'model'}/vae: {vae.config.latent_channels} latent channels, the transformer "
                            f"takes {cfg.in_channels} — use the VAE it was trained with")

    @classmethod
    def from_pretrained(cls, model_dir, device: Union[str, torch.device, None] = None,
                        t5_length: int = T5_LENGTH) -> "SD3Pipeline":
        """A diffusers SD3 folder (model_index.json naming StableDiffusion3Pipeline); `t5_length` is diffusers'
        max_sequence_length."""
        folder = Path(model_dir)
        parts = load_sd3_folder(folder)
        text = SD3TextEncoder.from_pretrained(folder, t5_length=t5_length)
        pipe = cls(parts["transformer"], parts["vae"], text, parts["schedule"], name=folder.resolve().name)
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def to(self, device) -> "SD3Pipeline":
        self.transformer.to(device)
        self.vae.to(device)
        self.text_encoder.to(device)
        return self

    def with_lora(self, file, scale: float = 1.0):
        raise UserError(f"--lora {file}: adapters on SD3 models are not supported yet — leave out --lora")

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def grid(self) -> int:
        """Pixels per latent patch: the VAE factor × the patch size; image sides are multiples of it."""
        return self.vae.downsample_factor * self.transformer.config.patch_size

    @property
    def default_size(self) -> Size:
        side = self.transformer.config.sample_size * self.vae.downsample_factor
        return side, side

    # ------------------------------------------------------------------ public API
    # Options: negative_prompt; sampler "euler" | "heun"; steps; cfg (≤ 1: no guidance); seed (image i: seed + i) or
    # latents (n, C, h, w), the starting noise; n; size (W, H) or width/height; output "pil" | "pt" in [0, 1] |
    # "latent"; progress (a tqdm bar; None: tqdm's default).

    def text2img(self, prompt: str = "", *, negative_prompt: Optional[str] = None, sampler: str = "euler",
                 steps: int = 28, cfg: float = 7.0, seed: int = 0, n: int = 1, size: Optional[Size] = None,
                 width: Optional[int] = None, height: Optional[int] = None, latents: Optional[torch.Tensor] = None,
                 output: str = "pil", progress: Optional[bool] = None, **unet_options):
        """n images of width × height (default the model's) for `prompt`."""
        _refuse_unet_options(**unet_options)
        if size is not None and (width or height):
            raise UserError("--size: give either --size WxH or --width/--height, not both")
        W, H = size or self.default_size
        size = self._check_size((width or W, height or H), "--width/--height" if width or height else "--size")
        return self._generate(_Request(prompt, negative_prompt, sampler, steps, cfg, seed, n, size, latents, output,
                                       progress))

    def img2img(self, image: ImageLike, prompt: str = "", *, strength: float = 0.6,
                negative_prompt: Optional[str] = None, sampler: str = "euler", steps: int = 28, cfg: float = 7.0,
                seed: int = 0, n: int = 1, width: Optional[int] = None, height: Optional[int] = None,
                latents: Optional[torch.Tensor] = None, output: str = "pil", progress: Optional[bool] = None,
                **unet_options):
        """`image` (resized to width × height; a side not given is the image's, rounded down to the grid) noised
        to the σ of the last ⌊steps·strength⌋ steps, then sampled down from there."""
        _refuse_unet_options(**unet_options)
        with _reading(image, "--image") as (im, where):
            g = self.grid
            size = self._check_size((width or im.size[0] // g * g, height or im.size[1] // g * g),
                                    "--width/--height" if width or height else (where or "--image"))
            init = fit_image(im, size, where)
        return self._generate(_Request(prompt, negative_prompt, sampler, steps, cfg, seed, n, size, latents, output,
                                       progress), init=init, strength=strength)

    # ------------------------------------------------------------------ the generation loop

    @torch.no_grad()
    def _generate(self, r: _Request, init: Optional[Image.Image] = None, strength: float = 1.0):
        sample = self._check(r)
        (W, H), f = r.size, self.vae.downsample_factor
        p = self.transformer.config.patch_size
        sigmas = self.schedule.sigmas(r.steps, (H // f // p) * (W // f // p)).to(self.device)  # (steps + 1,)
        gens = [torch.Generator(device="cpu").manual_seed(r.seed + i) for i in range(r.n)]
        x0 = None
        if init is not None:
            sigmas = self._tail(sigmas, r.steps, strength)
            pixels = to_tensor(init)[None].to(self.device, self.vae.dtype)  # (1, 3, H, W)
            # the posterior sampled with image i's generator before its noise is drawn, as diffusers' img2img
            x0 = torch.cat([self.vae.encode(pixels, sample=True, generator=g) for g in gens]).float()  # (n, C, h, w)
        noise = starting_noise(r.latents, gens, (r.n, self.transformer.config.in_channels, H // f, W // f),
                               self.device)
        x = noise if x0 is None else flow.noised(x0, noise, sigmas[0])  # (n, C, h, w)
        cond, uncond = self._conditions(r.prompt, r.negative_prompt, r.n)
        velocity = classifier_free_guidance(self._model_fn(), cond, uncond, r.cfg)
        out = sample(velocity, x, sigmas, disable=None if r.progress is None else not r.progress)  # (n, C, h, w)
        if r.output == "latent":
            return out
        images = self.vae.decode(out.to(self.vae.dtype)).float()  # (n, 3, H, W) in about [-1, 1]
        if r.output == "pt":
            return (images / 2 + 0.5).clamp(0, 1)
        pils = to_pil(images)
        for i, im in enumerate(pils):
            im.info["parameters"] = self._parameters(r, i, strength if init is not None else None)
        return pils

    def _check(self, r: _Request):
        """The request's numbers, one line each; -> the sampler function."""
        if r.sampler not in FLOW_SAMPLERS:
            raise UserError(f"--sampler {r.sampler}: an SD3 (flow) model samples with {' or '.join(FLOW_SAMPLERS)}")
        for flag, value in (("--steps", r.steps), ("--n", r.n)):
            if value < 1:
                raise UserError(f"{flag}: must be at least 1, got {value}")
        if r.output not in ("pil", "pt", "latent"):
            raise UserError(f"output={r.output!r}: use 'pil', 'pt' or 'latent'")
        return FLOW_SAMPLERS[r.sampler]

    @staticmethod
    def _tail(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
        if not 0 < strength <= 1:
            raise UserError(f"--strength {strength}: must be in (0, 1] — 1 repaints everything, small keeps the image")
        try:
            return start_at(sigmas, steps, strength)
        except ValueError as e:
            raise UserError(f"--strength {e}") from None

    def _model_fn(self):
        """The transformer as the guidance wrapper calls it: (x, σ (B,), context, pooled) -> velocity, t = σ·T."""
        T = self.schedule.num_train_timesteps
        return lambda x, sigma, context, pooled: self.transformer(x, model_timestep(sigma, T), context, pooled)

    def _conditions(self, prompt: str, negative_prompt: Optional[str], n: int):
        """cond / uncond keywords of the transformer: the prompt's and the negative prompt's (None: "") encodings."""
        context, _, pooled = self.text_encoder.encode_pooled([prompt or "", negative_prompt or ""])
        expand = lambda t: t.expand(n, *t.shape[1:])  # noqa: E731  (1, ...) -> (n, ...) without a copy
        cond = {"context": expand(context[:1]), "pooled": expand(pooled[:1])}
        return cond, {"context": expand(context[1:]), "pooled": expand(pooled[1:])}

    def _check_size(self, size, flag: str) -> Size:
        W, H = int(size[0]), int(size[1])
        g = self.grid
        if W < g or H < g or W % g or H % g:
            raise UserError(f"{flag}: {W}x{H} is not on the latent patch grid — sides must be multiples of {g} "
                            f"(the VAE's factor {self.vae.downsample_factor} × the patch size "
                            f"{self.transformer.config.patch_size}), e.g. {max(g, W // g * g)}x{max(g, H // g * g)}")
        return W, H

    def _parameters(self, r: _Request, i: int, strength: Optional[float]) -> str:
        """Image i's A1111 'parameters' text (png.py), as the UNet pipeline writes it."""
        s = self.schedule
        cut = dropped_token_settings(self.text_encoder, r.prompt, r.negative_prompt)
        return format_parameters(r.prompt, r.negative_prompt, {
            "Steps": r.steps, "Sampler": SAMPLER_DISPLAY[r.sampler], "CFG scale": float(r.cfg), "Seed": r.seed + i,
            "Size": f"{r.size[0]}x{r.size[1]}", "Model": self.name or None,
            "Denoising strength": float(strength) if strength is not None else None,
            "Shift": None if s.use_dynamic_shifting else float(s.shift), **cut})
