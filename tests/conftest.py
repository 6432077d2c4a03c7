"""Shared test setup: CPU only, one thread per worker (pytest -n 2 on a 2-core box), offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Child processes (CLI smoke tests, kill -9 / torchrun tests) too: 2 pytest workers on 2 cores, and the
# same thread count in every process keeps CPU reductions bitwise repeatable across kill/resume.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
