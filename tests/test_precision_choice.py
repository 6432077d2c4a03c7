"""Which precision the demo trains in: fp32 unless bf16 is asked for by name (demo.choose_precision decides;
train/precision.py's cpu_native_bf16 reads /proc/cpuinfo's flags for the reason it gives)."""

import pytest

from latentforge.demo import choose_precision
from latentforge.errors import UserError
from latentforge.train.precision import cpu_native_bf16

# Trimmed /proc/cpuinfo of two processors: the flags line is what counts.
SAPPHIRE = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7763\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\nbugs\t\t: avx512_bf16\n"


def test_native_bf16_from_the_flags_line_only():
    assert cpu_native_bf16(SAPPHIRE) == "avx512_bf16"
    assert cpu_native_bf16(SAPPHIRE.replace("avx512_bf16 ", "")) == "amx_bf16"
    assert cpu_native_bf16(ZEN3) is None  # the name on another line does not count
    assert cpu_native_bf16(ZEN3.replace("avx512bw", "avx512_bf16x")) is None  # whole flags, not substrings
    assert cpu_native_bf16("") is None


def test_choose_precision():
    """auto is fp32 on every machine (bf16's demo accuracy differed between processors); bf16 only by name, with a
    word where the CPU would emulate it."""
    for native in ("amx_bf16", "avx512_bf16", None):
        for cuda in (False, True):
            assert choose_precision("auto", cuda=cuda, native=native)[0] == "fp32"
    assert "--precision bf16 trains the UNet faster" in choose_precision("auto", cuda=False, native="amx_bf16")[1]
    assert "faster" not in choose_precision("auto", cuda=False, native=None)[1]
    assert choose_precision("fp32", cuda=False, native="amx_bf16") == ("fp32", "chosen with --precision fp32")
    assert choose_precision("bf16", cuda=False, native="amx_bf16") == ("bf16", "chosen with --precision bf16")
    assert "expect it slower" in choose_precision("bf16", cuda=False, native=None)[1]
    with pytest.raises(UserError, match="--precision: unknown 'fp8'"):
        choose_precision("fp8")


def test_demo_command_defaults_to_auto():
    import argparse

    from latentforge.commands import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    assert p.parse_args([]).precision == "auto"
    assert p.parse_args(["--precision", "fp32"]).precision == "fp32"
    assert p.parse_args([]).seed == 0 and p.parse_args(["--seed", "2"]).seed == 2
