"""Out of memory in the middle of a command: one line saying what to lower, instead of a traceback.

torch raises `torch.OutOfMemoryError` (CUDA; a RuntimeError), a plain RuntimeError from its CPU allocator
("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") or from MPS ("MPS backend out of
memory"); numpy and Python raise MemoryError. Every file a command writes is atomic (io.py) and a checkpoint is
renamed into place only when complete, so the outputs already on disk are intact; the line says which checkpoint
a `train --resume` continues from. Imported only when such an error happens (cli.py), so torch is not needed here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_out_of_memory", "message"]

_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")

# command -> what to lower (a flag or setting the command has)
_LOWER = {
    "sample": "lower --n (all images are made in one batch) or --width/--height",
    "img2img": "lower --n (all images are made in one batch) or --width/--height",
    "inpaint": "lower --n (all images are made in one batch) or --width/--height",
    "cache": "lower --batch-size (images per VAE batch) or --size",
    "eval": "lower --batch-size",
    "demo": "use a smaller --budget, or close other programs",
    "export": "close other programs (the whole model is held in memory once)",
    "merge": "close other programs (the whole model is held in memory once)",
}


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure (of any device)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _MARKERS)


def message(command: str, args, e: BaseException) -> str:
    """The one `error:` line (without the prefix) for command `command` run with `args`."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if command in ("train", "train-vae"):
        what = _train_advice(command, args)
    else:
        what = _LOWER.get(command, "close other programs, or use a smaller model or size")
    return f"out of memory ({first}) — {what}"


def _train_advice(command: str, args) -> str:
    from .train import checkpoint  # (imports torch: only now, the command has loaded it anyway)

    out = getattr(args, "out", None)
    steps = checkpoint.complete_steps(Path(out) / "checkpoints") if out else []
    where = (f"it continues from checkpoint step-{steps[-1]}, which is intact" if steps else
             "no checkpoint was written yet, it starts over")
    if command == "train-vae":
        return (f"lower batch_size or image_size with a new --out (they change the math), or free memory and run the "
                f"same command with --resume ({where})")
    return (f"run the same command with --resume gradient_checkpointing=true (less memory, the same math; {where}), "
            "or lower batch_size and raise grad_accum to keep the batch, with a new --out (that changes the math)")
