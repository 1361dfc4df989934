"""QxGroupQueryAttention against ONNX Runtime's com.microsoft GroupQueryAttention: the same
node under the two op types, on the same inputs. Calls the op hands to ONNX Runtime (prompts,
copied caches) are bit-identical; one-token steps on a cache shared between past and present
run QuantX's decode kernel and match to float rounding. Also the rewrite rule and its inverse,
and the errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from quantx_onnx.passes.qx_attention_rule import (
    check,
    restore_attention,
    use_qx_attention,
)

from .helpers import quantx_session

NAMES = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos", "sin", "pos", "bias"]


def _model(op: str, heads: int, kv_heads: int, rotary: int = 1, **attrs):
    domain = "com.quantx" if op.startswith("Qx") else "com.microsoft"
    types = dict.fromkeys(["seqlens_k", "total", "qseq"], TensorProto.INT32)
    types["pos"] = TensorProto.INT64
    names = NAMES + ["qseq"]
    inputs = [
        helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in names
    ]
    node_inputs = NAMES + [""] * 5 + ["qseq"]
    node = helper.make_node(
        op,
        node_inputs,
        ["out", "present_k", "present_v"],
        domain=domain,
        name="attn0",
        num_heads=heads,
        kv_num_heads=kv_heads,
        do_rotary=rotary,
        rotary_interleaved=0,
        **attrs,
    )
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _sessions(heads, kv_heads, rotary=1, threads=1, **attrs):
    ref = ort.SessionOptions()
    ref.intra_op_num_threads = threads
    want = ort.InferenceSession(
        _model("GroupQueryAttention", heads, kv_heads, rotary, **attrs).SerializeToString(),
        ref,
        providers=["CPUExecutionProvider"],
    )
    got = quantx_session(_model("QxGroupQueryAttention", heads, kv_heads, rotary, **attrs), threads)
    return want, got


def _feeds(rng, batch, seq, past, heads, kv_heads, dim, capacity=None, masked=0.0):
    """Inputs of one step: `seq` new tokens after `past` cached ones in each row (the mask
    width total = past + seq, as the attention rule feeds it), a bias masking a share of the
    cached positions, rotary caches of 4096 positions."""
    total = past + seq
    bias = np.where(rng.random((batch, 1, seq, total)) < masked, np.finfo(np.float32).min, 0)
    bias[..., -1] = 0  # the token itself is never masked
    return {
        "q": rng.standard_normal((batch, seq, heads * dim), np.float32),
        "k": rng.standard_normal((batch, seq, kv_heads * dim), np.float32),
        "v": rng.standard_normal((batch, seq, kv_heads * dim), np.float32),
        "past_k": rng.standard_normal((batch, kv_heads, capacity or past, dim), np.float32),
        "past_v": rng.standard_normal((batch, kv_heads, capacity or past, dim), np.float32),
        "seqlens_k": np.full([batch], total - 1, np.int32),
        "total": np.array(total, np.int32),
        "cos": rng.uniform(-1, 1, (4096, dim // 2)).astype(np.float32),
        "sin": rng.uniform(-1, 1, (4096, dim // 2)).astype(np.float32),
        "pos": np.tile(np.arange(past + 7, total + 7, dtype=np.int64), (batch, 1)),
        "bias": bias.astype(np.float32),
        "qseq": np.full([batch], seq, np.int32),
    }


def _run_shared(session, feeds):
    """One step with past and present bound to the same cache buffers (as llm.KVCache and
    onnxruntime-genai decode): the output and the caches after the step."""
    caches = feeds["past_k"].copy(), feeds["past_v"].copy()  # the values view these arrays
    past_k, past_v = (ort.OrtValue.ortvalue_from_numpy(c) for c in caches)
    io = session.io_binding()
    for name, value in feeds.items():
        if name not in ("past_k", "past_v"):
            io.bind_cpu_input(name, value)
    io.bind_ortvalue_input("past_k", past_k)
    io.bind_ortvalue_input("past_v", past_v)
    io.bind_output("out")
    io.bind_ortvalue_output("present_k", past_k)
    io.bind_ortvalue_output("present_v", past_v)
    session.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0], caches[0], caches[1]


@pytest.mark.parametrize("batch,seq,past", [(1, 5, 0), (1, 1, 7), (2, 3, 9), (2, 1, 300)], ids=str)
def test_handed_on_calls_are_onnxruntime_bit_for_bit(rng, batch, seq, past):
    """Prompts, chunks and one-token steps with separate past and present caches."""
    want, got = _sessions(9, 3)
    feeds = _feeds(rng, batch, seq, past, 9, 3, 64, masked=0.2)
    for w, g in zip(want.run(None, feeds), got.run(None, feeds), strict=True):
        assert w.shape == g.shape and np.array_equal(w, g)


@pytest.mark.parametrize(
    "batch,past,capacity,heads,kv_heads,dim,threads",
    [
        (1, 0, 8, 9, 3, 64, 1),  # first token into an empty cache
        (1, 159, 256, 9, 3, 64, 1),  # SmolLM2's heads
        (2, 300, 320, 9, 3, 64, 2),  # the threaded tasks (>= 64 positions)
        (2, 30, 40, 9, 3, 64, 2),  # two threads, tasks on the calling thread (< 64)
        (1, 1000, 1024, 9, 3, 64, 2),
        (2, 41, 64, 4, 4, 128, 1),  # multi-head attention, 128-wide heads
        (1, 13, 16, 8, 2, 32, 1),
        (1, 37, 40, 6, 2, 48, 1),  # a head width without a register-held output
    ],
    ids=str,
)
def test_shared_cache_decode_matches_onnxruntime(
    rng, batch, past, capacity, heads, kv_heads, dim, threads
):
    """QuantX's decode kernel: output within float rounding of ONNX Runtime's, the new key
    (rotated) and value appended at the same position, the rest of the cache untouched."""
    want, got = _sessions(heads, kv_heads, threads=threads)
    feeds = _feeds(rng, batch, 1, past, heads, kv_heads, dim, capacity, masked=0.3)
    w_out, w_k, w_v = _run_shared(want, feeds)
    g_out, g_k, g_v = _run_shared(got, feeds)
    np.testing.assert_allclose(g_out, w_out, rtol=0, atol=2e-6 * np.abs(w_out).max())
    np.testing.assert_allclose(g_k, w_k, rtol=0, atol=2e-6 * np.abs(w_k).max())
    assert np.array_equal(g_v, w_v)
    untouched = np.ones(capacity, bool)
    untouched[past] = False
    assert np.array_equal(g_k[:, :, untouched], feeds["past_k"][:, :, untouched])
    assert not np.array_equal(g_k[:, :, past], feeds["past_k"][:, :, past])


def test_shared_cache_decode_without_rotary(rng):
    want, got = _sessions(9, 3, rotary=0, scale=0.3)
    feeds = _feeds(rng, 1, 1, 20, 9, 3, 64, capacity=32, masked=0.3)
    w_out, w_k, _ = _run_shared(want, feeds)
    g_out, g_k, _ = _run_shared(got, feeds)
    np.testing.assert_allclose(g_out, w_out, rtol=0, atol=2e-6 * np.abs(w_out).max())
    assert np.array_equal(g_k, w_k)  # no rotary: the key is appended as given


def test_a_position_outside_the_cache_is_an_error_naming_the_node(rng):
    _, got = _sessions(9, 3)
    feeds = _feeds(rng, 1, 1, 15, 9, 3, 64, capacity=16)
    feeds["seqlens_k"] = np.array([16], np.int32)  # a 17th position in a cache of 16
    with pytest.raises(Exception, match="QxGroupQueryAttention node 'attn0'.*seqlens_k"):
        _run_shared(got, feeds)


def test_an_option_the_op_cannot_forward_is_refused_at_load():
    with pytest.raises(Exception, match="attribute 'qk_output' is not supported"):
        quantx_session(_model("QxGroupQueryAttention", 9, 3, qk_output=1))


def test_rewrite_and_its_inverse():
    model = ir.from_proto(_model("GroupQueryAttention", 9, 3))
    (node,) = model.graph
    assert check(node) is None
    assert use_qx_attention(model) == 1
    assert (node.domain, node.op_type) == ("com.quantx", "QxGroupQueryAttention")
    assert model.opset_imports["com.quantx"] == 1
    assert restore_attention(model) == 1
    assert (node.domain, node.op_type) == ("com.microsoft", "GroupQueryAttention")

    other = ir.from_proto(_model("GroupQueryAttention", 9, 3, qk_output=1))
    assert "qk_output" in check(next(iter(other.graph)))
    assert use_qx_attention(other) == 0
