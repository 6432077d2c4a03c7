"""`latentforge merge --model BASE --lora FILE[:SCALE] [--lora …] --out FOLDER`: a plain model with the
adapters folded into its weights (W + scale·ΔW), loadable anywhere a diffusers folder is."""

from __future__ import annotations

from .common import parse_lora


def add_arguments(p):
    p.add_argument("--model", required=True, help="the base model folder (diffusers layout)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="adapter file (diffusers or kohya format) and its strength (default 1); repeatable")
    p.add_argument("--out", required=True, help="new folder for the merged model (must not exist yet)")


def run(args):
    from ..formats.lora import merge_model_folder

    out = merge_model_folder(args.model, [parse_lora(spec) for spec in args.lora], args.out)
    print(out)
    return 0
