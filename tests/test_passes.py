"""The graph pass on small hand-built graphs: what matches, what is left alone and why,
weight sharing, Gemm attributes, float16, external data."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantx_onnx import NothingToQuantize, QuantConfig, optimize, reference
from quantx_onnx.format import DOMAIN

from .helpers import quantx_session, rel_err


def _model(nodes, inputs, outputs, inits, opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, shape, et=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, et, shape)


def _save(model, path):
    onnx.save(model, str(path))
    return path


def _run_float(model_path, feeds):
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


def _check_against_reference(out_path, feeds):
    """ORT with QuantX ops == ORT on the dequantized reference model."""
    got = quantx_session(out_path).run(None, feeds)
    ref = reference.dequantized_model(ir.from_proto(onnx.load(str(out_path))))
    want = ort.InferenceSession(
        ir.to_proto(ref).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, feeds)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def _ops(path):
    return [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]


FLOAT = QuantConfig(bits=4, group_size=32, accuracy_level=0)


def test_linear_layers_rewritten_attention_untouched(tmp_path, rng):
    w1 = rng.standard_normal((64, 48)).astype(np.float32)
    w2 = rng.standard_normal((48, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["att"], name="attention"),  # activations only
        helper.make_node("MatMul", ["att", "h"], ["h2"], name="attention_v"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"),
    ]
    m = _model(
        nodes,
        [_vi("x", [2, 5, 64])],
        [_vi("y", [2, 5, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    src = _save(m, tmp_path / "m.onnx")
    report = optimize(src, tmp_path / "q.onnx", FLOAT)
    assert sorted(n.node for n in report.linear.rewritten) == ["fc1", "fc2"]
    assert report.linear.untouched == {"MatMul": 2}
    ops = _ops(tmp_path / "q.onnx")
    assert ops.count((DOMAIN, "QxMatMul")) == 2 and ops.count(("", "MatMul")) == 2
    out = onnx.load(str(tmp_path / "q.onnx"))
    assert {i.name for i in out.graph.initializer}.isdisjoint({"w1", "w2"})
    onnx.checker.check_model(out)
    # the input file is untouched
    assert onnx.load(str(src)).SerializeToString() == m.SerializeToString()
    feeds = {"x": rng.standard_normal((2, 5, 64)).astype(np.float32)}
    _check_against_reference(tmp_path / "q.onnx", feeds)
    assert (
        rel_err(quantx_session(tmp_path / "q.onnx").run(None, feeds)[0], _run_float(src, feeds)[0])
        < 0.15
    )


def test_transposed_weight_and_shared_weight_are_packed_once(tmp_path, rng):
    e = rng.standard_normal((40, 32)).astype(np.float32)  # an embedding-like table [V, K]
    nodes = [
        helper.make_node("Gather", ["e", "ids"], ["h"], name="embed"),
        helper.make_node("Transpose", ["e"], ["et"], name="tie"),
        helper.make_node("MatMul", ["h", "et"], ["logits"], name="lm_head"),
        helper.make_node("MatMul", ["h", "et"], ["logits2"], name="lm_head_again"),
    ]
    m = _model(
        nodes,
        [_vi("ids", [3], TensorProto.INT64)],
        [_vi("logits", [3, 40]), _vi("logits2", [3, 40])],
        [numpy_helper.from_array(e, "e")],
    )
    report = optimize(_save(m, tmp_path / "m.onnx"), tmp_path / "q.onnx", FLOAT)
    assert len(report.linear.weights) == 1 and len(report.linear.rewritten) == 3
    out = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in out.graph.node] == ["QxGather", "QxMatMul", "QxMatMul"]
    assert len({n.input[1] for n in out.graph.node}) == 1  # one packed B for all three
    assert not any(i.name == "e" for i in out.graph.initializer)
    ids = np.array([0, 39, 7], np.int64)
    _check_against_reference(tmp_path / "q.onnx", {"ids": ids})


def test_transpose_with_other_users_is_kept(tmp_path, rng):
    w = rng.standard_normal((24, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"]),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="fc"),
    ]
    m = _model(
        nodes,
        [_vi("x", [2, 32])],
        [_vi("y", [2, 24]), _vi("wt", [32, 24])],
        [numpy_helper.from_array(w, "w")],
    )
    optimize(_save(m, tmp_path / "m.onnx"), tmp_path / "q.onnx", FLOAT)
    assert _ops(tmp_path / "q.onnx") == [("", "Transpose"), (DOMAIN, "QxMatMul")]


@pytest.mark.parametrize(
    "trans_b,alpha,beta,c_shape",
    [
        (0, 1.0, 1.0, None),
        (1, 0.5, 2.0, [24]),
        (1, 1.0, 1.0, [1, 24]),
        (0, 2.0, 0.5, [3, 24]),
    ],
)
def test_gemm_variants(tmp_path, rng, trans_b, alpha, beta, c_shape):
    b = rng.standard_normal((24, 32) if trans_b else (32, 24)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "b")]
    inputs = ["x", "b"]
    if c_shape:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "c"))
        inputs.append("c")
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta
    )
    m = _model([node], [_vi("x", [3, 32])], [_vi("y", [3, 24])], inits)
    src = _save(m, tmp_path / "m.onnx")
    optimize(src, tmp_path / "q.onnx", QuantConfig(bits=8, group_size=32, accuracy_level=0))
    ops = _ops(tmp_path / "q.onnx")
    assert ops[0] == (DOMAIN, "QxMatMul")
    # a [3, 24] C cannot be the node's bias: it stays as Mul(beta) + Add
    assert len(ops) == (3 if c_shape == [3, 24] else 1)
    feeds = {"x": rng.standard_normal((3, 32)).astype(np.float32)}
    assert (
        rel_err(quantx_session(tmp_path / "q.onnx").run(None, feeds)[0], _run_float(src, feeds)[0])
        < 0.01
    )


def test_skips_are_reported_with_reasons(tmp_path, rng):
    w = rng.standard_normal((32, 16)).astype(np.float32)
    wi = rng.integers(-3, 3, (32, 16)).astype(np.int32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y1"], name="keep_me"),
        helper.make_node("Gemm", ["xt", "w"], ["y2"], name="gemm_ta", transA=1),
        helper.make_node("MatMul", ["xi", "wi"], ["y3"], name="int_mm"),
        helper.make_node("MatMul", ["x", "w"], ["y4"], name="also"),
    ]
    m = _model(
        nodes,
        [_vi("x", [2, 32]), _vi("xt", [32, 2]), _vi("xi", [2, 32], TensorProto.INT32)],
        [
            _vi("y1", [2, 16]),
            _vi("y2", [2, 16]),
            _vi("y3", [2, 16], TensorProto.INT32),
            _vi("y4", [2, 16]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wi, "wi")],
    )
    report = optimize(
        _save(m, tmp_path / "m.onnx"), tmp_path / "q.onnx", QuantConfig(exclude=("keep",))
    )
    reasons = {n.node: n.reason for n in report.linear.skipped}
    assert reasons == {
        "keep_me": "excluded by --exclude",
        "gemm_ta": "Gemm with transA=1",
        "int_mm": "weight dtype INT32 is not float32/float16",
    }
    assert [n.node for n in report.linear.rewritten] == ["also"]
    # w is still read by the skipped nodes, so it stays
    assert any(i.name == "w" for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer)


def test_weights_no_rule_takes_are_reported_with_their_form(tmp_path, rng):
    """Nodes reading a constant weight in a form no rule rewrites are listed with that form,
    not as "no constant weight"; a Gather on axis -2 is a row lookup and is rewritten."""
    w3 = rng.standard_normal((2, 32, 16)).astype(np.float32)
    e = rng.standard_normal((40, 32)).astype(np.float32)
    w = rng.standard_normal((8, 2)).astype(np.float32)
    shape_table = np.array([1, 2, 3, 4], np.int64)  # shape arithmetic, not a weight
    nodes = [
        helper.make_node("MatMul", ["x", "w3"], ["y3"], name="batched_weight"),
        helper.make_node("Gather", ["e", "cols"], ["ec"], name="column_lookup", axis=1),
        helper.make_node("Gather", ["e", "ids"], ["er"], name="row_lookup", axis=-2),
        helper.make_node("MatMul", ["w", "x2"], ["yl"], name="weight_on_the_left"),
        helper.make_node("Gather", ["shape_table", "ids2"], ["s"], name="shape_arith"),
    ]
    m = _model(
        nodes,
        [
            _vi("x", [2, 5, 32]),
            _vi("cols", [3], TensorProto.INT64),
            _vi("ids", [3], TensorProto.INT64),
            _vi("x2", [2, 4]),
            _vi("ids2", [1], TensorProto.INT64),
        ],
        [
            _vi("y3", [2, 5, 16]),
            _vi("ec", [40, 3]),
            _vi("er", [3, 32]),
            _vi("yl", [8, 4]),
            _vi("s", [1], TensorProto.INT64),
        ],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w3, "w3"), (e, "e"), (w, "w"), (shape_table, "shape_table"))
        ],
    )
    src = _save(m, tmp_path / "m.onnx")
    report = optimize(src, tmp_path / "q.onnx", FLOAT)
    skipped = {n.node: (n.op_type, n.weight, n.reason) for n in report.linear.skipped}
    assert skipped == {
        "batched_weight": (
            "MatMul",
            "w3",
            "constant weight is 3-D (only 2-D weights are quantized)",
        ),
        "column_lookup": (
            "Gather",
            "e",
            "Gather on axis 1 (only row lookups, axis 0, are quantized)",
        ),
        "weight_on_the_left": (
            "MatMul",
            "w",
            "the constant is the first input (W @ x); only x @ W is quantized",
        ),
    }
    assert [n.node for n in report.linear.rewritten] == ["row_lookup"]
    assert report.linear.untouched == {}
    feeds = {
        "x": rng.standard_normal((2, 5, 32)).astype(np.float32),
        "cols": np.array([0, 31, 5]),
        "ids": np.array([39, 0, 7]),
        "x2": rng.standard_normal((2, 4)).astype(np.float32),
        "ids2": np.array([1]),
    }
    got = quantx_session(tmp_path / "q.onnx").run(None, feeds)
    want = _run_float(src, feeds)
    for i in (0, 1, 3, 4):  # the skipped nodes compute exactly what they did
        np.testing.assert_array_equal(got[i], want[i])
    assert rel_err(got[2], want[2]) < 0.1  # the quantized rows


def test_nothing_to_quantize_names_every_reason(tmp_path, rng):
    w3 = rng.standard_normal((2, 32, 16)).astype(np.float32)
    e = rng.standard_normal((40, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w3"], ["y3"], name="batched_weight"),
        helper.make_node("Gather", ["e", "cols"], ["ec"], name="column_lookup", axis=1),
        helper.make_node("MatMul", ["x", "xt"], ["att"], name="scores"),
    ]
    m = _model(
        nodes,
        [_vi("x", [2, 5, 32]), _vi("xt", [2, 32, 5]), _vi("cols", [3], TensorProto.INT64)],
        [_vi("y3", [2, 5, 16]), _vi("ec", [40, 3]), _vi("att", [2, 5, 5])],
        [numpy_helper.from_array(w3, "w3"), numpy_helper.from_array(e, "e")],
    )
    with pytest.raises(NothingToQuantize) as err:
        optimize(_save(m, tmp_path / "m.onnx"), tmp_path / "q.onnx", FLOAT)
    msg = str(err.value)
    assert "constant weight is 3-D (only 2-D weights are quantized): 1 x (batched_weight)" in msg
    assert "Gather on axis 1 (only row lookups, axis 0, are quantized): 1 x (column_lookup)" in msg
    assert "1 MatMul with no constant weight" in msg
    assert not (tmp_path / "q.onnx").exists()


def test_nothing_to_quantize(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], [])
    with pytest.raises(NothingToQuantize, match="no MatMul/Gemm/Gather with a constant weight"):
        optimize(_save(m, tmp_path / "m.onnx"), tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_float16_model(tmp_path, rng):
    w = rng.standard_normal((64, 40)).astype(np.float16)
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [_vi("x", [3, 64], TensorProto.FLOAT16)],
        [_vi("y", [3, 40], TensorProto.FLOAT16)],
        [numpy_helper.from_array(w, "w")],
    )
    optimize(_save(m, tmp_path / "m.onnx"), tmp_path / "q.onnx", FLOAT)
    x = rng.standard_normal((3, 64)).astype(np.float16)
    got = quantx_session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    assert got.dtype == np.float16
    ref = x.astype(np.float32) @ w.astype(np.float32)
    assert rel_err(got, ref) < 0.15


def test_external_data_in_and_out(tmp_path, rng):
    w = rng.standard_normal((256, 128)).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    m = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
            helper.make_node("Add", ["h", "b"], ["y"]),
        ],
        [_vi("x", [1, 256])],
        [_vi("y", [1, 128])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save(
        m,
        str(src_dir / "m.onnx"),
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    optimize(src_dir / "m.onnx", tmp_path / "out" / "q.onnx", FLOAT)
    assert (tmp_path / "out" / "q.onnx.data").is_file()
    proto = onnx.load(str(tmp_path / "out" / "q.onnx"), load_external_data=False)
    assert any(i.data_location == TensorProto.EXTERNAL for i in proto.graph.initializer)
    _check_against_reference(
        tmp_path / "out" / "q.onnx", {"x": rng.standard_normal((1, 256)).astype(np.float32)}
    )


def test_recipe_overrides_per_weight(tmp_path, rng):
    weights = {
        "w_a": rng.standard_normal((64, 32)).astype(np.float32),
        "w_b": rng.standard_normal((64, 32)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_a"], ["ya"], name="attn_proj"),
        helper.make_node("MatMul", ["x", "w_b"], ["yb"], name="mlp_proj"),
    ]
    m = _model(
        nodes,
        [_vi("x", [1, 64])],
        [_vi("ya", [1, 32]), _vi("yb", [1, 32])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    report = optimize(
        _save(m, tmp_path / "m.onnx"),
        tmp_path / "q.onnx",
        QuantConfig(bits=3, group_size=64, overrides=("attn=bits:4,group:32",)),
    )
    attrs = {w.nodes[0]: w.attributes for w in report.linear.weights}
    assert attrs["attn_proj"]["bits"] == 4 and attrs["attn_proj"]["group_size"] == 32
    assert attrs["mlp_proj"]["bits"] == 3 and attrs["mlp_proj"]["group_size"] == 0  # 64 >= K
    with pytest.raises(Exception, match="unknown field 'bitz'"):
        optimize(tmp_path / "m.onnx", tmp_path / "q2.onnx", QuantConfig(overrides=("a=bitz:4",)))
    with pytest.raises(Exception, match="--bits 7"):
        optimize(tmp_path / "m.onnx", tmp_path / "q2.onnx", QuantConfig(overrides=("a=bits:7",)))
