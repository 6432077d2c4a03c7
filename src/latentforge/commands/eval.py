"""`latentforge eval`: the shapes prompt-adherence benchmark and/or FID/KID against a reference folder.

    latentforge eval --model runs/x/model --benchmark shapes --n 4 --out runs/x/eval
    latentforge eval --model runs/x/model --fid --reference data/ --inception-weights pt_inception.pth
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..config import SAMPLER_NAMES


def add_arguments(p):
    p.add_argument("--model", required=True, help="model folder (diffusers layout)")
    p.add_argument("--benchmark", choices=["shapes"], default=None,
                   help="prompt-adherence benchmark (default: shapes, unless only --fid is asked for)")
    p.add_argument("--sampler", default=None, help=f"{' | '.join(SAMPLER_NAMES)} (default: the pipeline's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--n", type=int, default=4, help="images per prompt (shapes benchmark)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="folder for eval.json, eval.md (default: MODEL/../eval)")
    p.add_argument("--fid", action="store_true", help="also compute FID and KID against --reference")
    p.add_argument("--reference", default=None, help="folder of reference images (captions from .txt)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (or $LATENTFORGE_INCEPTION_WEIGHTS)")


def run(args):
    from .. import evaluate, io
    from ..metrics.adherence import markdown_table
    from ..samplers import get_sampler

    if args.n < 1:
        raise UserError(f"--n: {args.n} — give at least 1 image per prompt")
    if args.sampler is not None:
        get_sampler(args.sampler)  # a typo is one line now, not after the model has loaded
    if args.fid and not args.reference:
        raise UserError("--reference: required with --fid — give a folder of reference images")
    benchmark = args.benchmark or (None if args.fid else "shapes")
    if not Path(args.model).is_dir():
        raise UserError(f"--model: {args.model} is not a folder — give a model folder written by 'latentforge train'")
    out = io.check_out_dir(Path(args.out) if args.out else Path(args.model).resolve().parent / "eval")
    extractor = None
    if args.fid:  # check the weights and the folder before spending time on generation
        from ..metrics.inception import load_inception

        evaluate.reference_items(args.reference)
        extractor = load_inception(args.inception_weights)
    pipe = _load_pipeline(args.model)
    if benchmark == "shapes" and pipe.text_encoder is None:  # its 96 prompts need a text-conditional model
        raise UserError(f"--model {args.model}: has no text encoder (class-conditional or unconditional) — the shapes "
                        "benchmark prompts with captions; evaluate a model trained on captioned data, or use --fid")
    generate = evaluate.pipeline_generator(pipe, args.sampler, args.steps, args.cfg)
    settings = {"model": str(args.model), "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg}
    result = {}
    if benchmark == "shapes":
        result = evaluate.evaluate_shapes(generate, out, n=args.n, seed=args.seed,
                                          batch_size=args.batch_size, settings=settings)
        print(markdown_table(result["scores"]))
    if args.fid:
        scores = evaluate.evaluate_fid(generate, args.reference, extractor, n=None, seed=args.seed,
                                       batch_size=args.batch_size)
        out.mkdir(parents=True, exist_ok=True)
        io.write_text(out / "fid.json", json.dumps({**scores, "settings": settings}, indent=1) + "\n")
        print(f"FID {scores['fid']:.3f}  KID {scores['kid']:.5f} ± {scores['kid_std']:.5f} "
              f"({scores['n_generated']} generated vs {scores['n_reference']} reference images)")
    print(f"wrote {out}")
    return 0


def _load_pipeline(model: str):
    from ..pipelines import Pipeline

    return Pipeline.from_pretrained(model)
