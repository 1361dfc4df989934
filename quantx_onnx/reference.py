"""Numpy reference of what a QuantX node computes, and of whole QuantX models.

- :func:`matmul` is QxMatMul's result for either compute path: float activations (exactly
  ``A @ dequantize(W)`` up to summation order) or int8 activations (the activation blocks of
  docs/FORMAT.md quantized exactly as the kernels do, integer dot products, float epilogue).
- :func:`dequantized_model` turns a QuantX model back into a plain float ONNX model (every
  QxMatMul -> MatMul with the dequantized weight, QxGather -> Gather): the "numpy-dequantized
  reference model" that kernels and graph passes are tested against.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import rotation
from .format import (
    DOMAIN,
    K_ALIGN,
    OP_GATHER,
    OP_MATMUL,
    TENSOR_ORDER,
    AccuracyLevel,
    QuantizedWeight,
    WeightFormat,
    dequantize,
    stored_weight,
    unpack,
)

ACT_BLOCK_MAX = 128  # int8 path: activation quantization blocks (must match kActBlockMax)


def k_blocks(fmt: WeightFormat) -> list[tuple[int, int, int]]:
    """(group, start k, length) of each activation block, in original (unpadded) k.

    Blocks are the stored groups (multiples of 16 long) cut into pieces of at most 128; a
    block's padding positions hold zero activations, so only its real k matter here."""
    out = []
    for j in range(fmt.n_groups):
        start, length = j * fmt.group, fmt.group_length(j)
        stored = -(-length // K_ALIGN) * K_ALIGN
        for o in range(0, stored, ACT_BLOCK_MAX):
            real = max(0, min(ACT_BLOCK_MAX, length - o))
            out.append((j, start + o, real))
    return out


def quantize_activations(a: np.ndarray, fmt: WeightFormat):
    """Int8 activations as the kernels make them: per block, scale = max|a|/127,
    q = round-half-even(a * (127/max|a|)) in float32. Returns (q [M, K] int8,
    scale [M, n_blocks], blocks)."""
    a = np.asarray(a, np.float32)
    blocks = k_blocks(fmt)
    q = np.zeros(a.shape, np.int8)
    scale = np.zeros((a.shape[0], len(blocks)), np.float32)
    for b, (_, start, length) in enumerate(blocks):
        if length == 0:
            continue
        seg = a[:, start : start + length]
        peak = np.abs(seg).max(axis=1)
        safe = np.where(peak > 0, peak, np.float32(1))
        inv = np.where(peak > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
        q[:, start : start + length] = np.rint(seg * inv[:, None]).astype(np.int8)
        scale[:, b] = peak / np.float32(127)
    return q, scale, blocks


def codebook_i8(codebook: np.ndarray):
    """Int8 codebook entries and their scale, as the int8 path uses them."""
    cb = np.asarray(codebook, np.float32)
    peak = np.abs(cb).max(axis=1)
    inv = np.where(peak > 0, np.float32(127) / np.where(peak > 0, peak, 1), 0).astype(np.float32)
    return np.rint(cb * inv[:, None]).astype(np.int32), (peak / np.float32(127)).astype(np.float32)


def matmul(
    a: np.ndarray,
    q: QuantizedWeight,
    accuracy_level: int = 0,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """QxMatMul's result for A[..., K] in float64 (the kernels' float32 result agrees within
    summation-order rounding)."""
    f = q.fmt
    lead = a.shape[:-1]
    a2 = np.asarray(a, np.float32).reshape(-1, f.K)
    if q.input_scale is not None:
        a2 = a2 * q.input_scale[None, :]
    if f.rotate:  # the activations in the weight's rotated basis, as the kernels round them
        a2 = rotation.rotate_rows(a2).astype(np.float32)
    if accuracy_level != AccuracyLevel.INT8:
        w = stored_weight(q).astype(np.float64)
        y = a2.astype(np.float64) @ w
    else:
        y = _matmul_int8(a2, q)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y.reshape(*lead, f.N)


def dequantize_rows(q: QuantizedWeight, indices: np.ndarray) -> np.ndarray:
    """QxGather's result: rows `indices` (negative ones count from the end) of the table
    E = W^T, shape [*indices.shape, K]."""
    table = dequantize(q).T
    idx = np.asarray(indices, np.int64)
    return table[np.where(idx < 0, idx + q.fmt.N, idx)]


def _matmul_int8(a2: np.ndarray, q: QuantizedWeight) -> np.ndarray:
    f = q.fmt
    a8, sa, blocks = quantize_activations(a2, f)
    if q.codebook is not None:
        cb8, cbs = codebook_i8(q.codebook)
        rows = np.arange(f.N) if cb8.shape[0] == f.N else np.zeros(f.N, np.int64)
        values = cb8[rows[:, None], q.codes]  # [N, K]; the kernels add 128 and subtract it back
        scale = q.scales * cbs[rows][:, None]
        zero = np.zeros(q.scales.shape, np.float64)
    else:
        values = q.codes.astype(np.int64)
        scale = q.scales
        zero = q.effective_zero_points.astype(np.float64)
    y = np.zeros((a2.shape[0], f.N), np.float64)
    for b, (j, start, length) in enumerate(blocks):
        if length == 0:
            continue
        ab = a8[:, start : start + length].astype(np.int64)
        dot = ab @ values[:, start : start + length].T.astype(np.int64)  # [M, N]
        isum = ab.sum(axis=1)
        y += (sa[:, b : b + 1] * scale[None, :, j]) * (dot - zero[None, :, j] * isum[:, None])
    return y


# --- whole models ------------------------------------------------------------------------------
def node_weight(node: ir.Node, first_input: int = 1) -> QuantizedWeight:
    """The logical weight a QuantX node carries."""
    attrs = {k: a.value for k, a in node.attributes.items()}
    fmt = WeightFormat.from_attributes(attrs)
    tensors = {}
    for name, value in zip(TENSOR_ORDER, node.inputs[first_input:]):
        if value is not None and value.const_value is not None:
            tensors[name] = value.const_value.numpy()
    return unpack(tensors, fmt)


def dequantized_model(model: ir.Model) -> ir.Model:
    """Replace every QuantX node of ``model`` (in place) by float MatMul/Gather nodes over the
    dequantized weights; returns the model."""
    from .passes.multi_matmul_rule import split_multi_matmuls
    from .passes.qx_attention_rule import restore_attention

    split_multi_matmuls(model)
    restore_attention(model)  # ONNX Runtime's own attention: no QuantX kernel in the reference
    graph = model.graph
    cache: dict[tuple, ir.Value] = {}
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        w = dequantize(node_weight(node))  # [K, N], input scale applied
        key = tuple(id(v) for v in node.inputs[1:])
        dtype = node.outputs[0].dtype or ir.DataType.FLOAT
        if node.op_type == OP_MATMUL:
            if key not in cache:
                cache[key] = _initializer(graph, f"{node.name}.dequant", w.astype(dtype.numpy()))
            new = [ir.node("MatMul", [node.inputs[0], cache[key]], name=node.name)]
            bias = node.inputs[1 + len(TENSOR_ORDER)] if len(node.inputs) > 7 else None
            if bias is not None:
                new.append(ir.node("Add", [new[0].outputs[0], bias], name=f"{node.name}.bias"))
        elif node.op_type == OP_GATHER:
            gkey = key + ("gather",)
            if gkey not in cache:
                table = np.ascontiguousarray(w.T)  # rows of the table are columns of W
                cache[gkey] = _initializer(graph, f"{node.name}.table", table.astype(dtype.numpy()))
            new = [
                ir.node(
                    "Gather", [cache[gkey], node.inputs[0]], attributes={"axis": 0}, name=node.name
                )
            ]
        else:
            raise ValueError(f"unknown QuantX op {node.op_type}")
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], new, [node.outputs[0]], [new[-1].outputs[0]]
        )
    import onnx_ir.passes.common as common_passes

    common_passes.RemoveUnusedNodesPass()(model)
    model.opset_imports.pop(DOMAIN, None)
    return model


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value
