"""Self-generated calibration text: the float decoder samples its own token windows, so a
decoder export calibrates with no data from the user (``--calib-text self``, the default for
decoder folders with a tokenizer).

Each window is cut from a document the model writes: its document separator (``<|endoftext|>``,
``<s>``, ... when the tokenizer has one), then a word drawn uniformly from the vocabulary's
whole words (a space and three or more letters), so that windows begin on different topics,
then tokens sampled at temperature 1 from the model's whole distribution (``top_p`` 1.0),
all windows of a batch at once with the KV cache in ONNX Runtime. With ``skip`` the window
is cut from further into the document: the first ``skip`` tokens (separator, word and the
first generated ones) are generated and dropped. Special tokens are never sampled: windows
are running text, as the evaluation protocol's are. Seeded: the same seed gives the same
windows.

Why the word and the separator: from a token drawn from the whole vocabulary (code
fragments, byte pieces, markup) an instruction-tuned model such as SmolLM2 writes mostly code
and markdown; starting from a word after the separator measured 26.16 instead of 26.86
perplexity on held-out Wikipedia (Lee news unchanged, 44.7; docs/ACCURACY.md). Why top-p 1.0:
the whole distribution gives text as hard for the model as real text (perplexity 23.7 on its
own windows, against 10.4 at top-p 0.95), which is what calibration should see (temperature
0.8 and 1.2 both measured worse, docs/ACCURACY.md). Why ``skip``: windows of real text, the
evaluation's and given calibration text's, start anywhere in a document, on a token that is
not a separator; a window that opens on the separator and a drawn word puts that first
position (the attention sink) and the model's guesses at a topic into every Hessian and
into the end-to-end KL. Dropping the first 16 tokens (SELF_SKIP in config.py) lowered
SmolLM2's perplexity on both held-out texts with both seeds tried (-0.9% to -1.6%).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import InputError

SELF = "self"  # the --calib-text spec
TOP_CANDIDATES = 1024  # the nucleus is cut from the most likely tokens of each row


def sample_rows(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float, banned
) -> np.ndarray:
    """One token per row of ``logits`` [rows, V]: temperature, then the smallest set of most
    likely tokens (among the TOP_CANDIDATES best) whose probability reaches ``top_p``; at
    ``top_p`` 1.0 the whole distribution, every token possible."""
    z = logits.astype(np.float64) / temperature
    if len(banned):
        z[:, banned] = -np.inf
    if top_p >= 1.0:  # the whole distribution: no nucleus to cut (and no sort to pay for)
        return _draw_columns(np.exp(z - z.max(axis=1, keepdims=True)), rng)
    k = min(TOP_CANDIDATES, z.shape[1])
    top = np.argpartition(-z, k - 1, axis=1)[:, :k]
    zt = np.take_along_axis(z, top, axis=1)
    order = np.argsort(-zt, axis=1)
    top = np.take_along_axis(top, order, axis=1)
    zt = np.take_along_axis(zt, order, axis=1)
    p = np.exp(zt - zt[:, :1])
    p /= p.sum(axis=1, keepdims=True)
    keep = np.cumsum(p, axis=1) - p < top_p  # always keeps the most likely token
    choice = _draw_columns(np.where(keep, p, 0.0), rng)
    return top[np.arange(len(top)), choice]


def _draw_columns(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One column per row of ``weights`` [rows, n] (>= 0, not normalised), drawn with
    probability proportional to its weight by inverting the row's cumulative sum."""
    cdf = np.cumsum(weights, axis=1)
    u = rng.random((len(cdf), 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=1), weights.shape[1] - 1)


DOCUMENT_SEPARATORS = ("<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>")
_WORD = re.compile(r"^ [A-Za-z]{3,}$")


def special_token_ids(folder: Path) -> np.ndarray:
    from ..tokenizer import Tokenizer

    return np.array(sorted(Tokenizer(folder).special_ids()), np.int64)


def window_starts(folder: Path, vocab: int) -> tuple[int | None, np.ndarray]:
    """The tokenizer's document separator (None if it has none of DOCUMENT_SEPARATORS) and
    the ids of its whole-word tokens (every ordinary token if it has fewer than 16)."""
    from ..tokenizer import Tokenizer

    tok = Tokenizer(folder)
    separator = next(
        (i for t in DOCUMENT_SEPARATORS if (i := tok.token_id(t)) is not None and i < vocab),
        None,
    )
    special = tok.special_ids()
    ids = np.array([i for i in range(vocab) if i not in special], np.int64)
    words = np.array([i for i in ids.tolist() if _WORD.match(tok.decode([i]))], np.int64)
    return separator, words if len(words) >= 16 else ids


def generate_windows(
    model: str | Path,
    samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    batch: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    skip: int = 0,
    threads: int | None = None,
    progress=None,
) -> np.ndarray:
    """``samples`` windows of ``seq_len`` tokens sampled from the float decoder ``model`` (an
    export folder or its model.onnx), as int64 [samples, seq_len]: tokens ``skip`` to
    ``skip + seq_len`` of each generated document."""
    from ..llm import DecoderSession

    if samples < 1 or seq_len < 2 or skip < 0:
        raise InputError(
            "self-generated calibration needs samples >= 1, seq_len >= 2 and skip >= 0"
        )
    session = DecoderSession(model, threads=threads)
    if session.cache.layers == 0:
        raise InputError(
            f"{session.path}: self-generated calibration needs a decoder with a KV cache "
            "(optimum's text-generation-with-past export)"
        )
    banned = special_token_ids(session.folder)
    separator, first_words = window_starts(session.folder, session.vocab)
    lead = [] if separator is None else [separator]  # tokens before the drawn word
    length = skip + seq_len  # each document, the window its last seq_len tokens
    if length < len(lead) + 2:
        lead = []
    rng = np.random.default_rng(seed)
    out = np.zeros((samples, length), np.int64)
    # one work item per generated position of each batch of windows (for a progress bar)
    first = len(lead) + 1  # the first sampled position
    work = [
        (b0, min(b0 + batch, samples), t)
        for b0 in range(0, samples, batch)
        for t in range(first, length)
    ]
    cache = logits = None
    for b0, b1, t in progress(work) if progress else work:
        if t == first:  # a new batch: separator and random first words, prefilled
            out[b0:b1, : len(lead)] = lead
            out[b0:b1, len(lead)] = rng.choice(first_words, size=b1 - b0)
            logits, cache = session.step(out[b0:b1, :first], session.empty_cache(b1 - b0), 0)
        out[b0:b1, t] = sample_rows(logits[:, -1], rng, temperature, top_p, banned)
        if t + 1 < length:
            logits, cache = session.step(out[b0:b1, t : t + 1], cache, t)
    return np.ascontiguousarray(out[:, skip:])
