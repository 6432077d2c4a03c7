"""`latentforge export`: a model folder -> one single-file checkpoint, or a single file -> a model folder.

    latentforge export --model runs/x/model --single-file x.safetensors [--dtype bf16]
    latentforge export --model x.safetensors --diffusers out/x --tokenizer CLIP_TOKENIZER_DIR

The single file is the original SD layout A1111 and ComfyUI read (formats/single_file.py); the folder
is the diffusers layout StableDiffusionPipeline and latentforge load (formats/diffusers.py).
"""

from __future__ import annotations

from pathlib import Path

from ..config import PRECISIONS, PREDICTION_TYPES


def add_arguments(p):
    p.add_argument("--model", required=True, help="a model folder (diffusers layout) or a single .safetensors/.ckpt")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--single-file", help="write OUT.safetensors in the original SD layout (from a folder)")
    out.add_argument("--diffusers", help="write a diffusers model folder OUT_DIR (from a single file)")
    p.add_argument("--dtype", default="fp16", help=f"{' | '.join(PRECISIONS)}: the single file's float type "
                                                   "(default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="CLIP tokenizer folder for --diffusers (a single file holds none), e.g. an SD model's tokenizer/")
    p.add_argument("--prediction-type", default=None,
                   help=f"{' | '.join(PREDICTION_TYPES)}: override the rule for a single file (SD 2.x-base 512 px: "
                        "epsilon)")


def _refuse_existing(path: Path, flag: str) -> None:
    from ..errors import UserError

    if path.exists() and (path.is_file() or any(path.iterdir())):
        raise UserError(f"{flag} {path}: already exists — choose a new path (nothing is overwritten)")


def to_single_file(model: Path, out: Path, dtype: str) -> Path:
    import torch

    from ..errors import UserError
    from ..formats.diffusers import load_model_folder
    from ..formats.single_file import save_single_file
    from ..text import TextEncoder

    if dtype not in PRECISIONS:
        raise UserError(f"--dtype {dtype}: unknown — use one of {', '.join(PRECISIONS)}")
    if out.suffix != ".safetensors":
        raise UserError(f"--single-file {out}: must end in .safetensors")
    if model.is_file():
        raise UserError(f"--model {model}: --single-file needs a model folder (this is already one file)")
    _refuse_existing(out, "--single-file")
    parts = load_model_folder(model)
    if parts["text_encoder_dir"] is None:
        raise UserError(f"--model {model}: no text_encoder/ — a single file holds UNet, VAE and text encoder")
    text = TextEncoder.from_pretrained(str(model))
    return save_single_file(out, parts["unet"], parts["vae"], text, parts["schedule_config"],
                            getattr(torch, PRECISIONS[dtype]))


def to_diffusers(model: Path, out: Path, tokenizer, prediction_type) -> Path:
    from ..errors import UserError
    from ..formats.diffusers import save_model_folder
    from ..formats.single_file import load_single_file
    from ..io import atomic_folder

    if not model.is_file():
        raise UserError(f"--model {model}: --diffusers needs a single .safetensors/.ckpt file")
    _refuse_existing(out, "--diffusers")
    sf = load_single_file(model, tokenizer=tokenizer, prediction_type=prediction_type)
    text = sf.text_encoder()  # fails early, in one line, without a tokenizer
    with atomic_folder(out) as tmp:  # interrupted (a kill, a full disk): nothing under the name OUT_DIR
        save_model_folder(tmp, sf.unet, sf.vae, sf.schedule_config, text_encoder=text,
                          scheduler_config=sf.scheduler_config)  # sampled as the file is
    return out


def run(args):
    from ..text import quiet_transformers

    quiet_transformers()
    model = Path(args.model)
    if args.single_file:
        path = to_single_file(model, Path(args.single_file), args.dtype)
    else:
        path = to_diffusers(model, Path(args.diffusers), args.tokenizer, args.prediction_type)
    print(path)
    return 0
