"""quantx_onnx.InferenceSession: onnxruntime's session with the QuantX ops registered."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import quantx_onnx
from quantx_onnx import QuantConfig, optimize


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """An export-like folder holding a two-layer QuantX model (and a config file)."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [
            numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((96, 32)).astype(np.float32), "w2"),
        ],
    )
    src = tmp_path_factory.mktemp("float")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), src / "model.onnx")
    (src / "config.json").write_text("{}")
    out = tmp_path_factory.mktemp("q") / "out"
    assert len(optimize(src, out, QuantConfig(bits=3)).linear.rewritten) == 2
    return out


def test_runs_a_quantx_model_like_onnxruntime_with_session_options(quantized):
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    path = str(quantized / "model.onnx")
    with pytest.raises(Exception, match="QxMatMul"):  # plain onnxruntime cannot load it
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = ort.InferenceSession(
        path, quantx_onnx.session_options(), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    for sess in (
        quantx_onnx.InferenceSession(path),
        quantx_onnx.InferenceSession(quantized, threads=1),  # an export folder
        quantx_onnx.InferenceSession((quantized / "model.onnx").read_bytes()),
    ):
        assert isinstance(sess, ort.InferenceSession)
        assert sess.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want)


def test_given_session_options_are_kept_and_can_be_reused(quantized):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    first = quantx_onnx.InferenceSession(quantized / "model.onnx", so, threads=1)
    second = quantx_onnx.InferenceSession(quantized / "model.onnx", so)  # registered once only
    assert so.intra_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(first.run(None, {"x": x})[0], second.run(None, {"x": x})[0])
