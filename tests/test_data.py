"""The real texts calibration and evaluation read: halves that never overlap."""

from __future__ import annotations

import pytest

from quantx_onnx.data import load_text
from quantx_onnx.errors import InputError

pytest.importorskip("gensim")


def test_calibration_halves_never_hold_evaluated_text():
    calib, evaluated = load_text("gensim:wiki-calib"), load_text("gensim:wiki-eval")
    assert len(calib) > 100_000 and len(evaluated) > 100_000
    assert evaluated[:200] not in calib and calib[-200:] not in evaluated
    lee, lee_calib = load_text("gensim:lee"), load_text("gensim:lee-calib")
    stories = lee.splitlines(keepends=True)
    assert lee_calib == "".join(stories[len(stories) // 2 :])
    # perplexity reads the first 16384 tokens (~22% of the corpus): all in the first half
    first_half = "".join(stories[: len(stories) // 2])
    assert len(first_half) > 0.3 * len(lee) and not set(first_half.splitlines()) & set(
        lee_calib.splitlines()
    )


def test_unknown_corpus_is_named():
    with pytest.raises(InputError, match="gensim:lee-eval: unknown corpus"):
        load_text("gensim:lee-eval")
