"""Gemm(A, B, C) with a constant 2-D initializer B -> QxMatMul.

Y = alpha * A @ op(B) + beta * C. transB=1 reads B as [N, K]; alpha is folded into the
quantized weight; a constant C of shape [N] or [1, N] becomes the node's bias (times beta);
any other C stays as a following Add (after a Mul by beta when beta != 1). transA=1 is not
rewritten.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from quantx_onnx.format import DOMAIN, OP_MATMUL, TENSOR_ORDER

from .rule import (
    LinearMatch,
    Rule,
    constant_2d_initializer,
    is_constant,
    unusable_weight,
    weight_dtype_problem,
)


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def pattern(node: ir.Node) -> LinearMatch | None:
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = constant_2d_initializer(node.inputs[1])
    if weight is None:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return LinearMatch(
        "gemm",
        node,
        weight,
        transposed=bool(_attr(node, "transB", 0)),
        activation=node.inputs[0],
        alpha=float(_attr(node, "alpha", 1.0)),
        bias=bias,
        bias_scale=float(_attr(node, "beta", 1.0)),
    )


def _bias_vector(match: LinearMatch) -> np.ndarray | None:
    """beta * C as a float vector [N] when C is a constant [N] or [1, N]."""
    c = match.bias
    if c is None or c.const_value is None or not c.is_initializer() or c.is_graph_input():
        return None
    n = match.weight_shape()[1]
    if tuple(c.const_value.shape) not in ((n,), (1, n)):
        return None
    return (np.asarray(c.const_value.numpy(), np.float32).reshape(n) * match.bias_scale).astype(
        np.float32
    )


def check(match: LinearMatch) -> str | None:
    if _attr(match.node, "transA", 0):
        return "Gemm with transA=1"
    return weight_dtype_problem(match.weight)


def why_not(node: ir.Node) -> tuple[str, str] | None:
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    a, b = node.inputs[:2]
    if found := unusable_weight(b):
        return found
    if is_constant(a) and not is_constant(b):
        return a.name, "the constant is the first input A; only the weight B is quantized"
    return None


def replace(
    match: LinearMatch, weight_inputs: list[ir.Value | None], attributes: dict
) -> list[ir.Node]:
    inputs = [match.node.inputs[0], *weight_inputs]  # current wiring, see matmul_rule
    vector = _bias_vector(match)
    if vector is not None:
        dtype = match.bias.const_value.dtype
        bias = ir.Value(
            name=f"{match.name}.qx.bias",
            const_value=ir.tensor(vector.astype(dtype.numpy())),
        )
        match.node.graph.register_initializer(bias)
        inputs += [None] * (1 + len(TENSOR_ORDER) - len(inputs))  # bias follows the weights
        inputs.append(bias)
    nodes = [ir.node(OP_MATMUL, inputs, attributes=attributes, domain=DOMAIN, name=match.node.name)]
    if match.bias is not None and vector is None:
        c = match.node.inputs[2]
        if match.bias_scale != 1.0:
            beta = ir.Value(
                name=f"{match.name}.qx.beta",
                const_value=ir.tensor(np.array(match.bias_scale, dtype=c.dtype.numpy())),
            )
            match.node.graph.register_initializer(beta)
            nodes.append(ir.node("Mul", [c, beta], name=f"{match.node.name}.qx.beta_mul"))
            c = nodes[-1].outputs[0]
        nodes.append(ir.node("Add", [nodes[0].outputs[0], c], name=f"{match.node.name}.qx.add"))
    return nodes


RULE = Rule("gemm", pattern, check, replace, why_not)
