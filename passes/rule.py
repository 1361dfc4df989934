"""What a rewrite rule is, and what it hands to the pass driver."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class WeightKey:
    """One logical weight W[K, N]: an initializer, possibly read transposed.

    ``transposed`` means the initializer is stored [N, K] (a Transpose in front of MatMul,
    Gemm transB=1, or an embedding table whose rows are W's columns). Consumers with equal keys
    share one packed weight.
    """

    initializer: str
    transposed: bool
    alpha: float = 1.0  # W is alpha * initializer (Gemm's alpha folded into the scales)


@dataclasses.dataclass
class LinearMatch:
    """A node that reads a constant weight and can become a QuantX node."""

    rule: str
    node: ir.Node
    weight: ir.Value  # the initializer value
    transposed: bool
    activation: ir.Value | None = None  # A of Y = A @ W when matched (None for Gather); an
    # earlier replacement may rewire it, so replacements read node.inputs instead
    alpha: float = 1.0  # Y = alpha * A @ W (+ bias)
    bias: ir.Value | None = None  # bias input, if any
    bias_scale: float = 1.0  # Gemm beta
    bias_is_vector: bool = False  # bias is a constant [N] (or [1, N]) that the node can take
    dead_after: tuple[ir.Node, ...] = ()  # nodes that become unused (e.g. the Transpose)

    @property
    def key(self) -> WeightKey:
        return WeightKey(self.weight.name, self.transposed, self.alpha)

    @property
    def name(self) -> str:
        return node_name(self.node)

    def weight_shape(self) -> tuple[int, int]:
        """(K, N) of the logical weight."""
        rows, cols = self.weight.shape.numpy() if self.weight.shape else (0, 0)
        return (cols, rows) if self.transposed else (rows, cols)


def node_name(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or node.op_type


def constant_2d_initializer(value: ir.Value | None) -> ir.Value | None:
    """``value`` if it is a 2-D float initializer that no one can override at run time."""
    if value is None or not value.is_initializer() or value.is_graph_input():
        return None
    if value.const_value is None or len(value.const_value.shape) != 2:
        return None
    return value


def transpose_perm(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("perm")
    return None if attr is None else list(attr.as_ints())


def is_2d_transpose(node: ir.Node | None) -> bool:
    """A Transpose that swaps the two axes of a 2-D tensor."""
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = transpose_perm(node)
    return perm is None or perm == [1, 0]


FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def is_constant(value: ir.Value | None) -> bool:
    """An initializer (overridable or not) or a Constant node's output."""
    if value is None:
        return False
    if value.const_value is not None:
        return True
    node = value.producer()
    return node is not None and node.op_type == "Constant" and not node.inputs


def constant_dtype(value: ir.Value) -> ir.DataType | None:
    """The element type of a constant (see ``is_constant``)."""
    if value.const_value is not None:
        return value.const_value.dtype
    attr = value.producer().attributes.get("value")
    return attr.as_tensor().dtype if attr is not None else None


def unusable_weight(value: ir.Value | None) -> tuple[str, str] | None:
    """(weight name, why it cannot be quantized) for a constant that a weight input reads but
    that ``constant_2d_initializer`` refuses, directly or through a Transpose; None when
    ``value`` is not constant at all (an activation)."""
    if value is None:
        return None
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and is_constant(node.inputs[0]):
        inner = unusable_weight(node.inputs[0])
        if inner is not None or is_2d_transpose(node):
            return inner
        reason = f"weight is read through a Transpose perm={transpose_perm(node)}"
        return node.inputs[0].name, reason
    if not is_constant(value):
        return None
    name = value.name or "?"
    if value.const_value is None:
        return name, "weight is a Constant node's output, not an initializer"
    if value.is_graph_input():
        return name, "weight is also a graph input (it can be replaced at run time)"
    rank = len(value.const_value.shape)
    if rank != 2:
        return name, f"constant weight is {rank}-D (only 2-D weights are quantized)"
    return None


def weight_dtype_problem(weight: ir.Value) -> str | None:
    dtype = weight.const_value.dtype
    if dtype not in FLOAT_TYPES:
        return f"weight dtype {dtype.name} is not float32/float16"
    return None


def weight_array(weight: ir.Value, key: WeightKey) -> np.ndarray:
    """W[K, N] in the initializer's own float dtype, as a view where possible (an external
    tensor stays memory-mapped): quantizers convert it a chunk of columns at a time."""
    w = weight.const_value.numpy()
    w = w.T if key.transposed else w
    if key.alpha != 1.0:
        w = w.astype(np.float32) * np.float32(key.alpha)
    return w


def _no_reason(node: ir.Node) -> tuple[str, str] | None:
    return None


@dataclasses.dataclass(frozen=True)
class Rule:
    """pattern(node) -> LinearMatch | None; check(match) -> reason to skip | None;
    replace(match, weight_inputs, attributes) -> new nodes in order; the first output of the
    last one takes the place of the matched node's output (the driver rewires it);
    why_not(node) -> (weight name, reason) for a node of the rule's op that pattern refused
    although it reads a constant weight, None when it reads none (it is no weight op)."""

    name: str
    pattern: Callable[[ir.Node], LinearMatch | None]
    check: Callable[[LinearMatch], str | None]
    replace: Callable[[LinearMatch, list[ir.Value | None], dict], list[ir.Node]]
    why_not: Callable[[ir.Node], tuple[str, str] | None] = _no_reason
