#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it measures): prints a markdown section for docs/BENCHMARKS.md.
#
#   bench/gpu_check.sh [--out FILE]     one H100/H200, about 6-8 minutes
#   bench/gpu_check.sh --dry-run        CPU, tiny sizes, under a minute (tests/test_gpu_check.py runs it)
#
# Python: $PYTHON, else .venv/bin/python (make's environment), else python3. latentforge is imported from src/.
#
# On a GPU machine without diffusers and without a package index (one whose image has torch, transformers,
# safetensors, tensorboard, matplotlib, scipy and tqdm, but not diffusers), bring diffusers as wheels:
# where pip can reach PyPI, in the repository root (.whl/ is in .gitignore; both are pure-Python wheels),
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
# and copy .whl/ to that machine with the tree, then run `bench/gpu_check.sh --out gpu_check.md` there (at most
# 10 minutes). This script installs .whl/*.whl into /tmp/latentforge-site (no index, no dependencies) when
# diffusers is not importable, then runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/latentforge-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/latentforge-site"
  else
    echo "error: diffusers is not installed and no .whl/ folder is here — see the top of bench/gpu_check.sh" >&2
    exit 2
  fi
fi
exec "$PY" bench/gpu_check.py "$@"
