"""The torch executor of calibration stages against ONNX Runtime: every stage of the tiny
Llama (exported and fused), values and gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from quantx_onnx.passes.attention_rule import fuse_attention

from quantx_onnx.calibration.stages import StageRunner, _needed
from quantx_onnx.calibration.torch_graph import TorchStage, UnsupportedOp
from quantx_onnx.runtime import session_options

from .helpers import llm_feeds, quantx_session

torch = pytest.importorskip("torch")


def _stages(folder, fused):
    model = ir.load(str(folder / "model.onnx"))
    if fused:
        assert fuse_attention(model, Path(folder)).fused
    return model, StageRunner(model, lambda: session_options(threads=1))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_every_stage_matches_onnx_runtime(tiny_llama, fused, padded):
    model, runner = _stages(tiny_llama, fused)
    feeds = llm_feeds(quantx_session(tiny_llama / "model.onnx"), seq=11, batch=2, seed=3)
    if padded:  # the second row left-padded by 4 (the fused graph's attention_bias path)
        feeds["attention_mask"][1, :4] = 0
        feeds["position_ids"][1] = np.maximum(np.arange(11) - 4, 0)
    live = [dict(feeds)]
    checked = 0
    for stage in runner.stages:
        outputs = stage.outputs or [v for v in model.graph.outputs if v.name == "logits"]
        ts = TorchStage(_needed(stage, outputs), stage.inputs, outputs)
        got = ts({n: torch.from_numpy(np.asarray(live[0][n])) for n in ts.input_names})
        if stage.outputs:
            runner.run_stage(stage, live, [])
            want = {n: live[0][n] for n in ts.output_names}
        else:  # the last stage: compare the logits with a whole-model ORT run
            want = {"logits": quantx_session(tiny_llama / "model.onnx").run(["logits"], feeds)[0]}
        for name, w in want.items():
            g = got[name].detach().numpy()
            assert g.shape == np.shape(w), name
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(w).max()))
            checked += 1
    assert checked >= len(runner.stages)


def test_gradients_reach_substituted_weights(tiny_llama):
    model, runner = _stages(tiny_llama, True)
    stage = runner.stages[1]
    weights = [
        n.inputs[1] for n in stage.nodes if n.op_type == "MatMul" and n.inputs[1].const_value
    ]
    assert len(weights) == 7
    feeds = llm_feeds(quantx_session(tiny_llama / "model.onnx"), seq=5, seed=1)
    live = [dict(feeds)]
    runner.run_stage(runner.stages[0], live, [])
    ts = TorchStage(stage.nodes, stage.inputs, stage.outputs)
    params = {w.name: torch.tensor(w.const_value.numpy(), requires_grad=True) for w in weights}
    x = {n: torch.from_numpy(np.asarray(live[0][n])) for n in ts.input_names}
    out = ts(x, params)[ts.output_names[0]]
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    # a substituted weight changes the result (it is read, not the initializer)
    zero = {**{k: v.detach() for k, v in params.items()}}
    first = next(iter(zero))
    zero[first] = torch.zeros_like(zero[first])
    assert not torch.allclose(ts(x, zero)[ts.output_names[0]], out.detach())


def test_an_unknown_op_is_refused_by_name():
    node = ir.node("Hardmax", [ir.Value(name="x")], name="odd")
    with pytest.raises(UnsupportedOp, match="odd: op Hardmax"):
        TorchStage([node], [node.inputs[0]], node.outputs)


# --- convolutional heads: Conv, BatchNormalization, ConvTranspose, Resize ------------------
def _vision_head(path, resize_modes):
    """x [2, 3, 10, 10] -> Conv 3x3 -> BatchNormalization -> Relu -> ConvTranspose 4x4 /2 ->
    one Resize per mode (linear and cubic to sizes, nearest by scales) -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "cw": rng.normal(0, 0.3, (8, 3, 3, 3)),
        "cb": rng.normal(0, 0.1, 8),
        "scale": rng.uniform(0.5, 1.5, 8),
        "bias": rng.normal(0, 0.1, 8),
        "mean": rng.normal(0, 0.1, 8),
        "var": rng.uniform(0.5, 2.0, 8),
        "tw": rng.normal(0, 0.3, (8, 4, 4, 4)),
        "tb": rng.normal(0, 0.1, 4),
        "scales": np.array([1, 1, 2, 2]),
    }
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node(
            "ConvTranspose", ["r", "tw", "tb"], ["t0"], strides=[2, 2], pads=[1, 1, 1, 1]
        ),
    ]
    size = 20
    for i, mode in enumerate(resize_modes):
        src, dst = f"t{i}", f"t{i + 1}" if i + 1 < len(resize_modes) else "y"
        if mode == "nearest":
            ins, kw = [src, "", "scales"], dict(coordinate_transformation_mode="asymmetric")
            kw["nearest_mode"] = "floor"
            size *= 2
        else:
            size += 3
            sizes = numpy_helper.from_array(np.array([2, 4, size, size], np.int64), f"s{i}")
            inits.append(sizes)
            ins, kw = [src, "", "", f"s{i}"], dict(coordinate_transformation_mode="half_pixel")
            kw["cubic_coeff_a"] = -0.75
        nodes.append(helper.make_node("Resize", ins, [dst], mode=mode, name=f"resize_{mode}", **kw))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_convolutional_heads_match_onnx_runtime(tmp_path):
    path = _vision_head(tmp_path / "head.onnx", ["linear", "cubic", "nearest"])
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 10, 10)).astype(np.float32)
    want = quantx_session(path).run(["y"], {"x": x})[0]
    model = ir.load(str(path))
    ts = TorchStage(model.graph, list(model.graph.inputs), list(model.graph.outputs))
    got = ts({"x": torch.from_numpy(x)})["y"].numpy()
    assert got.shape == want.shape == (2, 4, 52, 52)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_a_resize_it_cannot_match_is_refused(tmp_path):
    path = _vision_head(tmp_path / "head.onnx", ["linear"])
    model = ir.load(str(path))
    node = next(n for n in model.graph if n.op_type == "Resize")
    node.attributes["coordinate_transformation_mode"] = ir.AttrString(
        "coordinate_transformation_mode", "align_corners"
    )
    ts = TorchStage(model.graph, list(model.graph.inputs), list(model.graph.outputs))
    with pytest.raises(UnsupportedOp, match="resize_linear: .*align_corners"):
        ts({"x": torch.zeros(2, 3, 10, 10)})
