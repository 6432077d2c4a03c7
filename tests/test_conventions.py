"""One owner per convention, checked on the source: the latent scaling factor only in models/vae.py, σ ⇄ ᾱ
(k-diffusion's σ = √((1-ᾱ)/ᾱ), ᾱ = 1/(1+σ²)) and arithmetic on σ only in samplers.py (the flow's σ: flow.py,
flow_sampling.py)."""

import ast
import io
import re
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latentforge"
FACTOR_NAMES = {"scaling_factor", "shift_factor"}
FACTOR_VALUES = {0.18215, 0.13025}  # SD 1.x/2.x and SDXL latent scales
SIGMA_NAME = re.compile(r"^(init_)?sigmas?(_[a-z]+)?$")  # σ, σ_next, init_sigma, sigmas ... (not sigma1: a covariance)
SIGMA_ALPHA = [  # the two conversions, in the ways Python spells them
    re.compile(r"\(\s*1\s*-\s*([\w.\[\]]+)\s*\)\s*/\s*\1(?![\w.\[])"),  # (1 - ᾱ) / ᾱ
    re.compile(r"1\s*/\s*\(\s*1\s*\+\s*[\w.\[\]-]+\s*\*\*\s*2"),  # 1 / (1 + σ**2)
    re.compile(r"\(\s*[\w.\[\]-]+\s*\*\*\s*2\s*\+\s*1\s*\)"),  # (σ**2 + 1)
]


def _modules(*skip):
    return [p for p in sorted(SRC.rglob("*.py")) if str(p.relative_to(SRC)) not in skip]


def _code_lines(path):
    """(line number, code) with strings and comments blanked: docstrings may state the formulas."""
    lines = path.read_text().splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT) and tok.start[0] == tok.end[0]:
            row = tok.start[0] - 1
            lines[row] = lines[row][:tok.start[1]] + " " * (tok.end[1] - tok.start[1]) + lines[row][tok.end[1]:]
        elif tok.type == tokenize.STRING:  # a multi-line string: blank every line it spans
            for row in range(tok.start[0] - 1, tok.end[0]):
                lines[row] = ""
    return enumerate(lines, 1)


def _names(node):
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id
        elif isinstance(n, ast.Attribute):
            yield n.attr


def _operands(node):
    """Names and attributes that are themselves operands: not those passed into a call (`f(sigma)` is the
    callee's arithmetic)."""
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Attribute):
        yield node.attr
        yield from _operands(node.value)
    elif isinstance(node, ast.Call):
        return
    for child in ast.iter_child_nodes(node):
        if not isinstance(node, ast.Attribute):
            yield from _operands(child)


def _arithmetic(tree):
    """(line, operand subtrees) of every +, -, *, /, ** and augmented assignment."""
    for n in ast.walk(tree):
        if isinstance(n, ast.BinOp):
            yield n.lineno, (n.left, n.right)
        elif isinstance(n, ast.AugAssign):
            yield n.lineno, (n.target, n.value)


def _uses_factor(operand) -> bool:
    if any(name in FACTOR_NAMES for name in _names(operand)):
        return True
    return any(isinstance(c, ast.Constant) and c.value in FACTOR_VALUES for c in ast.walk(operand))


def test_scaling_factor_lives_only_in_the_vae():
    """The latent convention has one owner: no other module names the factor, except the config (a field) and
    formats/ (which translate it to and from files)."""
    allowed = {SRC / "models" / "vae.py", SRC / "config.py"}
    offenders = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py")) if p not in allowed
                 and p.parent.name != "formats"
                 and any(s in p.read_text() for s in ("scaling_factor", "shift_factor", "0.18215", "0.13025"))]
    assert offenders == []


def test_only_the_vae_scales_latents():
    """Config and format code may carry the number (a field, a JSON key); only models/vae.py computes with it."""
    offenders = [f"{p.relative_to(SRC)}:{line}" for p in _modules("models/vae.py")
                 for line, operands in _arithmetic(ast.parse(p.read_text())) if any(map(_uses_factor, operands))]
    assert offenders == []


def test_only_samplers_convert_between_sigma_and_alpha_cumprod():
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in _modules("samplers.py")
                 for i, line in _code_lines(p) if any(r.search(line) for r in SIGMA_ALPHA)]
    assert offenders == []


def test_only_samplers_compute_with_sigma():
    """The pipelines start, re-noise and finish through SamplingPlan's methods. (schedule.py's `sigma` is the
    VP noise scale √(1-ᾱ), and flow.py / flow_sampling.py's the rectified flow's time σ ∈ [0, 1]: different
    quantities, each with its own owner.)"""
    offenders = [f"{p.relative_to(SRC)}:{line}" for p in _modules("samplers.py", "schedule.py", "flow.py",
                                                                    "flow_sampling.py")
                 for line, operands in _arithmetic(ast.parse(p.read_text()))
                 if any(SIGMA_NAME.match(name) for op in operands for name in _operands(op))]
    assert offenders == []


def test_the_checks_can_fail():
    """Each rule flags the code it is written against."""
    bad = ast.parse("latents = z * vae.config.scaling_factor\nx = noise * plan.init_sigma\n")
    flagged = [any(map(_uses_factor, ops)) for _, ops in _arithmetic(bad)]
    assert flagged == [True, False]
    assert any(SIGMA_NAME.match(n) for _, ops in _arithmetic(bad) for op in ops for n in _operands(op))
    call = ast.parse("x = keep * plan.noised(x0, noise, sigma_next)")
    assert not any(SIGMA_NAME.match(n) for _, ops in _arithmetic(call) for op in ops for n in _operands(op))
    assert all(any(r.search(s) for r in SIGMA_ALPHA) for s in ("((1 - ac) / ac) ** 0.5", "1 / (1 + sigma**2)",
                                                               "x / (plan.sigmas[-1] ** 2 + 1).sqrt()"))
    assert not any(r.search("p * (1 - p) / n") for r in SIGMA_ALPHA)  # a binomial variance is not σ
