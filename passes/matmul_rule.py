"""MatMul(A, W) and MatMul(A, Transpose(W)) with a constant 2-D initializer W -> QxMatMul.

Transpose(W) is how optimum exports a tied lm_head (the embedding table read transposed).
MatMuls between two activations (attention) do not match.
"""

from __future__ import annotations

import onnx_ir as ir

from quantx_onnx.format import DOMAIN, OP_MATMUL

from .rule import (
    LinearMatch,
    Rule,
    constant_2d_initializer,
    is_2d_transpose,
    is_constant,
    unusable_weight,
    weight_dtype_problem,
)


def pattern(node: ir.Node) -> LinearMatch | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    weight = constant_2d_initializer(b)
    if weight is not None:
        return LinearMatch("matmul", node, weight, transposed=False, activation=a)
    producer = b.producer() if b is not None else None
    if is_2d_transpose(producer):
        weight = constant_2d_initializer(producer.inputs[0])
        if weight is not None:
            only_user = len(b.uses()) == 1 and not b.is_graph_output()
            dead = (producer,) if only_user else ()
            return LinearMatch(
                "matmul", node, weight, transposed=True, activation=a, dead_after=dead
            )
    return None


def check(match: LinearMatch) -> str | None:
    if problem := weight_dtype_problem(match.weight):
        return problem
    a = match.activation
    if a is not None and a.shape is not None and len(a.shape) < 1:
        return "activation is a scalar"
    return None


def why_not(node: ir.Node) -> tuple[str, str] | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if found := unusable_weight(b):
        return found
    if is_constant(a) and not is_constant(b):
        return a.name, "the constant is the first input (W @ x); only x @ W is quantized"
    return None


def replace(
    match: LinearMatch, weight_inputs: list[ir.Value | None], attributes: dict
) -> list[ir.Node]:
    # read A from the node now: an earlier replacement may have rewired it
    node = ir.node(
        OP_MATMUL,
        [match.node.inputs[0], *weight_inputs],
        attributes=attributes,
        domain=DOMAIN,
        name=match.node.name,
    )
    return [node]


RULE = Rule("matmul", pattern, check, replace, why_not)
