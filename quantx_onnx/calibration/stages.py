"""Running a float model stage by stage in ONNX Runtime, for calibration.

The graph is cut into stages: the prologue (embeddings, masks, rotary tables), one stage per
decoder layer (nodes named ``.../layers.N/...``, as torch and optimum name them), and the
epilogue joins the last stage. Every calibration batch goes through stage 0, then all batches
through stage 1, and so on; only the values later stages need are kept between stages, so
memory is bounded by one layer's activations over the calibration set, not by the model.

Between capturing a stage's inputs and running it for the next stage, the caller may swap in
quantized weights: later stages then see inputs from already-quantized layers (sequential
quantization, as GPTQ prescribes).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..model_io import tensor_in_memory

LAYER_RE = re.compile(r"layers?\.(\d+)[./]")


@dataclasses.dataclass
class Stage:
    index: int
    nodes: list[ir.Node]
    inputs: list[ir.Value]  # non-constant values produced earlier (or graph inputs)
    outputs: list[ir.Value]  # values later stages read

    @property
    def produced(self) -> set[int]:
        return {id(v) for n in self.nodes for v in n.outputs}


def _is_constant(v: ir.Value) -> bool:
    if v.const_value is not None and not v.is_graph_input():
        return True
    p = v.producer()
    return p is not None and p.op_type == "Constant" and not p.inputs


def partition(graph: ir.Graph) -> list[Stage]:
    """Stages in execution order (Constant nodes are folded into the stages that use them)."""
    stage_of: dict[int, int] = {}
    for node in graph:
        if node.op_type == "Constant" and not node.inputs:
            continue
        s = 0
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in stage_of:
                s = max(s, stage_of[id(p)])
        m = LAYER_RE.search(node.name or "")
        if m:
            s = max(s, int(m.group(1)) + 1)
        stage_of[id(node)] = s
    by_stage: dict[int, list[ir.Node]] = {}
    for node in graph:
        if id(node) in stage_of:
            by_stage.setdefault(stage_of[id(node)], []).append(node)
    order = sorted(by_stage)
    stages = []
    for i, s in enumerate(order):
        nodes = by_stage[s]
        produced = {id(v) for n in nodes for v in n.outputs}
        inputs, seen = [], set()
        for n in nodes:
            for v in n.inputs:
                if v is None or id(v) in produced or id(v) in seen or _is_constant(v):
                    continue
                seen.add(id(v))
                inputs.append(v)
        stages.append(Stage(i, nodes, inputs, []))
    # outputs: produced in a stage, read by a later one
    for i, st in enumerate(stages):
        produced = st.produced
        later_inputs = {id(v): v for later in stages[i + 1 :] for v in later.inputs}
        st.outputs = [later_inputs[k] for k in later_inputs if k in produced]
    return stages


def stage_of_node(stages: list[Stage]) -> dict[int, int]:
    return {id(n): st.index for st in stages for n in st.nodes}


def _needed(stage: Stage, outputs: list[ir.Value]) -> list[ir.Node]:
    """The stage's nodes that `outputs` depend on, in order (skips e.g. the logits MatMul and
    the KV-cache outputs, which calibration never reads)."""
    in_stage = {id(n) for n in stage.nodes}
    keep: set[int] = set()
    todo = [v.producer() for v in outputs]
    while todo:
        node = todo.pop()
        if node is None or id(node) in keep or id(node) not in in_stage:
            continue
        keep.add(id(node))
        todo.extend(v.producer() for v in node.inputs if v is not None)
    return [n for n in stage.nodes if id(n) in keep]


def stage_model(
    model: ir.Model,
    stage: Stage,
    captures: list[ir.Value],
    input_dtypes: dict[str, np.dtype],
    overrides: dict[str, np.ndarray] | None = None,
    with_outputs: bool = True,
) -> bytes:
    """A standalone model of `stage`: its inputs (typed as the arrays that will feed them), the
    nodes its outputs need, constants it reads (with `overrides` replacing initializer values
    by name), and outputs = stage outputs (unless not `with_outputs`) + captures (types left
    to ORT's inference)."""
    overrides = overrides or {}
    produced = [c for c in captures if id(c) in stage.produced]
    wanted = [*stage.outputs, *produced] if with_outputs else produced
    nodes, inits, const_nodes = [], {}, {}
    for n in _needed(stage, wanted):
        for v in n.inputs:
            if v is None or not _is_constant(v):
                continue
            p = v.producer()
            if p is not None:  # a Constant node: copy it into this stage
                const_nodes[id(p)] = p
            elif v.name not in inits:
                value = overrides.get(v.name)
                inits[v.name] = (
                    onnx.numpy_helper.from_array(value, v.name)
                    if value is not None
                    else tensor_in_memory(v.name, v.const_value)
                )
        nodes.append(n)
    protos = [ir.serde.serialize_node(p) for p in const_nodes.values()]
    protos += [ir.serde.serialize_node(n) for n in nodes]
    outputs, seen = [], set()
    for v in wanted:
        if v.name not in seen:
            seen.add(v.name)
            outputs.append(onnx.helper.make_empty_tensor_value_info(v.name))
    inputs = [
        onnx.helper.make_tensor_value_info(
            v.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(input_dtypes[v.name])), None
        )
        for v in stage.inputs
    ]
    graph = onnx.helper.make_graph(
        protos, f"stage{stage.index}", inputs, outputs, list(inits.values())
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = max(8, model.ir_version or 8)
    return proto.SerializeToString()


class StageRunner:
    """Runs calibration batches through the stages, keeping only what later stages need."""

    def __init__(self, model: ir.Model, session_options_fn: Callable[[], ort.SessionOptions]):
        self.model = model
        self.stages = partition(model.graph)
        self._so = session_options_fn
        last_use: dict[int, int] = {}
        for st in self.stages:
            for v in st.inputs:
                last_use[id(v)] = st.index
        self._last_use = last_use

    def session(
        self, stage: Stage, captures: list[ir.Value], input_dtypes, overrides=None, outputs=True
    ):
        data = stage_model(self.model, stage, captures, input_dtypes, overrides, outputs)
        return ort.InferenceSession(data, self._so(), providers=["CPUExecutionProvider"])

    def run_stage(
        self,
        stage: Stage,
        live: list[dict[str, np.ndarray]],
        captures: list[ir.Value],
        overrides=None,
        on_batch: Callable[[int, dict], None] | None = None,
        keep_outputs: bool = True,
    ) -> None:
        """Run every batch through `stage`: `on_batch(i, captured)` sees the captured values;
        with `keep_outputs` the stage outputs join each batch's live values."""
        dtypes = {v.name: live[0][v.name].dtype for v in stage.inputs} if live else {}
        produced = stage.produced
        if not keep_outputs and not any(id(c) in produced for c in captures):
            sess = None  # only stage inputs are asked for: nothing to run
        else:
            sess = self.session(stage, captures, dtypes, overrides, keep_outputs)
        names = [o.name for o in sess.get_outputs()] if sess else []
        in_names = [i.name for i in sess.get_inputs()] if sess else []
        for i, values in enumerate(live):
            feeds = {n: values[n] for n in in_names}
            outs = dict(zip(names, sess.run(None, feeds))) if sess else {}
            if on_batch:
                on_batch(
                    i,
                    {v.name: outs[v.name] if v.name in outs else values[v.name] for v in captures},
                )
            if keep_outputs:
                for v in stage.outputs:
                    values[v.name] = outs[v.name]
        del sess

    def release(self, stage: Stage, live: Iterable[dict[str, np.ndarray]]) -> None:
        """Drop values no stage after `stage` reads."""
        dead = [
            v.name
            for st in self.stages[: stage.index + 1]
            for v in st.inputs
            if self._last_use.get(id(v), -1) <= stage.index
        ]
        for values in live:
            for name in dead:
                values.pop(name, None)
