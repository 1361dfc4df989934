"""The GroupQueryAttention inputs that carry the caller's attention mask, as graph nodes.

GroupQueryAttention knows sequence lengths, not masks: ``seqlens_k[b] + 1`` tokens are in row
b's cache after the step, and without ``query_seqlens`` the first prompt is taken to be right
padded and rotated from position 0 whatever ``position_ids`` say. optimum pads batches on the
left (and a mask may have holes), so the lengths alone give wrong results for such rows.

What the fused graph feeds instead reproduces the export's own attention for any mask:

- every row holds the whole mask width in its cache: ``seqlens_k = total - 1`` for each row,
  ``total_sequence_length = total``, where total is the mask's width (past + new tokens, as
  optimum and onnxruntime-genai send it);
- every query row is valid: ``query_seqlens = sequence_length`` for each row, which also makes
  the kernel rotate each token at its own ``position_ids`` entry and accept batched
  multi-token steps after a cache;
- masked keys are excluded by ``attention_bias`` [batch, 1, sequence, total]: 0 where the mask
  is set, the dtype's lowest finite value where it is 0 (as transformers builds its masks, so
  a query row with every key masked, a padding position, stays finite). Causality by cache
  index is the kernel's own, as in the export.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

PREFIX = "quantx/attn/"
NEEDED_INPUTS = ("attention_bias", "query_seqlens")


def runtime_problem() -> str | None:
    """Why this onnxruntime's GroupQueryAttention cannot take the inputs written here, or
    None. Older releases lack ``query_seqlens``: they would refuse to load the fused model."""
    import onnxruntime as ort

    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

        schema = next(
            s
            for s in get_all_operator_schema()
            if s.name == "GroupQueryAttention" and s.domain == "com.microsoft"
        )
    except (ImportError, StopIteration):  # a build without schemas: let session creation say
        return None
    names = {i.name for i in schema.inputs}
    missing = [n for n in NEEDED_INPUTS if n not in names]
    if missing:
        return (
            f"onnxruntime {ort.__version__}'s GroupQueryAttention has no {', '.join(missing)} "
            "input (needed for padded batches)"
        )
    return None


def mask_nodes(
    graph: ir.Graph, mask: ir.Value, position_ids: ir.Value, dtype: np.dtype
) -> tuple[list[ir.Node], tuple[ir.Value, ir.Value, ir.Value, ir.Value]]:
    """Nodes computing (seqlens_k, total_sequence_length, query_seqlens, attention_bias) from
    the graph inputs ``attention_mask`` [batch, total] and ``position_ids`` [batch, seq];
    constants are registered as initializers of ``graph``."""

    def const(name: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=f"quantx.attn.{name}", const_value=ir.tensor(array))
        graph.register_initializer(v)
        return v

    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], name: str, **attributes) -> ir.Value:
        nodes.append(ir.node(op, inputs, attributes=attributes, name=PREFIX + name))
        return nodes[-1].outputs[0]

    one = const("one", np.array([1], np.int64))
    int32 = ir.DataType.INT32
    batch = add("Shape", [mask], "batch", start=0, end=1)
    total = add("Shape", [mask], "total", start=1, end=2)
    seq = add("Shape", [position_ids], "seq", start=1, end=2)
    last = add("Sub", [total, one], "total_minus_1")
    seqlens_k = add("Cast", [add("Expand", [last, batch], "lens")], "seqlens_k", to=int32)
    total_scalar = add("Squeeze", [total], "total_scalar")
    total_length = add("Cast", [total_scalar], "total_length", to=int32)
    query_lengths = add(
        "Cast", [add("Expand", [seq, batch], "query_lens")], "query_seqlens", to=int32
    )
    keep = add("Cast", [mask], "keep", to=ir.DataType.BOOL)
    zero = const("zero", np.array(0, dtype))
    lowest = const("lowest", np.array(np.finfo(dtype).min, dtype))
    row_bias = add("Where", [keep, zero, lowest], "row_bias")
    axes = const("axes12", np.array([1, 2], np.int64))
    bias4 = add("Unsqueeze", [row_bias, axes], "bias_b11t")
    shape = add("Concat", [batch, one, seq, total], "bias_shape", axis=0)
    bias = add("Expand", [bias4, shape], "attention_bias")
    for n in nodes:
        n.outputs[0].name = n.name
    return nodes, (seqlens_k, total_length, query_lengths, bias)
