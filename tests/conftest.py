"""Shared fixtures: models built on the fly (nothing binary is checked in)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from .helpers import export_tiny_llama, write_tiny_tokenizer


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A randomly initialised 2-layer Llama with tied embeddings, exported by optimum with
    --task text-generation-with-past (folder with model.onnx, config and tokenizer-free)."""
    return export_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny_llama, tmp_path_factory):
    """A copy of the tiny Llama export with a byte-level BPE tokenizer.json: a decoder export
    as users have them, so ``optimize`` calibrates it on self-generated text by default."""
    folder = tmp_path_factory.mktemp("tiny_tok") / "onnx"
    shutil.copytree(tiny_llama, folder)
    write_tiny_tokenizer(folder)
    return folder
