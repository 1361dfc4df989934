"""Batched, padded inputs through the fused attention (GroupQueryAttention): every row's logits
equal those of the row run alone, unpadded, for left and right padding, through KV-cache steps
of one and several tokens, and optimum's batched generate() equals single-prompt generate()."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from quantx_onnx.passes.attention_rule import fuse_attention

from quantx_onnx import QuantConfig, optimize

from .helpers import quantx_session

PROMPTS = ([5, 17, 33, 99, 12, 7, 81], [44, 9, 200])
PAD = 0


@pytest.fixture(scope="module")
def variants(tiny_llama, tmp_path_factory):
    """The export with attention fused (float weights), and fused + data-free 3-bit weights."""
    fused = tmp_path_factory.mktemp("fused")
    model = ir.load(str(tiny_llama / "model.onnx"))
    assert fuse_attention(model, Path(tiny_llama)).fused == [0, 1]
    ir.save(model, str(fused / "model.onnx"))
    for f in tiny_llama.iterdir():
        if f.suffix != ".onnx":
            shutil.copy(f, fused / f.name)
    q3 = tmp_path_factory.mktemp("q3") / "out"
    # float activations: int8 activations (accuracy level 4) round each row's inputs, so the
    # last-bit differences padding makes in any attention (the export's own too) can flip a
    # rounding step and grow; with float activations rows must agree to float precision
    report = optimize(tiny_llama, q3, QuantConfig(bits=3, data_free=True, accuracy_level=0))
    assert report.attention.fused == [0, 1]
    return {"fused": fused, "fused-3bit": q3}


def _cache_names(session):
    return [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]


def _empty_cache(session, batch):
    return {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values")
    }


def _step(session, ids, mask, positions, cache):
    """One forward pass: logits and the next cache (present.* renamed to past_key_values.*)."""
    names = [o.name for o in session.get_outputs()]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **cache}
    outs = dict(zip(names, session.run(None, feeds)))
    nxt = {n: outs[n.replace("past_key_values", "present")] for n in _cache_names(session)}
    return outs["logits"], nxt


def _single_row(session, tokens, steps):
    """Logits of `tokens` alone (prefill), then of each step's tokens through the cache."""
    ids = np.array([tokens], np.int64)
    n = len(tokens)
    logits, cache = _step(
        session,
        ids,
        np.ones_like(ids),
        np.arange(n, dtype=np.int64)[None],
        _empty_cache(session, 1),
    )
    out = [logits[0]]
    for new in steps:
        ids = np.array([new], np.int64)
        mask = np.ones((1, n + len(new)), np.int64)
        pos = np.arange(n, n + len(new), dtype=np.int64)[None]
        logits, cache = _step(session, ids, mask, pos, cache)
        out.append(logits[0])
        n += len(new)
    return out


def _padded_batch(session, side, steps):
    """Both prompts in one batch padded on `side`, then the same steps for both rows; per row
    the logits of its real tokens (prefill) and of each step."""
    width = max(map(len, PROMPTS))
    rows, mask = [], []
    for p in PROMPTS:
        pad = [PAD] * (width - len(p))
        rows.append(pad + p if side == "left" else p + pad)
        ones = [1] * len(p)
        mask.append([0] * len(pad) + ones if side == "left" else ones + [0] * len(pad))
    mask = np.array(mask, np.int64)
    # as transformers computes them for generation: padding positions read 1
    positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 1)
    logits, cache = _step(
        session, np.array(rows, np.int64), mask, positions, _empty_cache(session, 2)
    )
    out = [[logits[b][mask[b] > 0]] for b in range(2)]
    for new in steps:
        ids = np.array([new, new], np.int64)
        start = mask.sum(axis=1, keepdims=True)
        mask = np.concatenate([mask, np.ones((2, len(new)), np.int64)], axis=1)
        pos = start + np.arange(len(new))[None]
        logits, cache = _step(session, ids, mask, pos, cache)
        for b in range(2):
            out[b].append(logits[b])
    return out


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", ["fused", "fused-3bit"])
def test_padded_rows_equal_unpadded_single_rows(variants, variant, side):
    session = quantx_session(variants[variant] / "model.onnx", threads=1)
    ops = [n.op_type for n in onnx.load(str(variants[variant] / "model.onnx")).graph.node]
    assert sum(op.endswith("GroupQueryAttention") for op in ops) == 2  # ORT's, then QuantX's
    steps = ([3], [150, 61], [8])  # decode steps of one and of two tokens through the cache
    batch = _padded_batch(session, side, steps)
    for b, prompt in enumerate(PROMPTS):
        single = _single_row(session, prompt, steps)
        for got, want in zip(batch[b], single, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("variant", ["fused", "fused-3bit"])
def test_optimum_batched_generate_equals_single_prompts(variants, variant):
    """optimum pads a batch on the left; greedy tokens and every step's scores must equal
    those of each prompt generated alone."""
    torch = pytest.importorskip("torch")
    from optimum.onnxruntime import ORTModelForCausalLM

    import quantx_onnx

    model = ORTModelForCausalLM.from_pretrained(
        variants[variant],
        session_options=quantx_onnx.session_options(threads=1),
        use_cache=True,
        use_io_binding=False,
    )
    kw = dict(
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
    )
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    batch = model.generate(ids, attention_mask=mask, **kw)
    for b, p in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)), **kw)
        assert batch.sequences[b, width:].tolist() == alone.sequences[0, len(p) :].tolist()
        got = torch.stack(batch.scores)[:, b].numpy()
        want = torch.stack(alone.scores)[:, 0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_an_onnxruntime_without_query_seqlens_keeps_attention_unfused(tiny_llama, monkeypatch):
    """An older GroupQueryAttention (no query_seqlens) would refuse the fused model at load
    time: the layers stay as exported, with that reason."""
    import types

    from onnxruntime.capi import onnxruntime_pybind11_state as C

    real = C.get_all_operator_schema()

    def older():
        for s in real:
            if s.name == "GroupQueryAttention" and s.domain == "com.microsoft":
                inputs = [i for i in s.inputs if i.name != "query_seqlens"]
                yield types.SimpleNamespace(name=s.name, domain=s.domain, inputs=inputs)
            else:
                yield s

    monkeypatch.setattr(C, "get_all_operator_schema", older)
    model = ir.load(str(tiny_llama / "model.onnx"))
    report = fuse_attention(model, Path(tiny_llama))
    assert report.fused == [] and set(report.skipped) == {0, 1}
    assert "no query_seqlens input" in report.skipped[0]
    assert not any(n.op_type == "GroupQueryAttention" for n in model.graph)
