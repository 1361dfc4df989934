"""llm.KVCache: a fused decoder's cache shared between past and present (GroupQueryAttention
appends in place) gives the copied cache's logits and cache bit for bit, through growth,
batches and multi-token steps after decoding; exports without the fused attention copy. With
QuantX's attention op (the default) the shared steps run its decode kernel: the same to float
rounding."""

from __future__ import annotations

import numpy as np
import pytest

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.errors import InputError
from quantx_onnx.llm import DecoderSession


@pytest.fixture(scope="module")
def fused(tiny_llama, tmp_path_factory):
    """ONNX Runtime's GroupQueryAttention on both paths: the cache mechanics bit for bit."""
    out = tmp_path_factory.mktemp("kv") / "q"
    optimize(tiny_llama, out, QuantConfig(data_free=True, bits=4, qx_attention=False))
    return out


def _walk(session: DecoderSession, ids: np.ndarray, steps: int, capacity: int = 0):
    """Prefill, `steps` greedy one-token steps, a 3-token chunk, 2 more steps: every step's
    logits and the final cache's arrays."""
    batch, seq = ids.shape
    logits, cache = session.step(ids, session.empty_cache(batch, capacity), 0, last_only=True)
    out, pos = [logits], seq
    for i in range(steps + 3):
        if i == steps:  # a chunk of several tokens after cached decode steps
            tokens = np.argsort(logits[:, -1], axis=-1)[:, -3:]
        else:
            tokens = logits[:, -1].argmax(-1)[:, None]
        logits, cache = session.step(tokens, cache, pos)
        out.append(logits)
        pos += tokens.shape[1]
    assert cache.length == pos
    return out, cache.arrays()


@pytest.mark.parametrize("batch", [1, 2])
def test_shared_cache_equals_copied_cache(fused, rng, batch):
    shared = DecoderSession(fused, threads=1)
    copied = DecoderSession(fused, threads=1, share_kv=False)
    assert shared.shares_kv and not copied.shares_kv
    ids = rng.integers(0, 320, (batch, 5))
    # capacity 8: the buffers grow twice on the way (5 + 12 + 3 + 2 positions)
    got, got_cache = _walk(shared, ids, 12, capacity=8)
    want, want_cache = _walk(copied, ids, 12)
    assert len(got) == len(want) == 16
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)
    assert len(got_cache) == len(want_cache) == 2 * shared.cache.layers
    for g, w in zip(got_cache, want_cache):
        assert g.shape == w.shape == (batch, shared.cache.heads, 22, shared.cache.head_dim)
        assert np.array_equal(g, w)


@pytest.mark.parametrize("batch", [1, 2])
def test_quantx_attention_decodes_as_the_copied_cache(tiny_llama, tmp_path, rng, batch):
    """The default model (QxGroupQueryAttention): shared one-token steps run QuantX's kernel,
    prompts, chunks and copied steps ONNX Runtime's; the two walks agree to float rounding."""
    optimize(tiny_llama, tmp_path / "q", QuantConfig(data_free=True, bits=4))
    shared = DecoderSession(tmp_path / "q", threads=1)
    copied = DecoderSession(tmp_path / "q", threads=1, share_kv=False)
    assert shared.shares_kv
    ids = rng.integers(0, 320, (batch, 5))
    got, got_cache = _walk(shared, ids, 12, capacity=8)
    want, want_cache = _walk(copied, ids, 12)
    assert np.array_equal(got[0], want[0])  # the prompt: ONNX Runtime's op on both
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())
    assert not all(np.array_equal(g, w) for g, w in zip(got, want))  # the kernel did run
    for g, w in zip(got_cache, want_cache, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_logits_of_earlier_steps_stay_as_returned(fused, rng):
    """The shared steps' logits are the caller's: a later step does not overwrite them."""
    s = DecoderSession(fused, threads=1)
    logits, cache = s.step(rng.integers(0, 320, (1, 4)), s.empty_cache(), 0)
    first, cache = s.step(np.array([[7]]), cache, 4)
    kept = first.copy()
    second, cache = s.step(np.array([[9]]), cache, 5)
    assert np.array_equal(first, kept) and not np.array_equal(first, second)


def test_unfused_export_copies_its_cache(tiny_llama, rng):
    s = DecoderSession(tiny_llama, threads=1)
    assert not s.shares_kv
    _, cache = s.step(rng.integers(0, 320, (1, 4)), s.empty_cache(), 0)
    assert not cache.shared and cache.length == 4


def test_wrong_position_or_batch_is_refused(fused, rng):
    s = DecoderSession(fused, threads=1)
    _, cache = s.step(rng.integers(0, 320, (1, 4)), s.empty_cache(), 0)
    with pytest.raises(InputError, match="holds 4 positions, not 5"):
        s.step(np.array([[1]]), cache, 5)
    with pytest.raises(InputError, match="holds 1 rows"):
        s.step(np.array([[1], [2]]), cache, 4)


def test_symbolic_vocabulary_reads_the_logits_ort_allocates(fused, rng):
    """A graph whose logits have no static vocabulary size: the shared steps take the logits
    output ONNX Runtime allocates, and give the same numbers."""
    ids = rng.integers(0, 320, (2, 3))
    want, _ = _walk(DecoderSession(fused, threads=1, share_kv=False), ids, 4)
    s = DecoderSession(fused, threads=1)
    s.vocab = "vocab"  # as a session of such a graph reports it
    got, _ = _walk(s, ids, 4)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_empty_cache_of_another_batch_takes_the_steps_batch(fused, rng):
    ids = rng.integers(0, 320, (3, 4))
    s = DecoderSession(fused, threads=1)
    got, cache = s.step(ids, s.empty_cache(1), 0)
    copied = DecoderSession(fused, threads=1, share_kv=False)
    want, _ = copied.step(ids, copied.empty_cache(3), 0)
    assert np.array_equal(got, want) and cache.shared and cache.arrays()[0].shape[0] == 3


def test_a_cache_moves_between_sessions(fused, tiny_llama, tmp_path, rng):
    """Each session binds the buffers itself: a cache stepped in turn by the sessions of two
    models (4-bit and 3-bit weights) gives the copied caches' logits of the same turns."""
    optimize(tiny_llama, tmp_path / "q3", QuantConfig(data_free=True, bits=3, qx_attention=False))

    def turns(share: bool):
        a = DecoderSession(fused, threads=1, share_kv=share)
        b = DecoderSession(tmp_path / "q3", threads=1, share_kv=share)
        logits, cache = a.step(ids, a.empty_cache(), 0, last_only=True)
        out, pos = [logits], ids.shape[1]
        for i in range(4):
            logits, cache = (b, a)[i % 2].step(np.array([[3 + i]]), cache, pos)
            out.append(logits)
            pos += 1
        return out

    ids = rng.integers(0, 320, (1, 4))
    got, want = turns(True), turns(False)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_required_logits_to_keep_input_is_bound(fused, tmp_path, rng):
    """A graph whose logits_to_keep is a plain (required) input, not one with a default:
    the shared steps bind it, and give the copied steps' logits."""
    import shutil

    import onnx

    folder = tmp_path / "required"
    shutil.copytree(fused, folder)
    model = onnx.load(str(folder / "model.onnx"))
    kept = [t for t in model.graph.initializer if t.name != "logits_to_keep"]
    assert len(kept) == len(model.graph.initializer) - 1
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(folder / "model.onnx"))
    shared = DecoderSession(folder, threads=1)
    assert shared.shares_kv and "logits_to_keep" in shared._graph_inputs
    ids = rng.integers(0, 320, (1, 5))
    got, _ = _walk(shared, ids, 3)
    want, _ = _walk(DecoderSession(folder, threads=1, share_kv=False), ids, 3)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
