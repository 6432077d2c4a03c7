"""Generation = encode → sample → decode, for text→image, image→image and inpainting.

    pipe = latentforge.load("runs/x/model")             # Pipeline.from_pretrained
    images = pipe.text2img("a red circle", seed=1, n=4)  # list of PIL images
    images[0].info["parameters"]                         # the A1111 'parameters' text (see png.py)

One private function, `_generate`, runs every mode: start from noise (text→image) or from the
encoded image noised to `strength` (image→image: the same sampler started part-way down), guide with
classifier-free guidance, integrate with a sampler from samplers.py, and for inpainting paste the
known region back after every step, noised to the current level — diffusers' pipeline for
UNets without inpainting channels. Sampler settings follow the model's scheduler_config.json
(timestep_spacing, steps_offset, …), so results equal diffusers' StableDiffusionPipeline with the
matching scheduler (tests/test_pipelines.py).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import samplers
from .adapters import remove
from .data.images import MAX_PIXELS, fit_image, open_image, to_pil, to_tensor
from .errors import UserError
from .formats import lora
from .formats.diffusers import load_model_folder
from .formats.single_file import is_single_file, load_single_file
from .guidance import classifier_free_guidance
from .models.unet import time_ids
from .png import format_parameters
from .schedule import NoiseSchedule
from .scheduler_config import SchedulerDefaults, warn_unhonoured
from .text import TextEncoder

ImageLike = Union[str, Path, Image.Image]
Size = Tuple[int, int]


@dataclass(frozen=True)
class _Micro:
    """SDXL's size/crop conditioning: (height, width) sizes, (top, left) crops; None = the output's size."""

    original_size: Optional[Size] = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Optional[Size] = None
    negative_original_size: Optional[Size] = None
    negative_crops_coords_top_left: Size = (0, 0)
    negative_target_size: Optional[Size] = None


@dataclass(frozen=True)
class _Request:
    """One call's options, as the public methods take them (see the comment above `Pipeline.text2img`)."""

    prompt: str
    negative_prompt: Optional[str]
    sampler: str
    steps: int
    cfg: float
    seed: int
    n: int
    size: Optional[Size]
    latents: Optional[torch.Tensor]
    class_label: Optional[int]
    karras: Optional[bool]
    eta: float
    spacing: Optional[str]
    guidance_rescale: float
    output: str
    progress: Optional[bool]
    micro: _Micro


def _micro_used(m: _Micro, size: Tuple[int, int]) -> tuple:
    """(original_size, crops_coords_top_left, target_size) SDXL is conditioned on — sizes (height, width), the
    output's `size` by default — and the negative branch's three when both negative sizes are given."""
    used = (m.original_size or size, tuple(m.crops_coords_top_left), m.target_size or size)
    if m.negative_original_size is not None and m.negative_target_size is not None:
        used += (m.negative_original_size, tuple(m.negative_crops_coords_top_left), m.negative_target_size)
    return used


@contextmanager
def _reading(image: ImageLike, flag: str):
    """(image, where) for an image flag: a PIL image as it is (where None), or the file opened with no pixel decoded
    yet (where "<flag> <path>", for data.images.fit_image); PIL's errors reading it, until the block ends, are one
    UserError line."""
    if isinstance(image, Image.Image):
        yield image, None
        return
    path = Path(image)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file — pass an existing image")
    try:
        with open_image(path) as im:
            yield im, f"{flag} {path}"
    except Image.DecompressionBombError:
        raise UserError(f"{flag} {path}: over {Image.MAX_IMAGE_PIXELS * 2:,} pixels (a decompression-bomb guard) — "
                        "resize it to the size you want to generate") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: not a readable image ({e}) — pass a PNG or JPEG") from None


def starting_noise(latents: Optional[torch.Tensor], gens, shape, device) -> torch.Tensor:
    """The sampler's starting noise (n, C, h, w): `latents` as given (its shape checked), or image i's drawn from
    generator i on the CPU (diffusers' pipelines with a list of generators), then moved to `device`."""
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise UserError(f"latents: shape {tuple(latents.shape)} does not match {tuple(shape)} "
                            "(n, channels, height/f, width/f)")
        return latents.to(device, torch.float32)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(device)


def dropped_token_settings(text_encoder, prompt: str, negative_prompt: Optional[str]) -> dict:
    """The PNG settings saying how many tokens of each prompt the encoder did not see (None: all seen)."""
    return {name: text_encoder.dropped_tokens(text) or None
            for name, text in (("Prompt tokens dropped", prompt), ("Negative tokens dropped", negative_prompt)) if text}


class Pipeline:
    """A UNet, a VAE, the noise schedule and (for text models) the text encoder."""

    def __init__(self, unet, vae, schedule: NoiseSchedule, text_encoder=None,
                 scheduler: Optional[SchedulerDefaults] = None, name: str = "", use_context_mask: bool = False):
        self.unet, self.vae, self.schedule, self.text_encoder = unet.eval(), vae.eval(), schedule, text_encoder
        self.scheduler = scheduler or SchedulerDefaults()  # the model's sampling defaults (formats/ reads them)
        self.name = name
        self.loras: List[str] = []  # "file:scale" of the adapters applied by with_lora
        warn_unhonoured(self.scheduler.config, where=f"{name or 'model'}/scheduler")
        # diffusers' StableDiffusionPipeline gives the UNet no attention mask (captions are padded to a
        # fixed length); keep False for identical images there, True if the model was trained with it.
        self.use_context_mask = use_context_mask
        self._embeddings: dict = {}  # prompt -> its text embeddings (one row), see _encoded
        cfg = unet.config
        if cfg.cross_attention_dim is not None and text_encoder is None:
            raise UserError(f"{name or 'model'}: the UNet cross-attends to text but the folder has no "
                            "text_encoder/ — save the model with its text encoder")
        if text_encoder is not None and cfg.cross_attention_dim != text_encoder.dim:
            raise UserError(f"{name or 'model'}/text_encoder: its width {text_encoder.dim} is not the UNet's "
                            f"cross_attention_dim {cfg.cross_attention_dim} — use the encoder it was trained with")
        if cfg.addition_input_dim is not None:  # SDXL: pooled text + 6 size/crop numbers
            pooled = getattr(text_encoder, "pooled_dim", None)
            if pooled is None or pooled + 6 * cfg.addition_time_embed_dim != cfg.addition_input_dim:
                raise UserError(f"{name or 'model'}/text_encoder_2: the UNet is micro-conditioned on "
                                f"{cfg.addition_input_dim} numbers, which needs a pooled text width of "
                                f"{cfg.addition_input_dim - 6 * cfg.addition_time_embed_dim} (got {pooled}) — "
                                "use the SDXL text encoders it was trained with")

    @classmethod
    def from_pretrained(cls, model_dir, device: Union[str, torch.device, None] = None, tokenizer=None,
                        prediction_type: Optional[str] = None, **kwargs) -> "Pipeline":
        """A model folder (diffusers layout) or an SD 1.x/2.x single file (.safetensors / legacy .ckpt); for a
        single file, `tokenizer` is a CLIP tokenizer folder and `prediction_type` overrides the inferred one."""
        folder = Path(model_dir)
        if is_single_file(folder):
            sf = load_single_file(folder, tokenizer=tokenizer, prediction_type=prediction_type)
            pipe = cls(sf.unet, sf.vae, NoiseSchedule.from_config(sf.schedule_config), sf.text_encoder(),
                       sf.scheduler, name=folder.stem, **kwargs)
            return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        parts = load_model_folder(folder)
        text = None
        if parts["text_encoder_dir"] is not None:
            text = TextEncoder.from_pretrained(str(folder))
        pipe = cls(parts["unet"], parts["vae"], NoiseSchedule.from_config(parts["schedule_config"]), text,
                   parts["scheduler"],
                   name=folder.resolve().name if folder.name in ("", ".") else folder.name, **kwargs)
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def to(self, device) -> "Pipeline":
        self._embeddings.clear()
        self.unet.to(device)
        self.vae.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    def with_lora(self, file, scale: float = 1.0) -> "Pipeline":
        """Apply an adapter file (diffusers' `pytorch_lora_weights.safetensors`, or kohya/A1111 LoRA, LoCon,
        LoHa, LoKr, DoRA) at strength `scale`. The base weights are not modified; call again to stack
        another file; `without_lora()` takes them all off. Under `compute_in` the file is applied to the
        float32 weights, then cast: the same model as `with_lora` first, `compute_in` after."""
        with self._unet_in_float32():
            lora.apply(lora.read(file), self._adaptable(), scale)
        self.loras.append(f"{Path(file).stem}:{float(scale):g}")  # recorded in the PNG parameters
        return self

    def without_lora(self) -> "Pipeline":
        with self._unet_in_float32():
            for model in self._adaptable().values():
                remove(model)
        self.loras = []
        return self

    @contextmanager
    def _unet_in_float32(self):
        """The UNet back on its float32 weights for the duration, then in its `compute_in` dtype again: adapters
        are put on and taken off the float32 model, so that its kept float32 weights (`_cast`) always match the
        layers it has, and going back to float32 gives the adapter's own float32 weights, not bf16-rounded ones."""
        dtype = self.unet.dtype
        self._cast("unet", torch.float32)
        try:
            yield
        finally:
            self._cast("unet", dtype)

    def compute_in(self, dtype: torch.dtype = torch.bfloat16) -> "Pipeline":
        """Run the UNet in `dtype` (bf16 inference; torch.float32 to go back), and the VAE too unless its config
        says `force_upcast` (diffusers' key, true for SD's and SDXL's VAEs, which overflow in half precision; a
        VAE fixed for fp16 sets it false): then it stays float32. The sampler's arithmetic and the text encoder
        stay float32; inputs are cast to each model's dtype and outputs back to float32. The float32 weights are
        kept aside while in low precision, so going back gives the same images again."""
        self._cast("unet", dtype)
        self._cast("vae", torch.float32 if self.vae.config.force_upcast else dtype)
        return self

    def _cast(self, name: str, dtype: torch.dtype) -> None:
        module, kept = getattr(self, name), f"_fp32_{name}"
        if module.dtype == torch.float32 and dtype != torch.float32:
            setattr(self, kept, {k: v.detach().clone() for k, v in module.state_dict().items()})
        module.to(dtype)
        if dtype == torch.float32 and getattr(self, kept, None) is not None:
            module.load_state_dict(getattr(self, kept))
            setattr(self, kept, None)

    def compile(self, on: bool = True, backend="inductor") -> "Pipeline":
        """Sample with the UNet under torch.compile (train/compile.py: static shapes, one graph per image size
        and batch; the first call of each compiles, for minutes on an SD-size UNet). `on=False` goes back to eager.
        The weights stay the module's: `compute_in` and `with_lora` after it recompile at the next call."""
        from .train.compile import compile_denoiser

        self._compiled = compile_denoiser(self.unet, backend=backend) if on else None
        return self

    def _unet_fn(self):
        compiled = getattr(self, "_compiled", None)
        dtype, unet = self.unet.dtype, self.unet if compiled is None else compiled
        if dtype == torch.float32:
            return lambda x, t, **c: unet(x, t, **c)
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return lambda x, t, **c: unet(cast(x), t, **{k: cast(v) for k, v in c.items()}).float()

    def _adaptable(self) -> dict:
        """The modules an adapter may change (so the cached prompt embeddings are dropped)."""
        self._embeddings.clear()
        comps = {"unet": self.unet}
        if self.text_encoder is not None:
            models = getattr(self.text_encoder, "models", None) or [self.text_encoder.model]  # SDXL: two
            comps.update({f"text_encoder{'_2' if i else ''}": m for i, m in enumerate(models)})
        return comps

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def default_size(self) -> Tuple[int, int]:
        side = self.unet.config.sample_size * self.vae.downsample_factor
        return side, side

    # ------------------------------------------------------------------ public API

    # Each mode takes the same keyword-only options (a misspelt one is a TypeError at the call):
    #   negative_prompt; sampler, steps, cfg (guidance scale), guidance_rescale; seed (image i: seed + i) or
    #   latents (n, C, h, w); n; class_label (class-conditional models); karras (default: the model's
    #   use_karras_sigmas), eta (DDIM's η), spacing (override the model's timestep_spacing); output ("pil" |
    #   "pt" in [0, 1] | "latent"); progress (a tqdm bar; None: tqdm's default); original_size,
    #   crops_coords_top_left, target_size and their negative_* twins: SDXL's (height, width) / (top, left)
    #   micro-conditioning, defaulting as in diffusers' StableDiffusionXLPipeline.

    def text2img(self, prompt: str = "", *, negative_prompt: Optional[str] = None, sampler: str = "dpmpp-2m",
                 steps: int = 25, cfg: float = 5.0, seed: int = 0, n: int = 1, size: Optional[Size] = None,
                 width: Optional[int] = None, height: Optional[int] = None, latents: Optional[torch.Tensor] = None,
                 class_label: Optional[int] = None, karras: Optional[bool] = None, eta: float = 0.0,
                 spacing: Optional[str] = None, guidance_rescale: float = 0.0, output: str = "pil",
                 progress: Optional[bool] = None, original_size: Optional[Size] = None,
                 crops_coords_top_left: Size = (0, 0), target_size: Optional[Size] = None,
                 negative_original_size: Optional[Size] = None, negative_crops_coords_top_left: Size = (0, 0),
                 negative_target_size: Optional[Size] = None):
        """n images of width x height (or `size` (W, H); default the model's) for `prompt`, each side a
        multiple of the VAE factor; the options are listed above."""
        if size is not None and (width or height):
            raise UserError("--size: give either --size WxH or --width/--height, not both")
        W, H = size or self.default_size
        size = self._check_size((width or W, height or H), "--width/--height" if width or height else "--size")
        micro = _Micro(original_size, crops_coords_top_left, target_size, negative_original_size,
                       negative_crops_coords_top_left, negative_target_size)
        return self._generate(_Request(prompt, negative_prompt, sampler, steps, cfg, seed, n, size, latents,
                                       class_label, karras, eta, spacing, guidance_rescale, output, progress, micro))

    def img2img(self, image: ImageLike, prompt: str = "", *, strength: float = 0.6,
                negative_prompt: Optional[str] = None, sampler: str = "dpmpp-2m", steps: int = 25, cfg: float = 5.0,
                seed: int = 0, n: int = 1, width: Optional[int] = None, height: Optional[int] = None,
                latents: Optional[torch.Tensor] = None, class_label: Optional[int] = None,
                karras: Optional[bool] = None, eta: float = 0.0, spacing: Optional[str] = None,
                guidance_rescale: float = 0.0, output: str = "pil", progress: Optional[bool] = None,
                original_size: Optional[Size] = None, crops_coords_top_left: Size = (0, 0),
                target_size: Optional[Size] = None, negative_original_size: Optional[Size] = None,
                negative_crops_coords_top_left: Size = (0, 0), negative_target_size: Optional[Size] = None):
        """Change `image`: noise it to `strength` ∈ (0, 1] and run the last ⌊steps·strength⌋ steps.
        strength 1.0 starts from pure noise and equals text→image. The output is width x height (default:
        the image's size rounded down to the VAE grid, as diffusers); the image is resized to it (LANCZOS)."""
        with _reading(image, "--image") as (im, where):
            init = fit_image(im, self._output_size(im.size, width, height, where or "--image"), where)
        micro = _Micro(original_size, crops_coords_top_left, target_size, negative_original_size,
                       negative_crops_coords_top_left, negative_target_size)
        return self._generate(_Request(prompt, negative_prompt, sampler, steps, cfg, seed, n, init.size, latents,
                                       class_label, karras, eta, spacing, guidance_rescale, output, progress, micro),
                              init=init, strength=strength)

    def inpaint(self, image: ImageLike, mask: ImageLike, prompt: str = "", *, strength: float = 1.0,
                negative_prompt: Optional[str] = None, sampler: str = "dpmpp-2m", steps: int = 25, cfg: float = 5.0,
                seed: int = 0, n: int = 1, width: Optional[int] = None, height: Optional[int] = None,
                latents: Optional[torch.Tensor] = None, class_label: Optional[int] = None,
                karras: Optional[bool] = None, eta: float = 0.0, spacing: Optional[str] = None,
                guidance_rescale: float = 0.0, output: str = "pil", progress: Optional[bool] = None,
                original_size: Optional[Size] = None, crops_coords_top_left: Size = (0, 0),
                target_size: Optional[Size] = None, negative_original_size: Optional[Size] = None,
                negative_crops_coords_top_left: Size = (0, 0), negative_target_size: Optional[Size] = None):
        """Repaint where `mask` is white (≥ 50 % grey); elsewhere the latents stay the encoded image's.
        Image and mask are resized to width x height as in img2img."""
        with _reading(image, "--image") as (im, where), _reading(mask, "--mask") as (mk, mask_where):
            if mk.size != im.size:
                raise UserError(f"--mask: its size {mk.size[0]}x{mk.size[1]} differs from the image's "
                                f"{im.size[0]}x{im.size[1]} — give a mask of the same size")
            size = self._output_size(im.size, width, height, where or "--image")
            init, m = fit_image(im, size, where), fit_image(mk, size, mask_where)
        micro = _Micro(original_size, crops_coords_top_left, target_size, negative_original_size,
                       negative_crops_coords_top_left, negative_target_size)
        return self._generate(_Request(prompt, negative_prompt, sampler, steps, cfg, seed, n, init.size, latents,
                                       class_label, karras, eta, spacing, guidance_rescale, output, progress, micro),
                              init=init, strength=strength, mask=m)

    # ------------------------------------------------------------------ the one generation loop

    @torch.no_grad()
    def _generate(self, r: "_Request", init: Optional[Image.Image] = None, strength: float = 1.0,
                  mask: Optional[Image.Image] = None):
        info = samplers.get_sampler(r.sampler)
        if r.n < 1:
            raise UserError(f"--n: must be at least 1, got {r.n}")
        W, H = self._check_size(r.size or self.default_size, "--image" if init is not None else "--size")
        ac = self.schedule.alphas_cumprod
        opts = self.scheduler.options(r.sampler, r.spacing, r.karras)  # the model's scheduler config, flags win
        plan = samplers.plan(ac, r.sampler, r.steps, **opts.plan_kwargs())
        first = samplers.start_index(r.steps, strength)  # validates strength ∈ (0, 1]
        f, C = self.vae.downsample_factor, self.unet.config.in_channels
        gens = [torch.Generator(device="cpu").manual_seed(r.seed + i) for i in range(r.n)]
        noise = self._noise(r.latents, gens, (r.n, C, H // f, W // f))  # (n, C, h, w)
        x0 = None
        if init is not None:
            x0 = self.vae.encode(to_tensor([init]).to(self.device, self.vae.dtype)).float()  # (1, C, h, w)
            x0 = x0.expand(r.n, -1, -1, -1)  # (n, C, h, w)
        if first:  # below full strength: x0 noised part-way down (full: pure noise, diffusers' `is_strength_max`)
            plan = plan.start_at(first)
        x = plan.start(noise, x0 if first else None)
        cond, uncond = self._conditions(r.prompt, r.negative_prompt, r.class_label, r.n)
        self._micro_conditioning(cond, uncond, (H, W), r.n, r.micro)
        model_fn = classifier_free_guidance(self._unet_fn(), cond, uncond, r.cfg, r.guidance_rescale)
        keep = after_step = None
        if mask is not None:
            keep = self._latent_mask(mask, x0.shape[-2:])  # (1, 1, h, w): 1 = repaint

            def after_step(x, sigma_next):  # the known region, noised to the level x is now at
                return keep * x + (1 - keep) * plan.noised(x0, noise, sigma_next)

        denoiser = plan.denoiser(model_fn, ac, self.schedule.prediction_type, **opts.denoiser_kwargs())
        x = samplers.sample(r.sampler, denoiser, x, plan.sigmas, generator=gens, eta=r.eta, after_step=after_step,
                            disable=None if r.progress is None else not r.progress, **opts.solver_kwargs(r.steps))
        out = plan.finish(x)  # (n, C, h, w) at the UNet's scale
        if keep is not None:
            out = keep * out + (1 - keep) * x0
        if r.output == "latent":
            return out
        images = self.vae.decode(out.to(self.vae.dtype)).float()  # (n, 3, H, W) in about [-1, 1]
        if r.output == "pt":
            return (images / 2 + 0.5).clamp(0, 1)
        pils = to_pil(images)
        for i, im in enumerate(pils):
            im.info["parameters"] = self._parameters(r, i, opts.karras, (W, H), strength if init is not None else None)
        return pils

    def _parameters(self, r: "_Request", i: int, karras: bool, size: Tuple[int, int], strength: Optional[float]) -> str:
        """Image i's A1111 'parameters' text (png.py)."""
        info, (W, H) = samplers.get_sampler(r.sampler), size
        # The whole prompt, as typed: the image is made again from it (the encoder cuts it the same way);
        # how many tokens the encoder did not see is a setting of its own.
        cut = {} if self.text_encoder is None else dropped_token_settings(self.text_encoder, r.prompt,
                                                                           r.negative_prompt)
        return format_parameters(r.prompt, r.negative_prompt, {
            "Steps": r.steps, "Sampler": info.display + (" Karras" if karras else ""),
            "CFG scale": float(r.cfg), "Seed": r.seed + i, "Size": f"{W}x{H}", "Model": self.name or None,
            "Denoising strength": float(strength) if strength is not None else None,
            "Eta": float(r.eta) if "eta" in info.options and r.eta else None,
            "Class": r.class_label, "Guidance rescale": float(r.guidance_rescale) if r.guidance_rescale else None,
            "LoRA": " + ".join(self.loras) or None, **self._micro_record(r.micro, (H, W)), **cut,
        })

    def _micro_record(self, m: "_Micro", size: Tuple[int, int]) -> dict:
        """The SDXL size/crop conditioning an image got, as PNG settings (so it can be reproduced): sizes WxH as
        --original-size/--target-size take them, the crop "TOP LEFT" (--crop TOP,LEFT); {} for other models."""
        if self.unet.config.addition_input_dim is None:
            return {}
        names = ("Original size", "Crop top left", "Target size")
        names += tuple(f"Negative {k[0].lower()}{k[1:]}" for k in names)
        return {k: f"{v[1]}x{v[0]}" if k.endswith("size") else f"{v[0]} {v[1]}"
                for k, v in zip(names, _micro_used(m, size))}

    # ------------------------------------------------------------------ helpers

    def _check_size(self, size: Sequence[int], flag: str) -> Tuple[int, int]:
        W, H = int(size[0]), int(size[1])
        f = self.vae.downsample_factor
        if W < f or H < f or W % f or H % f:
            lo = f"{max(f, W // f * f)}x{max(f, H // f * f)}"
            hi = f"{max(f, -(-W // f) * f)}x{max(f, -(-H // f) * f)}"
            raise UserError(f"{flag}: {W}x{H} is not on the latent grid — valid sizes are multiples of {f} "
                            f"(the VAE's downsampling) on each side, e.g. {lo}" + (f" or {hi}" if hi != lo else ""))
        return W, H

    def _output_size(self, image_size: Sequence[int], width: Optional[int], height: Optional[int],
                     where: str) -> Tuple[int, int]:
        """img2img's / inpaint's output size: width x height; a side not given is the image's, rounded down to the
        VAE grid. An output taken from the image is refused over MAX_PIXELS (the data path's limit), before any
        pixel is decoded: the image would be encoded, sampled and decoded at that size."""
        f, (w, h) = self.vae.downsample_factor, image_size
        W, H = width or max(f, w // f * f), height or max(f, h // f * f)
        if not (width and height) and W * H > MAX_PIXELS:
            dw, dh = self.default_size
            raise UserError(f"{where}: {w}x{h} would make a {W}x{H} output (the image's own size where --width/"
                            f"--height are not given), over the limit of {MAX_PIXELS:,} pixels — pass --width and "
                            f"--height (the model's size is {dw}x{dh}) or resize the image")
        if (W, H) != (w, h) and not (width and height):  # the user asked for no size: say what they get
            warnings.warn(f"{where}: {w}x{h} is not a multiple of {f} (the VAE's downsampling) on each side — the "
                          f"output is {W}x{H}, rounded down; pass --width/--height to choose its size", stacklevel=3)
        return self._check_size((W, H), "--width/--height")

    def _noise(self, latents, gens, shape) -> torch.Tensor:
        return starting_noise(latents, gens, shape, self.device)

    def _micro_conditioning(self, cond: dict, uncond: dict, size: Tuple[int, int], n: int, micro: "_Micro") -> None:
        """SDXL's size/crop conditioning, as diffusers' StableDiffusionXLPipeline: sizes (height, width) default
        to the output's, the crop to (0, 0); the negative branch reuses them unless both negative sizes are given."""
        m = micro
        if self.unet.config.addition_input_dim is None:
            if m.original_size or m.target_size or m.negative_original_size or m.negative_target_size or \
                    tuple(m.crops_coords_top_left) != (0, 0) or tuple(m.negative_crops_coords_top_left) != (0, 0):
                raise UserError("--original-size/--crop/--target-size: only SDXL (micro-conditioned) models take "
                                "them — leave them out for this model")
            return
        used = _micro_used(m, size)
        ids = neg = time_ids(*used[:3])  # (6,)
        if len(used) > 3:
            neg = time_ids(*used[3:])
        cond["time_ids"] = ids.to(self.device).expand(n, -1)  # (n, 6)
        uncond["time_ids"] = neg.to(self.device).expand(n, -1)

    def _encoded(self, prompt: str, pooled: bool, n: int) -> tuple:
        """The text encoder's output for `prompt`, computed once per prompt and kept (the 64 most recent;
        dropped when the pipeline moves or an adapter is applied), expanded to n rows without a copy."""
        key = (prompt, pooled)
        if key not in self._embeddings:
            if len(self._embeddings) >= 64:
                self._embeddings.pop(next(iter(self._embeddings)))
            enc = self.text_encoder.encode_pooled if pooled else self.text_encoder.encode
            with torch.no_grad():
                self._embeddings[key] = enc([prompt])  # (1, L, D), (1, L)[, (1, P)]
        return tuple(t.expand(n, *t.shape[1:]) for t in self._embeddings[key])

    def _conditions(self, prompt, negative_prompt, class_label, n):
        cfg = self.unet.config
        if self.text_encoder is not None and class_label is not None:  # it would select nothing, without a word
            raise UserError(f"--class {class_label}: this model is text-conditional (no class labels) — leave out "
                            "--class and say what to draw with --prompt")
        if getattr(self.text_encoder, "pooled_dim", None) is not None:  # SDXL's two encoders
            ctx, _, pooled = self._encoded(prompt or "", True, n)  # (n, L, D), (n, P)
            if negative_prompt is None:  # diffusers: zeros under force_zeros_for_empty_prompt
                nctx, _, npooled = self.text_encoder.null_pooled()  # (1, L, D), (1, P)
            else:
                nctx, _, npooled = self._encoded(negative_prompt, True, n)
            return {"context": ctx, "text_embeds": pooled}, {"context": nctx, "text_embeds": npooled}
        if self.text_encoder is not None:
            ctx, mask = self._encoded(prompt or "", False, n)  # (n, L, D), (n, L)
            nctx, nmask = self._encoded(negative_prompt or "", False, n)
            cond, uncond = {"context": ctx}, {"context": nctx}
            if self.use_context_mask:
                cond["context_mask"], uncond["context_mask"] = mask, nmask
            return cond, uncond
        if prompt or negative_prompt:
            raise UserError("--prompt: this model has no text encoder (unconditional or class-conditional) — "
                            "leave out --prompt/--negative" + (" and pass --class" if cfg.num_class_embeds else ""))
        if cfg.num_class_embeds:
            K = cfg.num_class_embeds
            if class_label is None or not 0 <= int(class_label) < K - 1:  # K - 1: the null class, no class at all
                raise UserError(f"--class: this model is class-conditional — pass a class label in 0..{K - 2} "
                                f"(label {K - 1} is the null class used for guidance)"
                                + (" — labels count from 0" if class_label == K - 1 else ""))
            labels = torch.full((n,), int(class_label), dtype=torch.long, device=self.device)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, K - 1)}
        if class_label is not None:
            raise UserError("--class: this model is not class-conditional — leave out --class")
        return {}, {}

    def _latent_mask(self, mask: Image.Image, hw) -> torch.Tensor:
        """White = repaint. Binarised at 50 %, then nearest-resized to the latent grid (as diffusers)."""
        m = torch.from_numpy((np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 >= 0.5).astype(np.float32))
        return F.interpolate(m[None, None], size=tuple(hw)).to(self.device)  # (1, 1, h, w)
