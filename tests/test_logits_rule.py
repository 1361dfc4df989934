"""passes/logits_rule.py: the optional ``logits_to_keep`` input. Unfed, every output equals the
graph's without it; fed k, the logits are exactly the last k rows of the full ones."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from quantx_onnx.passes.logits_rule import INPUT, add_logits_to_keep

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.llm import DecoderSession


def _prefill(session: DecoderSession, ids, **kw):
    logits, cache = session.step(ids, session.empty_cache(), 0, **kw)
    return logits, cache.arrays()


def _check(plain_dir, kept_dir, rng):
    plain = DecoderSession(plain_dir, threads=1)
    kept = DecoderSession(kept_dir, threads=1)
    assert INPUT in kept.input_names and INPUT not in plain.input_names
    ids = rng.integers(0, 64, (1, 9))
    want, want_cache = _prefill(plain, ids)
    got, got_cache = _prefill(kept, ids)  # not fed: every position, as before
    assert got.shape == want.shape and np.array_equal(got, want)
    last, last_cache = _prefill(kept, ids, last_only=True)
    assert last.shape == (1, 1, want.shape[2]) and np.array_equal(last[0, 0], want[0, -1])
    for a, b, c in zip(want_cache, got_cache, last_cache):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    # a decode step after the short prefill: the same token, the same logits
    tok = np.array([[int(np.argmax(want[0, -1]))]])
    step_plain, _ = plain.step(tok, plain.step(ids, plain.empty_cache(), 0)[1], ids.shape[1])
    step_kept, _ = kept.step(
        tok, kept.step(ids, kept.empty_cache(), 0, last_only=True)[1], ids.shape[1], last_only=True
    )
    assert np.array_equal(step_plain, step_kept)


def test_pass_on_the_float_export(tiny_llama, tmp_path, rng):
    model = ir.load(str(tiny_llama / "model.onnx"))
    assert add_logits_to_keep(model)
    assert not add_logits_to_keep(model)  # once only
    out = tmp_path / "kept"
    out.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".onnx" and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    ir.save(model, str(out / "model.onnx"))
    _check(tiny_llama, out, rng)


def test_optimize_adds_it_to_decoders(tiny_llama, tmp_path, rng):
    """The QuantX model gets the input; removing it again gives the same numbers unfed."""
    q = tmp_path / "q"
    optimize(tiny_llama, q, QuantConfig(data_free=True, accuracy_level=4))
    model = ir.load(str(q / "model.onnx"))
    assert any(v.name == INPUT for v in model.graph.inputs)
    kept = DecoderSession(q, threads=1)
    ids = rng.integers(0, 64, (1, 7))
    full, _ = _prefill(kept, ids)
    last, _ = _prefill(kept, ids, last_only=True)
    assert full.shape[1] == 7 and np.array_equal(last[0, 0], full[0, -1])
