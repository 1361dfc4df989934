"""Self-generated calibration: the float decoder samples its own windows."""

from __future__ import annotations

import re

import numpy as np
import pytest

from quantx_onnx.calibration.selfgen import generate_windows, sample_rows, window_starts
from quantx_onnx.errors import InputError
from quantx_onnx.tokenizer import Tokenizer


def test_nucleus_sampling_keeps_the_top_p_mass_and_its_proportions():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.tile(np.log(p), (20000, 1))
    got = sample_rows(logits, rng, 1.0, 0.7, np.array([], np.int64))
    counts = np.bincount(got, minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 reaches 0.7: the tail is cut
    assert counts[0] / counts[1] == pytest.approx(5 / 3, rel=0.05)
    banned = sample_rows(logits, rng, 1.0, 1.0, np.array([0]))
    assert 0 not in banned and set(np.unique(banned)) == {1, 2, 3}


def test_whole_distribution_sampling_keeps_the_proportions():
    """top_p 1.0 (the default) samples by inverting the cumulative sum, not the nucleus
    path: every token's share is its probability, banned tokens never come."""
    rng = np.random.default_rng(1)
    p = np.array([0.4, 0.3, 0.2, 0.07, 0.03])
    logits = np.tile(np.log(p), (40000, 1)) + 3.0  # any offset: logits, not log-probs
    counts = np.bincount(sample_rows(logits, rng, 1.0, 1.0, np.array([], np.int64)), minlength=5)
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.01)
    hot = sample_rows(logits, rng, 2.0, 1.0, np.array([1]))  # temperature 2: p ** 0.5, no 1
    expected = np.sqrt(p) * [1, 0, 1, 1, 1]
    counts = np.bincount(hot, minlength=5)
    np.testing.assert_allclose(counts / counts.sum(), expected / expected.sum(), atol=0.01)


def test_windows_are_seeded_documents_of_running_text(tiny_with_tokenizer):
    a = generate_windows(tiny_with_tokenizer, 5, 12, seed=3, batch=2, threads=1)
    b = generate_windows(tiny_with_tokenizer, 5, 12, seed=3, batch=2, threads=1)
    c = generate_windows(tiny_with_tokenizer, 5, 12, seed=4, batch=2, threads=1)
    assert a.shape == (5, 12) and a.dtype == np.int64
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    tok = Tokenizer(tiny_with_tokenizer)
    # each window opens a document: the separator, then a whole word, then running text
    assert (a[:, 0] == tok.token_id("<|endoftext|>")).all()
    special = tok.special_ids()
    assert special and not set(a[:, 1:].reshape(-1).tolist()) & special
    assert len(set(a[:, 1].tolist())) > 1  # windows start on different words
    assert all(re.fullmatch(r" [A-Za-z]{3,}", tok.decode([i])) for i in a[:, 1])
    assert a.max() < 320


def test_skip_cuts_each_window_from_further_into_its_document(tiny_with_tokenizer):
    """``skip`` generates the same documents and drops their first tokens: the windows are
    the tails of the windows generated without it, and none opens on the separator."""
    whole = generate_windows(tiny_with_tokenizer, 5, 12, seed=3, batch=2, threads=1)
    cut = generate_windows(tiny_with_tokenizer, 5, 9, seed=3, batch=2, skip=3, threads=1)
    assert cut.shape == (5, 9) and cut.flags.c_contiguous
    assert np.array_equal(cut, whole[:, 3:])
    separator = Tokenizer(tiny_with_tokenizer).token_id("<|endoftext|>")
    assert not (cut == separator).any()
    with pytest.raises(InputError, match="skip >= 0"):
        generate_windows(tiny_with_tokenizer, 1, 4, skip=-1, threads=1)


def test_window_starts_fall_back_to_the_whole_vocabulary(tmp_path):
    """A tokenizer without a known separator or enough whole words: windows start from any
    ordinary token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    separator, words = window_starts(tmp_path, 3)
    assert separator is None and words.tolist() == [0, 1, 2]


def test_windows_follow_the_model(tiny_with_tokenizer):
    """Greedy-like sampling (tiny top_p) reproduces the model's argmax continuation."""
    from quantx_onnx.llm import DecoderSession

    w = generate_windows(tiny_with_tokenizer, 2, 6, seed=0, top_p=1e-9, threads=1)
    s = DecoderSession(tiny_with_tokenizer, threads=1)
    for row in w:  # the separator and the drawn word, then the model's argmax continuation
        logits = s.logits(row[None, :-1])[0]
        special = sorted(Tokenizer(tiny_with_tokenizer).special_ids())
        logits[:, special] = -np.inf
        assert np.array_equal(logits.argmax(axis=1)[1:], row[2:])
