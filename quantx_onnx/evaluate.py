"""Perplexity of exported decoders (fp32, ORT 4-bit, QuantX alike) in ONNX Runtime.

Protocol: the text is tokenized without special tokens, the first ``max_tokens`` tokens are cut
into non-overlapping windows of ``window`` tokens, each window runs from an empty KV cache, and
perplexity = exp(mean negative log-likelihood over every predicted token (window - 1 per
window)).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .llm import DecoderSession
from .tokenizer import Tokenizer


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows of logits [T, V] (float64 for stability)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float((lse - z[np.arange(len(targets)), targets]).sum())


def token_windows(tokens: np.ndarray, max_tokens: int, window: int) -> np.ndarray:
    if window < 2:
        raise InputError("--window must be >= 2")
    n = min(len(tokens), max_tokens) // window
    if n == 0:
        raise InputError(f"the text has {len(tokens)} tokens, fewer than one window of {window}")
    return tokens[: n * window].reshape(n, window)


def perplexity(
    model: str | Path,
    text: str | None = None,
    tokens: np.ndarray | None = None,
    max_tokens: int = 16384,
    window: int = 1024,
    threads: int | None = None,
    session: DecoderSession | None = None,
    progress=None,
) -> dict:
    session = session or DecoderSession(model, threads=threads)
    if tokens is None:
        if text is None:
            raise InputError("perplexity needs a text or token ids")
        tokens = np.array(Tokenizer(session.folder).encode(text), np.int64)
    windows = token_windows(np.asarray(tokens, np.int64), max_tokens, window)
    nll, count = 0.0, 0
    start = time.perf_counter()
    rows = progress(list(windows)) if progress else windows
    for w in rows:
        logits = session.logits(w[None, :])[0]
        nll += log_softmax_nll(logits[:-1], w[1:])
        count += len(w) - 1
    return {
        "model": str(session.path),
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": int(windows.size),
        "predicted": count,
        "window": window,
        "seconds": time.perf_counter() - start,
    }
