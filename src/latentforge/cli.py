"""The `latentforge` command: parse -> call one function. Thin by design.

Each sub-command lives in `latentforge/commands/<name>.py` and defines
`add_arguments(parser)` and `run(args) -> int | None`. Import is lazy so `--help` is instant.
A `UserError` (or a user-fixable OSError) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# name -> (module under latentforge.commands, one-line help)
COMMANDS = {
    "shapes": ("shapes", "write the built-in captioned shapes data set"),
    "cache": ("cache", "encode a data folder once into a latent cache"),
    "train-vae": ("train_vae", "train a KL autoencoder (VAE) on a data folder"),
    "train": ("train", "train the UNet on a data folder or latent cache"),
    "sample": ("sample", "text -> image"),
    "img2img": ("img2img", "image + text -> image"),
    "inpaint": ("inpaint", "image + mask + text -> image"),
    "eval": ("eval", "prompt-adherence benchmark, FID/KID"),
    "demo": ("demo", "the one-command demo: data, VAE, cache, UNet, samples, evaluation"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`error: latentforge train: ...`) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="latentforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            _module(module).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"latentforge.commands.{name}")




def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen sub-command's module is imported (keeps `--help` and errors fast).
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
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
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
