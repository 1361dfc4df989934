"""QxMultiMatMul: the rule that fuses QxMatMul nodes of one input (passes/multi_matmul_rule.py)
and the C++ op, against the separate nodes (bit for bit) and the numpy reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from quantx_onnx.passes.multi_matmul_rule import (
    MAX_FUSED,
    OP_MULTI,
    fuse_multi_matmuls,
    member_names,
    split_multi_matmuls,
)

from quantx_onnx import reference
from quantx_onnx.format import DOMAIN, OP_MATMUL, TENSOR_ORDER, Layout, WeightFormat, pack
from quantx_onnx.quantize.rtn import quantize_rtn

from .helpers import quantx_session

K = 96


def _weights(rng):
    """Three weights of one input in three formats: 3-bit hierarchical g32 with an input
    scale, 4-bit g32 with a bias, 2-bit symmetric g64."""
    out = []
    specs = [
        (WeightFormat(K, 40, 3, 32, Layout.TILE16, scale_bits=4, super_group=3), False, True),
        (WeightFormat(K, 16, 4, 32, Layout.TILE16), False, False),
        (WeightFormat(K, 33, 2, 64, Layout.TILE16), True, False),
    ]
    for fmt, symmetric, scaled in specs:
        q = quantize_rtn(
            rng.standard_normal((K, fmt.N)).astype(np.float32), fmt, symmetric=symmetric
        )
        if scaled:
            s = rng.uniform(0.5, 2.0, K).astype(np.float16).astype(np.float32)
            q = dataclasses.replace(q, input_scale=s)
        out.append(q)
    biases = [None, rng.standard_normal(16).astype(np.float32), None]
    return out, biases


def _separate_model(weights, biases, level, a_dtype=np.float32) -> onnx.ModelProto:
    """One QxMatMul node per weight, all reading A, each output a graph output."""
    nodes, inits = [], []
    et = helper.np_dtype_to_tensor_dtype(np.dtype(a_dtype))
    for i, (q, bias) in enumerate(zip(weights, biases)):
        packed = pack(q)
        names = [f"w{i}.{n}" if n in packed else "" for n in TENSOR_ORDER]
        inits += [
            numpy_helper.from_array(packed[n], f"w{i}.{n}") for n in TENSOR_ORDER if n in packed
        ]
        if bias is not None:
            names.append(f"w{i}.bias")
            inits.append(numpy_helper.from_array(bias, f"w{i}.bias"))
        while names[-1] == "":
            names.pop()
        attrs = {**q.fmt.attributes(), "accuracy_level": level}
        nodes.append(
            helper.make_node(
                OP_MATMUL, ["A", *names], [f"Y{i}"], domain=DOMAIN, name=f"proj{i}", **attrs
            )
        )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", et, ["b", "s", K])],
        [helper.make_tensor_value_info(f"Y{i}", et, None) for i in range(len(weights))],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    m = ir.serde.deserialize_model(model)
    made = fuse_multi_matmuls(m)
    return ir.serde.serialize_model(m), made


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("a_shape", [(1, 1, K), (2, 37, K)])
def test_fused_node_equals_the_separate_nodes_and_the_reference(level, a_shape, rng):
    weights, biases = _weights(rng)
    separate = _separate_model(weights, biases, level)
    fused, made = _fused(separate)
    assert made == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops == [OP_MULTI]
    node = fused.graph.node[0]
    assert member_names(ir.serde.deserialize_node(node)) == ["proj0", "proj1", "proj2"]
    a = rng.standard_normal(a_shape).astype(np.float32)
    want = quantx_session(separate).run(None, {"A": a})
    got = quantx_session(fused).run(None, {"A": a})
    for g, w, q, bias in zip(got, want, weights, biases):
        assert g.shape == w.shape == (*a_shape[:-1], q.fmt.N)
        np.testing.assert_array_equal(g, w)  # same kernels, same prepared activations
        ref = reference.matmul(a, q, level, bias)
        assert np.abs(g - ref).max() <= 2e-5 * np.abs(ref).max()


@pytest.mark.parametrize("level", [0, 4])
def test_float16_activations(level, rng):
    weights, biases = _weights(rng)
    separate = _separate_model(weights, biases, level, a_dtype=np.float16)
    fused, _ = _fused(separate)
    a = rng.standard_normal((3, 5, K)).astype(np.float16)
    for g, w in zip(
        quantx_session(fused).run(None, {"A": a}), quantx_session(separate).run(None, {"A": a})
    ):
        assert g.dtype == np.float16
        np.testing.assert_array_equal(g, w)


def test_split_restores_the_separate_nodes(rng):
    weights, biases = _weights(rng)
    separate = _separate_model(weights, biases, 4)
    m = ir.serde.deserialize_model(separate)
    fuse_multi_matmuls(m)
    assert split_multi_matmuls(m) == 1
    back = ir.serde.serialize_model(m)
    assert [(n.op_type, n.name) for n in back.graph.node] == [
        (OP_MATMUL, f"proj{i}") for i in range(3)
    ]
    a = rng.standard_normal((1, 2, K)).astype(np.float32)
    for g, w in zip(
        quantx_session(back).run(None, {"A": a}), quantx_session(separate).run(None, {"A": a})
    ):
        np.testing.assert_array_equal(g, w)


def test_only_nodes_of_one_input_and_equal_settings_are_fused(rng):
    weights, biases = _weights(rng)
    separate = _separate_model(weights, biases, 4)
    # proj2 reads another input; proj1 another accuracy level: nothing left to fuse
    g = separate.graph
    g.input.append(helper.make_tensor_value_info("A2", onnx.TensorProto.FLOAT, ["b", "s", K]))
    g.node[2].input[0] = "A2"
    next(a for a in g.node[1].attribute if a.name == "accuracy_level").i = 0
    _, made = _fused(separate)
    assert made == 0
    # another layout is another node, too
    weights[1] = quantize_rtn(
        rng.standard_normal((K, 16)).astype(np.float32), WeightFormat(K, 16, 4, 32, Layout.ROW)
    )
    _, made = _fused(_separate_model(weights[:2], biases[:2], 4))
    assert made == 0


def test_more_weights_than_one_node_takes_are_chunked(rng):
    fmt = WeightFormat(K, 8, 3, 32, Layout.TILE16)
    weights = [quantize_rtn(rng.standard_normal((K, 8)).astype(np.float32), fmt) for _ in range(6)]
    separate = _separate_model(weights, [None] * 6, 0)
    fused, made = _fused(separate)
    assert made == 2 and MAX_FUSED == 4
    assert sorted(len(n.output) for n in fused.graph.node) == [2, 4]
    a = rng.standard_normal((1, 3, K)).astype(np.float32)
    got = dict(zip([o.name for o in fused.graph.output], quantx_session(fused).run(None, {"A": a})))
    want = dict(
        zip([o.name for o in separate.graph.output], quantx_session(separate).run(None, {"A": a}))
    )
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def _fused_with(rng, edit) -> onnx.ModelProto:
    weights, biases = _weights(rng)
    fused, _ = _fused(_separate_model(weights, biases, 0))
    edit(fused.graph.node[0])
    outputs = set(fused.graph.node[0].output)
    kept = [o for o in fused.graph.output if o.name in outputs]
    del fused.graph.output[:]
    fused.graph.output.extend(kept)
    return fused


def _set_ints(node, name, values):
    attr = next(a for a in node.attribute if a.name == name)
    del attr.ints[:]
    attr.ints.extend(values)


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda n: _set_ints(n, "bits", [3, 4]),
            r"attribute 'bits' has 2 values, expected one per weight \(3\)",
        ),
        # outputs past N's length have no type: ONNX Runtime refuses the graph, naming the node
        (lambda n: _set_ints(n, "N", [40]), r"node \(proj0\+proj1\+proj2\)"),
        (
            lambda n: _set_ints(n, "group_size", [32, 24, 64]),
            "QxMultiMatMul weight 1 node .*group_size",
        ),
        (
            lambda n: n.output.pop(),
            r"'proj0\+proj1\+proj2': has 2 outputs, expected one per weight",
        ),
    ],
)
def test_bad_nodes_are_refused_naming_the_node(edit, match, rng):
    model = _fused_with(rng, edit)
    with pytest.raises(Exception, match=match):
        quantx_session(model)


def test_weights_fed_at_run_time_are_refused(rng):
    weights, biases = _weights(rng)
    fused, _ = _fused(_separate_model(weights, biases, 0))
    g = fused.graph
    b0 = next(i for i in g.initializer if i.name == "w0.B")
    g.initializer.remove(b0)
    g.input.append(helper.make_tensor_value_info("w0.B", onnx.TensorProto.UINT8, list(b0.dims)))
    with pytest.raises(Exception, match="QxMultiMatMul weight 0 node .*constant initializers"):
        quantx_session(fused)


def test_command_line_fuses_a_file_and_leaves_the_input(tmp_path, rng, capsys):
    from quantx_onnx.passes.multi_matmul_rule import main

    weights, biases = _weights(rng)
    src = tmp_path / "m.onnx"
    onnx.save(_separate_model(weights, biases, 4), str(src))
    before = src.read_bytes()
    assert main([str(src), str(tmp_path / "f.onnx")]) == 0
    assert "1 QxMultiMatMul nodes" in capsys.readouterr().out
    assert src.read_bytes() == before
    fused = onnx.load(str(tmp_path / "f.onnx"))
    assert [n.op_type for n in fused.graph.node] == [OP_MULTI]
    assert main([str(tmp_path / "f.onnx"), str(tmp_path / "g.onnx")]) == 1  # nothing left
    assert not (tmp_path / "g.onnx").exists()
