"""QxMatMul nodes that read the same activation -> one QxMultiMatMul (q/k/v, gate/up).

At decode (one token) each small matrix costs ONNX Runtime a kernel call and our driver a
parallel loop: SmolLM2's k and v projections (576 x 192) take 14 us in a profiled model
against 4.5 us in the kernel benchmark. One node for the matrices of one input pays that once;
on SmolLM2 that saved 2-4.5 us per removed node, 3-7% of decode (docs/PERF.md). Each weight
keeps its own format (the bit plan mixes 3 and 4 bits inside a layer), its input scale and its
bias; the results are those of the separate nodes, bit for bit (the same kernels on the same
prepared activations).

pattern: 2..MAX_FUSED QxMatMul nodes of one graph whose input A is the same value and whose
    K, layout and accuracy_level agree, every weight input and bias an initializer (a second
    node over the same weight is left alone: it computes the same result).
replace: one QxMultiMatMul (docs/FORMAT.md) at the first node's place: A, then per weight
    SLOTS inputs (QxMatMul's inputs 1..7, absent ones empty), list attributes N, bits,
    group_size, scale_bits, super_group; its outputs take the old outputs' names and users. Its
    name joins the old names with "+" (profiles show what was fused); the metadata property
    MEMBERS keeps them as a JSON list.
:func:`split_multi_matmuls` is the inverse, for consumers that read QxMatMul nodes (the numpy
reference model, the portable conversion).
"""

from __future__ import annotations

import json

import onnx_ir as ir

from quantx_onnx.format import DOMAIN, OP_MATMUL

OP_MULTI = "QxMultiMatMul"
MAX_FUSED = 4  # kMaxFused of custom_ops/src/ort/ort_ops.cc
SLOTS = 7  # B, scales, zero_points, sub_scales, codebook, input_scale, bias
SHARED = ("K", "layout", "accuracy_level")
LISTED = ("N", "bits", "group_size", "scale_bits", "super_group", "rotate")
OPTIONAL = ("scale_bits", "super_group", "rotate")  # 0 when absent (single nodes omit zeros)
MEMBERS = "quantx.members"  # metadata property: the fused nodes' names, a JSON list


def member_names(node: ir.Node) -> list[str]:
    """The names of the QxMatMul nodes a QxMultiMatMul stands for (in output order)."""
    if MEMBERS in node.metadata_props:
        return list(json.loads(node.metadata_props[MEMBERS]))
    return [f"{node.name}/{i}" for i in range(len(node.outputs))]


def _attrs(node: ir.Node) -> dict[str, int]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _fusable(node: ir.Node) -> bool:
    if node.op_type != OP_MATMUL or node.domain != DOMAIN or len(node.outputs) != 1:
        return False
    if not node.inputs or node.inputs[0] is None or len(node.inputs) > 1 + SLOTS:
        return False
    weights = [v for v in node.inputs[1:] if v is not None]
    return all(v.is_initializer() or v.const_value is not None for v in weights)


def _fused_node(members: list[ir.Node]) -> ir.Node:
    inputs: list[ir.Value | None] = [members[0].inputs[0]]
    for m in members:
        slots = list(m.inputs[1:]) + [None] * (SLOTS - (len(m.inputs) - 1))
        inputs.extend(slots)
    while inputs[-1] is None:
        inputs.pop()
    first = _attrs(members[0])
    attributes: dict = {name: first[name] for name in SHARED if name in first}
    for name in LISTED:
        values = [int(_attrs(m).get(name, 0)) for m in members]
        if name != "rotate" or any(values):  # absent = none rotated: graphs as before
            attributes[name] = values
    names = [m.name or f"QxMatMul_{i}" for i, m in enumerate(members)]
    node = ir.node(
        OP_MULTI,
        inputs,
        attributes=attributes,
        domain=DOMAIN,
        name="+".join(names),
        num_outputs=len(members),
    )
    node.metadata_props[MEMBERS] = json.dumps(names)
    return node


def fuse_multi_matmuls(model: ir.Model) -> int:
    """Fuses the QxMatMul nodes of the main graph that share their input (see the module
    docstring); returns the number of QxMultiMatMul nodes made."""
    graph = model.graph
    groups: dict[tuple, list[ir.Node]] = {}
    for node in graph:  # graph order: each group's first member comes first
        if _fusable(node):
            a = _attrs(node)
            key = (id(node.inputs[0]), *(a.get(name) for name in SHARED))
            groups.setdefault(key, []).append(node)
    made = 0
    for nodes in groups.values():
        # a second node over the same weight computes the same result: not ours to merge
        members, weights = [], set()
        for node in nodes:
            if id(node.inputs[1]) not in weights:
                weights.add(id(node.inputs[1]))
                members.append(node)
        for start in range(0, len(members) - 1, MAX_FUSED):
            chunk = members[start : start + MAX_FUSED]
            if len(chunk) < 2:
                continue
            fused = _fused_node(chunk)
            old = [m.outputs[0] for m in chunk]
            ir.convenience.replace_nodes_and_values(
                graph, chunk[0], chunk, [fused], old, list(fused.outputs)
            )
            made += 1
    return made


def split_multi_matmuls(model: ir.Model) -> int:
    """Turns every QxMultiMatMul of the main graph back into its QxMatMul nodes; returns how
    many were split."""
    graph = model.graph
    fused = [n for n in graph if n.op_type == OP_MULTI and n.domain == DOMAIN]
    for node in fused:
        a = _attrs(node)
        shared = {name: a[name] for name in SHARED if name in a}
        names = member_names(node)
        singles = []
        for i in range(len(node.outputs)):
            attrs = dict(shared)
            for name in LISTED:
                if name in a and (name not in OPTIONAL or a[name][i]):
                    attrs[name] = int(a[name][i])
            slots = list(node.inputs[1 + i * SLOTS : 1 + (i + 1) * SLOTS])
            while slots and slots[-1] is None:
                slots.pop()
            singles.append(
                ir.node(
                    OP_MATMUL,
                    [node.inputs[0], *slots],
                    attributes=attrs,
                    domain=DOMAIN,
                    name=names[i],
                )
            )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], singles, list(node.outputs), [s.outputs[0] for s in singles]
        )
    return len(fused)


def main(argv: list[str] | None = None) -> int:
    """``python -m quantx_onnx.passes.multi_matmul_rule IN OUT``: fuses an existing QuantX
    model (an export folder or .onnx file; a folder's companions are copied)."""
    from quantx_onnx import model_io

    return model_io.rewrite_command(
        argv,
        "python -m quantx_onnx.passes.multi_matmul_rule",
        fuse_multi_matmuls,
        "no QxMatMul nodes that share their input",
        lambda made: f"{made} QxMultiMatMul nodes",
    )


if __name__ == "__main__":
    raise SystemExit(main())
