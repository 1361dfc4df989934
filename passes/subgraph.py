"""Small graph utilities shared by the structural passes: walking producers and consumers,
and evaluating a constant-foldable slice of a graph in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

LINEAR_OPS = {("", "MatMul"), ("ai.onnx", "MatMul"), ("", "Gemm"), ("com.quantx", "QxMatMul")}


def op(node: ir.Node | None) -> tuple[str, str] | None:
    return None if node is None else (node.domain, node.op_type)


def is_linear(node: ir.Node | None) -> bool:
    """A projection: MatMul/Gemm with a constant second input, or a QuantX matmul."""
    if node is None or op(node) not in LINEAR_OPS:
        return False
    if node.op_type == "QxMatMul":
        return True
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return w is not None and w.const_value is not None and not w.is_graph_input()


def producer(value: ir.Value | None) -> ir.Node | None:
    return None if value is None else value.producer()


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def consumers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def walk_back_to_linear(value: ir.Value, through: set[str], max_depth: int = 12) -> ir.Node | None:
    """The first projection found walking producers from `value` through ops in `through`
    (breadth first, following every input)."""
    frontier, seen = [value], set()
    for _ in range(max_depth):
        nxt = []
        for v in frontier:
            node = producer(v)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if is_linear(node):
                return node
            if node.op_type in through:
                nxt.extend(i for i in node.inputs if i is not None and i.const_value is None)
        frontier = nxt
    return None


def walk_forward_to_linear(value: ir.Value, max_depth: int = 16) -> ir.Node | None:
    """The first projection that consumes (directly or through other ops) `value`."""
    frontier, seen = [value], set()
    for _ in range(max_depth):
        nxt = []
        for v in frontier:
            for node in consumers(v):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if is_linear(node):
                    return node
                nxt.extend(node.outputs)
        frontier = nxt
    return None


def backward_slice(outputs: Iterable[ir.Value]) -> list[ir.Node]:
    """Nodes needed to compute `outputs`, in topological order."""
    order, seen = [], set()

    def visit(v: ir.Value):
        node = producer(v)
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        for i in node.inputs:
            if i is not None:
                visit(i)
        order.append(node)

    for v in outputs:
        visit(v)
    return order


def evaluate(outputs: list[ir.Value], feeds: dict[ir.Value, np.ndarray], opset: int):
    """Values of `outputs` given `feeds`, by running their backward slice in ORT. Every other
    input of the slice must be an initializer or a constant."""
    import onnxruntime as ort

    nodes = backward_slice(outputs)
    needed = {id(v) for n in nodes for v in n.inputs if v is not None}
    inits, graph_inputs = {}, []
    for n in nodes:
        for v in n.inputs:
            if v is None or v.producer() is not None or v in feeds or v.name in inits:
                continue
            if v.const_value is None:
                raise ValueError(f"value {v.name!r} is neither fed nor constant")
            inits[v.name] = ir.serde.serialize_tensor(v.const_value)
            inits[v.name].name = v.name
    for v, arr in feeds.items():
        if id(v) in needed:
            graph_inputs.append(
                onnx.helper.make_tensor_value_info(
                    v.name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)
                )
            )
    protos = [ir.serde.serialize_node(n) for n in nodes]
    outs = [onnx.helper.make_empty_tensor_value_info(v.name) for v in outputs]
    graph = onnx.helper.make_graph(protos, "slice", graph_inputs, outs, list(inits.values()))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {v.name: a for v, a in feeds.items() if id(v) in needed})
