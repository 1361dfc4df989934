"""Logits of the last positions only, on request: a ``logits_to_keep`` input for decoders.

A prefill for generation needs the logits of the prompt's last position alone, but an export
computes the lm_head (576 x 49152 for SmolLM2: the largest matrix) for every position: at 128
prompt tokens that is most of the prefill's arithmetic. llama.cpp computes the last row only.

pattern: the graph output ``logits`` [batch, seq, vocab] is produced by a projection (MatMul or
QxMatMul; its weight may be computed, as the Transpose of a tied embedding table).
replace: a new graph input ``logits_to_keep`` (int64 [1]) whose initializer of the same name
makes it optional (default 0), and ``Slice(hidden, starts=-logits_to_keep, ends=INT64_MAX,
axes=[1])`` in front of the projection. 0 keeps every position (the graph's own result, as
transformers' ``logits_to_keep=0``); k > 0 keeps the last k. Clients that do not know the input
(optimum, onnxruntime-genai) feed nothing and get every position, as before.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .subgraph import LINEAR_OPS, op

INPUT = "logits_to_keep"
OUTPUT = "logits"


def _int64_initializer(graph: ir.Graph, name: str, value: int) -> ir.Value:
    v = ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
    v.const_value = ir.tensor(np.array([value], np.int64), name=name)
    graph.register_initializer(v)
    return v


def add_logits_to_keep(model: ir.Model) -> bool:
    """Adds the ``logits_to_keep`` input (see the module docstring); False where the graph has
    no ``logits`` output made by a projection of a [batch, seq, hidden] input, or already has
    the input."""
    graph = model.graph
    if any(v.name == INPUT for v in graph.inputs):
        return False
    out = next((v for v in graph.outputs if v.name == OUTPUT), None)
    head = out.producer() if out is not None else None
    if op(head) not in LINEAR_OPS:  # the weight may be computed (a Transpose of a tied table)
        return False
    hidden = head.inputs[0]
    rank = len(out.shape) if out.shape is not None else None
    if hidden is None or rank != 3 or (hidden.shape is not None and len(hidden.shape) != 3):
        return False  # a projection keeps the leading axes: logits [b, s, v] <- hidden [b, s, h]
    keep = _int64_initializer(graph, INPUT, 0)
    graph.inputs.append(keep)
    ends = _int64_initializer(graph, f"{INPUT}.ends", 2**63 - 1)
    axes = _int64_initializer(graph, f"{INPUT}.axes", 1)
    neg = ir.Node("", "Neg", [keep], name=f"/{INPUT}/Neg", num_outputs=1)
    neg.outputs[0].name = f"/{INPUT}/starts"
    sliced = ir.Node(
        "", "Slice", [hidden, neg.outputs[0], ends, axes], name=f"/{INPUT}/Slice", num_outputs=1
    )
    sliced.outputs[0].name = f"/{INPUT}/hidden"
    if hidden.dtype is not None or out.dtype is not None:
        sliced.outputs[0].dtype = hidden.dtype or out.dtype  # the lm_head keeps the dtype
    if hidden.shape is not None:
        sliced.outputs[0].shape = ir.Shape([hidden.shape[0], None, hidden.shape[2]])
    graph.insert_before(head, [neg, sliced])
    head.replace_input_with(0, sliced.outputs[0])
    out.shape = ir.Shape([out.shape[0], None, out.shape[2]])
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m quantx_onnx.passes.logits_rule IN OUT``: adds the input to an existing model
    (an export folder or .onnx file; a folder's companions are copied)."""
    from quantx_onnx import model_io

    return model_io.rewrite_command(
        argv,
        "python -m quantx_onnx.passes.logits_rule",
        add_logits_to_keep,
        "no lm_head output, or the input exists",
        lambda _: "logits_to_keep added",
    )


if __name__ == "__main__":
    raise SystemExit(main())
