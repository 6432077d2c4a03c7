"""The CLI's parsing and the helpers the sub-commands share (commands/common.py): key=value settings between the
flags without a patched argparse, the device choice as one line."""

import subprocess
import sys

import pytest
import torch

from latentforge.cli import build_parser, main
from latentforge.commands.common import choose_device
from latentforge.errors import UserError


@pytest.mark.parametrize("command, argv, expected", [
    ("train", ["model=tiny", "--print-config", "lr=3e-3", "--quiet", "max_steps=9"],
     ['model = "tiny"', "lr = 0.003", "max_steps = 9"]),
    ("train-vae", ["kl_weight=1e-5", "--print-config", "model=tiny", "--quiet", "max_steps=7"],
     ['model = "tiny"', "kl_weight = 1e-05", "max_steps = 7"]),
])
def test_settings_may_stand_between_flags(command, argv, expected, capsys):
    assert main([command, *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(e in lines for e in expected), lines


def test_sub_commands_parse_intermixed_without_patching():
    parser = build_parser("train")
    train = parser.commands["train"]
    assert "parse_known_args" not in vars(train)  # argparse's own method, not a replacement on the instance
    args = parser.parse_command(["train", "--out", "r", "lr=1e-3", "--resume", "max_steps=9", "--quiet"])
    assert (args.command, args.out, args.resume, args.quiet) == ("train", "r", True, True)
    assert args.overrides == ["lr=1e-3", "max_steps=9"]


def test_a_wrong_flag_is_still_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "lr=1", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: latentforge train: unrecognized arguments: --bogus"), err


@pytest.mark.parametrize("text, words", [
    ("gpu", "not a device — use cpu, cuda, cuda:N or auto"),
    ("meta", "only cpu and cuda are supported"),
    (f"cuda:{torch.cuda.device_count()}", "no such CUDA device here — use --device cpu"),
])
def test_device_choice_refuses_in_one_line(text, words):
    with pytest.raises(UserError) as e:
        choose_device(text)
    assert str(e.value) == f"--device {text}: {words}"


def test_device_choice_auto():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device(None).type == choose_device("auto").type == want
    assert choose_device("cpu") == torch.device("cpu")


def test_eval_refuses_an_unknown_sampler_before_loading(tmp_path, capsys):
    """The sampler name is checked first (the model folder here does not even exist)."""
    assert main(["eval", "--model", str(tmp_path / "none"), "--sampler", "plms"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sampler: unknown 'plms' — use one of ddpm, ") and err.count("\n") == 1, err


def test_the_parser_does_not_load_the_demo():
    """`latentforge --help` builds every command's flags; the demo's (--budget, --precision) come from plain data,
    so neither the help nor `demo --help` imports latentforge.demo (models, training loop, pipelines: ~0.7 s of CPU
    on every start), and neither loads torch. A fresh interpreter: this test process has them."""
    code = ("import sys; from latentforge.cli import build_parser; build_parser({only}); "
            "print(sorted(m for m in ('latentforge.demo', 'torch') if m in sys.modules))")
    loaded = {only: subprocess.run([sys.executable, "-c", code.format(only=only)], capture_output=True, text=True,
                                   check=True).stdout.strip() for only in ("None", "'demo'")}
    assert loaded == {"None": "[]", "'demo'": "[]"}, loaded  # every command's --help: tests/test_cli_startup.py
