"""Gather(E, indices) over a constant embedding table E[V, K] (axis 0) -> QxGather.

The rows of E are the columns of the logical weight W = E^T [K, V], so a tied lm_head
(MatMul(A, Transpose(E))) and the embedding lookup share one packed weight.
"""

from __future__ import annotations

import onnx_ir as ir

from quantx_onnx.format import DOMAIN, OP_GATHER

from .rule import LinearMatch, Rule, constant_2d_initializer, weight_dtype_problem


def pattern(node: ir.Node) -> LinearMatch | None:
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() != 0:
        return None
    table = constant_2d_initializer(node.inputs[0])
    if table is None:
        return None
    return LinearMatch("gather", node, table, transposed=True)


def check(match: LinearMatch) -> str | None:
    return weight_dtype_problem(match.weight)


def replace(
    match: LinearMatch, weight_inputs: list[ir.Value | None], attributes: dict
) -> list[ir.Node]:
    attrs = {k: v for k, v in attributes.items() if k != "accuracy_level"}
    attrs["dtype"] = int(match.weight.const_value.dtype)
    node = ir.node(
        OP_GATHER,
        [match.node.inputs[1], *weight_inputs],
        attributes=attrs,
        domain=DOMAIN,
        name=match.node.name,
    )
    return [node]


RULE = Rule("gather", pattern, check, replace)
