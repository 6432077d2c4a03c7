"""Which precision the demo trains in: bf16 only where the CPU computes bf16 natively (train/precision.py's
cpu_native_bf16 reads /proc/cpuinfo's flags; demo.choose_precision decides)."""

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
    assert choose_precision("auto", cuda=False, native="amx_bf16") == ("bf16", "auto: this CPU computes bf16 "
                                                                               "natively (amx_bf16)")
    assert choose_precision("auto", cuda=False, native=None)[0] == "fp32"
    assert choose_precision("auto", cuda=True, native="amx_bf16")[0] == "fp32"
    assert choose_precision("fp32", cuda=False, native="amx_bf16") == ("fp32", "chosen with --precision fp32")
    assert choose_precision("bf16", cuda=False, native=None)[0] == "bf16"
    with pytest.raises(UserError, match="--precision: unknown 'fp8'"):
        choose_precision("fp8")


def test_demo_command_defaults_to_auto():
    import argparse

    from latentforge.commands import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    assert p.parse_args([]).precision == "auto"
    assert p.parse_args(["--precision", "fp32"]).precision == "fp32"
