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
