"""latentforge: train latent-diffusion (Stable Diffusion) models on your own images and generate with them.

Each sub-command lives in `latentforge/commands/<name>.py` and defines `add_arguments(parser)` and
`run(args) -> int | None`; this module only parses and calls it. Import is lazy so `--help` is instant.
A `UserError` (or a user-fixable OSError) becomes one line on stderr and exit status 2; a UserWarning
(e.g. a scheduler key latentforge does not honour) becomes one `warning: …` line; running out of memory
becomes one line saying what to lower (oom.py).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from contextlib import contextmanager

from . import threads
from .errors import UserError

# name -> (module under latentforge.commands, one-line help, one example)
COMMANDS = {
    "shapes": ("shapes", "write the built-in captioned shapes data set",
               "latentforge shapes --out data/shapes --n 2000"),
    "cache": ("cache", "encode a data folder once into a latent cache",
              "latentforge cache --data my_images/ --vae runs/vae --out cache/mine --size 64"),
    "train-vae": ("train_vae", "train a KL autoencoder (VAE) on a data folder",
                  "latentforge train-vae --data my_images/ --out runs/vae model=small image_size=64"),
    "train": ("train", "train the UNet on a data folder or latent cache",
              "latentforge train --cache cache/mine --vae runs/vae --out runs/mine model=small max_steps=5000"),
    "sample": ("sample", "text -> image",
               'latentforge sample --model runs/mine/model --prompt "a red circle" --steps 25 --out out/'),
    "img2img": ("img2img", "image + text -> image",
                'latentforge img2img --model runs/mine/model --image in.png --prompt "a blue square" --out out/'),
    "inpaint": ("inpaint", "image + mask + text -> image",
                'latentforge inpaint --model runs/mine/model --image in.png --mask mask.png --prompt "a green '
                'triangle" --out out/'),
    "export": ("export", "model folder <-> single-file checkpoint (A1111/ComfyUI layout)",
               "latentforge export --model runs/mine/model --single-file mine.safetensors --dtype fp16"),
    "merge": ("merge", "fold LoRA files into a base model and write a plain model folder",
              "latentforge merge --model runs/mine/model --lora style.safetensors:0.8 --out runs/mine-style"),
    "eval": ("eval", "prompt-adherence benchmark, FID/KID",
             "latentforge eval --model runs/demo/unet/model --benchmark shapes --n 8"),
    "demo": ("demo", "the one-command demo: data, VAE, cache, UNet, samples, evaluation",
             "latentforge demo --out runs/demo"),
}

_EPILOG = """start here:
  latentforge demo --out runs/demo                       # the whole flow on built-in data (CPU, minutes)
  latentforge COMMAND --help                             # each command's flags, with an example
your own images: cache -> train -> sample (README: "Your own images, step by step")"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`error: latentforge train: ...`) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


class CommandParser(OneLineParser):
    """The top-level parser; `commands` maps each sub-command's name to its own parser."""

    commands: dict

    def parse_command(self, argv: list[str]) -> argparse.Namespace:
        """`latentforge COMMAND ...` is parsed by COMMAND's parser with argparse's `parse_intermixed_args`, so
        key=value settings may stand anywhere between the flags (`train --out R lr=1e-3 --resume max_steps=9`);
        argparse's own sub-command dispatch would take positionals only once. Anything else (--help, no command,
        a typo) goes through the top-level parser."""
        if not argv or argv[0] not in self.commands:
            return self.parse_args(argv)
        args = self.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args


def build_parser(only: str | None = None) -> CommandParser:
    parser = CommandParser(prog="latentforge", description=__doc__.splitlines()[0], epilog=_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, help_text, *example) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog="example:\n  " + "".join(example),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is None or only == name:
            _module(module).add_arguments(p)
    parser.commands = sub.choices
    return parser


def _module(name: str):
    return importlib.import_module(f"latentforge.commands.{name}")


@contextmanager
def _one_line_warnings():
    """UserWarnings print as one `warning: <message>` line (not Python's `path:line: UserWarning:` + source
    line); other categories keep Python's format. Library callers keep the warnings API (filters, pytest.warns)."""
    python_format = warnings.formatwarning

    def line(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = line
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def main(argv: list[str] | None = None) -> int:
    with _one_line_warnings():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    threads.prepare_environment()  # before any sub-command imports torch (OpenMP reads it once, at load)
    # Only the chosen sub-command's module is imported (keeps `--help` and errors fast).
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_command(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command not in ("demo",):  # the demo has its own --threads
            threads.configure()
        code = _module(COMMANDS[args.command][0]).run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # An OSError that names a path is the user's to fix: one line, no traceback.
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:
        from .oom import is_out_of_memory, message

        if not is_out_of_memory(e):
            raise
        print(f"error: {message(args.command, args, e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # A full (or read-only) disk while writing outputs: every write is atomic (latentforge.io), so nothing
        # half-written is left under a final name.
        print(f"error: {e.filename or 'writing the output'}: {e.strerror} — free some space (or pick a writable "
              "--out) and run the command again", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
