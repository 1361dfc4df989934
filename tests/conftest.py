"""Shared fixtures: models built on the fly (nothing binary is checked in)."""

from __future__ import annotations

import numpy as np
import pytest

from .helpers import export_tiny_llama


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A randomly initialised 2-layer Llama with tied embeddings, exported by optimum with
    --task text-generation-with-past (folder with model.onnx, config and tokenizer-free)."""
    return export_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
