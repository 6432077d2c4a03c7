"""Which package may import which, checked on the source (ast): formats/ builds the networks, so it depends on
models/, not the other way. models/ reaches formats/ only late, in the one helper behind
`from_pretrained` / `save_pretrained` (models/pretrained.py), never when a module loads."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "latentforge"


def imports(source: str, module: str):
    """(line, imported module, at load time) for each import in `source`, the text of module `module`
    (dotted, e.g. "latentforge.models.unet"); relative imports resolved. At load time = not inside a function."""
    package = module.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            late = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, not in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                found.extend((child.lineno, f"{base}.{a.name}", not in_function) for a in child.names)
                found.append((child.lineno, base, not in_function))
            visit(child, late)

    visit(ast.parse(source), False)
    return found


def _formats_imports(path: Path):
    module = "latentforge." + ".".join(path.relative_to(SRC).with_suffix("").parts)
    return [(line, name, eager) for line, name, eager in imports(path.read_text(), module)
            if name == "latentforge.formats" or name.startswith("latentforge.formats.")]


def test_the_checker_sees_relative_and_late_imports():
    src = "from ..formats import diffusers\nimport latentforge.formats.lora\ndef f():\n    from ..formats.diffusers import x\n"
    got = {(line, eager) for line, name, eager in imports(src, "latentforge.models.unet") if "formats" in name}
    assert got == {(1, True), (2, True), (4, False)}
    assert not [n for _, n, _ in imports("from .layers import run\n", "latentforge.models.unet") if "formats" in n]


def test_models_never_import_formats_when_they_load():
    offenders = [f"models/{p.name}:{line} imports {name}" for p in sorted((SRC / "models").glob("*.py"))
                 for line, name, eager in _formats_imports(p) if eager]
    assert not offenders, "formats/ imports models/ (it builds them); import formats/ late, in models/pretrained.py: " \
                          + "; ".join(offenders)


def test_the_only_late_import_of_formats_in_models_is_the_pretrained_helper():
    places = sorted({p.name for p in (SRC / "models").glob("*.py") if _formats_imports(p)})
    assert places == ["pretrained.py"]
