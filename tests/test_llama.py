"""A tiny random Llama exported by optimum, optimized end to end and run in ONNX Runtime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from quantx_onnx import QuantConfig, optimize, reference
from quantx_onnx.format import DOMAIN

from .helpers import llm_feeds, projection_names, quantx_session, rel_err

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _optimize(src, out, **kw):
    return optimize(src, out, QuantConfig(**kw))


@pytest.fixture(scope="module")
def q3_float(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("q3")
    report = _optimize(tiny_llama, out, bits=3, group_size=32, accuracy_level=0, embedding_bits=0)
    return out, report


def test_every_projection_and_the_tied_lm_head_are_rewritten(q3_float):
    out, report = q3_float
    model = onnx.load(str(out / "model.onnx"))
    qx = [n for n in model.graph.node if n.domain == DOMAIN]
    names = sorted(projection_names(model))
    assert len(names) == 2 * 7 + 1
    # q/k/v and gate/up of each layer run as one node each
    assert [n.op_type for n in qx].count("QxMultiMatMul") == 2 * 2 == report.multi_matmuls
    for layer in range(2):
        for proj in PROJECTIONS:
            assert any(f"layers.{layer}/" in n and proj in n for n in names), (layer, proj)
    assert any("lm_head" in n for n in names)
    assert [n.op_type for n in qx].count("QxGather") == 1
    # the tied table is packed once, for the lm_head and the embedding lookup alike
    lm = next(n for n in qx if "lm_head" in n.name)
    gather = next(n for n in qx if n.op_type == "QxGather")
    assert list(lm.input[1:3]) == list(gather.input[1:3])
    # nothing float of the weights is left behind, and attention MatMuls are untouched
    float_inits = [
        i.name
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
    ]
    # not even the rotary caches: they are computed from positions (constant-folded by ORT)
    assert float_inits == []
    assert {"quantx.rotary.cos_cache", "quantx.rotary.sin_cache"} <= {
        o for n in model.graph.node for o in n.output
    }
    # attention became one GroupQueryAttention per layer, saved as QuantX's (its decode
    # kernel): no float MatMul is left but the rotary caches' outer product (positions x
    # inverse frequencies, no weight)
    float_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    assert all(n.startswith("quantx/rotary/") for n in float_matmuls), float_matmuls
    attention = [(n.domain, n.op_type) for n in model.graph.node if "Attention" in n.op_type]
    assert attention == [("com.quantx", "QxGroupQueryAttention")] * 2
    assert report.attention.op == "QxGroupQueryAttention"
    assert not report.linear.skipped
    onnx.checker.check_model(model)
    # output shapes stay declared
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert len(logits.type.tensor_type.shape.dim) == 3


def test_quantized_model_equals_its_dequantized_reference(q3_float):
    out, _ = q3_float
    sess = quantx_session(out / "model.onnx")
    ref_model = reference.dequantized_model(ir.load(str(out / "model.onnx")))
    ref_sess = ort.InferenceSession(
        ir.to_proto(ref_model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for seq, batch in ((7, 1), (1, 2), (33, 2)):
        feeds = llm_feeds(sess, seq=seq, batch=batch, seed=seq)
        got = sess.run(None, feeds)
        want = ref_sess.run(None, feeds)
        for name, g, w in zip([o.name for o in sess.get_outputs()], got, want):
            assert rel_err(g, w) < 1e-4, (name, rel_err(g, w))


def test_int8_activation_path_stays_close(tiny_llama, tmp_path, q3_float):
    out_f, _ = q3_float
    _optimize(tiny_llama, tmp_path, bits=3, group_size=32, accuracy_level=4, embedding_bits=0)
    feeds = llm_feeds(quantx_session(tmp_path / "model.onnx"), seq=9)
    got = quantx_session(tmp_path / "model.onnx").run(["logits"], feeds)[0]
    want = quantx_session(out_f / "model.onnx").run(["logits"], feeds)[0]
    assert rel_err(got, want) < 0.03


def test_8bit_model_is_within_3_percent_of_fp32(tiny_llama, tmp_path):
    _optimize(tiny_llama, tmp_path, bits=8, group_size=32)
    fp32 = ort.InferenceSession(str(tiny_llama / "model.onnx"), providers=["CPUExecutionProvider"])
    q8 = quantx_session(tmp_path / "model.onnx")
    for seq in (5, 40):
        feeds = llm_feeds(fp32, seq=seq, seed=seq)
        err = rel_err(q8.run(["logits"], feeds)[0], fp32.run(["logits"], feeds)[0])
        assert err < 0.03, err


def test_folder_output_keeps_companion_files(q3_float, tiny_llama):
    out, report = q3_float
    for name in ("config.json", "generation_config.json"):
        if (tiny_llama / name).exists():
            assert (out / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert report.bytes_after < report.bytes_before / 3  # the tiny graph itself is ~100 KB
    assert 3.5 < report.bits_per_weight < 3.7  # 3 + (16 + 3) / 32 plus tile padding
    assert not list(out.glob("*.partial"))


def _decode_logits(session_path, steps=3, seq=6, seed=0):
    """Logits of a prefill and `steps` decode steps through the KV cache."""
    from quantx_onnx.llm import DecoderSession

    s = DecoderSession(session_path, threads=1)
    ids = np.random.default_rng(seed).integers(0, 320, (1, seq))
    logits, cache = s.step(ids, s.empty_cache(), 0)
    out = [logits]
    for i in range(steps):
        token = np.array([[int(logits[0, -1].argmax())]])
        logits, cache = s.step(token, cache, seq + i)
        out.append(logits)
    return out


def test_attention_fusion_is_exact_through_the_kv_cache(tiny_llama, tmp_path):
    from pathlib import Path

    from quantx_onnx.passes.attention_rule import fuse_attention

    model = ir.load(str(tiny_llama / "model.onnx"))
    before = sum(1 for _ in model.graph)
    report = fuse_attention(model, Path(tiny_llama))
    assert report.fused == [0, 1] and not report.skipped
    ops = [n.op_type for n in model.graph]
    assert ops.count("GroupQueryAttention") == 2
    assert len(ops) < before / 3
    ir.save(model, str(tmp_path / "model.onnx"))
    for name in ("config.json",):
        (tmp_path / name).write_bytes((tiny_llama / name).read_bytes())
    for got, want in zip(_decode_logits(tmp_path), _decode_logits(tiny_llama)):
        assert rel_err(got, want) < 1e-5


def test_ort_attention_keeps_onnxruntimes_op(tiny_llama, tmp_path):
    """--ort-attention: the fused attention stays com.microsoft GroupQueryAttention."""
    from quantx_onnx.cli import build_parser, optimize_config

    args = build_parser().parse_args(["optimize", "m.onnx", "--ort-attention"])
    config = optimize_config(args)
    assert not config.qx_attention and config.fuse_attention
    report = _optimize(tiny_llama, tmp_path, bits=4, data_free=True, qx_attention=False)
    assert report.attention.op == "GroupQueryAttention" and report.attention.fused == [0, 1]
    ops = {(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert ("com.microsoft", "GroupQueryAttention") in ops
    assert ("com.quantx", "QxGroupQueryAttention") not in ops


def test_optimize_without_attention_fusion_keeps_the_export(tiny_llama, tmp_path):
    report = _optimize(tiny_llama, tmp_path, bits=4, fuse_attention=False)
    assert not report.attention.fused
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert "GroupQueryAttention" not in ops
    assert ops.count("QxMatMul") == 2 * 2 + 1 and ops.count("QxMultiMatMul") == 2 * 2


def test_decode_profile_counts_every_node_of_each_step(q3_float):
    """bench profile: per decode step every QuantX node runs once (o and down projections and
    the tied lm_head; q/k/v and gate/up as one node each), and the op-type shares add up to
    the whole kernel time."""
    from quantx_onnx.bench.profile import profile_decode

    folder = q3_float[0]
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    in_graph = collections.Counter(node.op_type for node in model.graph.node)
    p = profile_decode(folder, threads=1, prompt_tokens=5, steps=3)
    ops = {o.op_type: o for o in p.ops}
    assert ops["QxMatMul"].nodes_per_step == in_graph["QxMatMul"] == 5
    assert ops["QxMultiMatMul"].nodes_per_step == in_graph["QxMultiMatMul"] == 4
    assert sum(o.share for o in p.ops) == pytest.approx(1.0)
    assert 0 < p.quantx_share < 1
    assert p.run_us_per_step >= p.kernel_us_per_step * 0.5
