"""Gather(E, indices) over a constant embedding table E[V, K] (axis 0) -> QxGather.

The rows of E are the columns of the logical weight W = E^T [K, V], so a tied lm_head
(MatMul(A, Transpose(E))) and the embedding lookup share one packed weight.
"""

from __future__ import annotations

import onnx_ir as ir

from quantx_onnx.format import DOMAIN, OP_GATHER

from .rule import (
    FLOAT_TYPES,
    LinearMatch,
    Rule,
    constant_2d_initializer,
    constant_dtype,
    is_constant,
    unusable_weight,
    weight_dtype_problem,
)


def _is_gather(node: ir.Node) -> bool:
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2


def _axis(node: ir.Node) -> int:
    axis = node.attributes.get("axis")
    return 0 if axis is None else axis.as_int()


def pattern(node: ir.Node) -> LinearMatch | None:
    if not _is_gather(node):
        return None
    table = constant_2d_initializer(node.inputs[0])
    if table is None or _axis(node) % 2:  # axis 0 of the 2-D table (or -2)
        return None
    return LinearMatch("gather", node, table, transposed=True)


def why_not(node: ir.Node) -> tuple[str, str] | None:
    """Only float tables are reported: Gathers over integer constants are shape arithmetic."""
    if not _is_gather(node) or not is_constant(node.inputs[0]):
        return None
    table = node.inputs[0]
    if constant_dtype(table) not in FLOAT_TYPES:
        return None
    if constant_2d_initializer(table) is not None:
        return table.name, (
            f"Gather on axis {_axis(node)} (only row lookups, axis 0, are quantized)"
        )
    return unusable_weight(table)


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


RULE = Rule("gather", pattern, check, replace, why_not)


def read_by_matmul(tables: set, matches: list[LinearMatch]) -> set:
    """The tables (weight keys of Gather matches) that a MatMul or Gemm also reads: tied
    lm_heads, whose weight the output projection multiplies as well as the lookup gathers."""
    return {m.key for m in matches if m.rule != "gather" and m.key in tables}
