"""The pass that rewrites every MatMul/Gemm/Gather with a constant weight into a QuantX node.

Order of work: match every node against the rules, group matches by logical weight (a weight
read by several nodes is quantized and packed once), quantize and pack each weight through the
caller's ``quantize`` function (the recipe lives there, not here), swap the nodes, then drop
the nodes and initializers nobody reads any more.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from quantx_onnx.format import DOMAIN, OP_VERSION, TENSOR_ORDER, QuantizedWeight, pack, packed_bytes

from . import gather_rule, gemm_rule, matmul_rule
from .rule import LinearMatch, Rule, WeightKey, node_name, weight_array

DEFAULT_RULES: tuple[Rule, ...] = (matmul_rule.RULE, gemm_rule.RULE, gather_rule.RULE)

# Returns the quantized weight for W[K, N] read by `matches`.
QuantizeFn = Callable[[WeightKey, np.ndarray, list[LinearMatch]], QuantizedWeight]


@dataclasses.dataclass
class NodeOutcome:
    node: str
    op_type: str
    weight: str
    rewritten: bool
    reason: str = ""


@dataclasses.dataclass
class WeightOutcome:
    name: str
    K: int
    N: int
    nodes: list[str]
    attributes: dict
    original_bytes: int
    packed_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.packed_bytes / (self.K * self.N)


@dataclasses.dataclass
class LinearPassReport:
    nodes: list[NodeOutcome] = dataclasses.field(default_factory=list)
    weights: list[WeightOutcome] = dataclasses.field(default_factory=list)
    untouched: dict[str, int] = dataclasses.field(default_factory=dict)  # op -> count
    seconds: float = 0.0

    @property
    def rewritten(self) -> list[NodeOutcome]:
        return [n for n in self.nodes if n.rewritten]

    @property
    def skipped(self) -> list[NodeOutcome]:
        return [n for n in self.nodes if not n.rewritten]

    def skip_reasons(self, names: int = 3) -> list[str]:
        """One line per distinct reason nodes were left in float, with how many and which
        (the first ``names``), then the MatMul/Gemm nodes that read no constant weight."""
        by_reason: dict[str, list[str]] = {}
        for n in self.skipped:
            by_reason.setdefault(n.reason, []).append(n.node)
        lines = []
        for reason, nodes in by_reason.items():
            more = f" and {len(nodes) - names} more" if len(nodes) > names else ""
            lines.append(f"{reason}: {len(nodes)} x ({', '.join(nodes[:names])}{more})")
        for op, count in sorted(self.untouched.items()):
            lines.append(f"{count} {op} with no constant weight (activation x activation)")
        return lines


WEIGHT_OPS = ("MatMul", "Gemm")  # Gathers over activations (shapes) are not worth listing


def find_matches(
    graph: ir.Graph, rules: Iterable[Rule], excluded: Callable[[LinearMatch], bool] | None
) -> tuple[list[tuple[Rule, LinearMatch]], list[NodeOutcome], dict[str, int]]:
    """Matches that may be rewritten; outcomes, with why, for every node that reads a constant
    weight and may not be (a check failed, --exclude, or no rule takes that form of weight:
    3-D, a Gather on axis 1, ...); and counts of MatMul/Gemm nodes that read no constant at
    all (activation x activation, as in attention)."""
    accepted, skipped, untouched = [], [], {}
    for node in graph:
        found = next(((r, m) for r in rules if (m := r.pattern(node)) is not None), None)
        if found is None:
            why = next((w for r in rules if (w := r.why_not(node)) is not None), None)
            if why is not None:
                skipped.append(NodeOutcome(node_name(node), node.op_type, why[0], False, why[1]))
            elif node.op_type in WEIGHT_OPS and node.domain in ("", "ai.onnx"):
                untouched[node.op_type] = untouched.get(node.op_type, 0) + 1
            continue
        rule, match = found
        reason = rule.check(match)
        if reason is None and excluded is not None and excluded(match):
            reason = "excluded by --exclude"
        if reason is None:
            accepted.append((rule, match))
        else:
            skipped.append(NodeOutcome(match.name, node.op_type, match.weight.name, False, reason))
    return accepted, skipped, untouched


def _tensor_name(key: WeightKey, tensor: str) -> str:
    suffix = ".T" if key.transposed else ""
    if key.alpha != 1.0:
        suffix += f".x{key.alpha:g}"
    return f"{key.initializer}{suffix}.qx.{tensor}"


# Makes the stored tensor for a packed array (in memory by default; see SpillFile).
TensorFactory = Callable[[str, np.ndarray], ir.TensorProtocol]


def in_memory(name: str, array: np.ndarray) -> ir.TensorProtocol:
    return ir.tensor(array, name=name)


class SpillFile:
    """Writes packed tensors to a scratch file as soon as they exist and hands out external
    tensors over it, so that quantizing a large model holds one weight at a time in memory,
    not the quantized model. The file is removed by `close`."""

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._offset = 0

    def __call__(self, name: str, array: np.ndarray) -> ir.TensorProtocol:
        data = np.ascontiguousarray(array).tobytes()
        self._file.write(data)
        self._file.flush()
        tensor = ir.ExternalTensor(
            self.path.name,
            self._offset,
            len(data),
            ir.DataType.from_numpy(array.dtype),
            shape=ir.Shape(array.shape),
            name=name,
            base_dir=str(self.path.parent),
        )
        self._offset += len(data)
        return tensor

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _register_packed(
    graph: ir.Graph, key: WeightKey, packed: dict[str, np.ndarray], make_tensor: TensorFactory
):
    """Initializers for the packed tensors, as the node's weight inputs in TENSOR_ORDER."""
    values = []
    for name in TENSOR_ORDER:
        if name not in packed:
            values.append(None)
            continue
        tname = _tensor_name(key, name)
        value = ir.Value(name=tname, const_value=make_tensor(tname, packed[name]))
        graph.register_initializer(value)
        values.append(value)
    while values and values[-1] is None:
        values.pop()
    return values


def _release(weight: ir.Value) -> None:
    """Drop a memory-mapped external tensor as soon as it has been quantized."""
    tensor = weight.const_value
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def quantize_linear_nodes(
    model: ir.Model,
    quantize: QuantizeFn,
    *,
    accuracy_level: int,
    rules: Iterable[Rule] = DEFAULT_RULES,
    excluded: Callable[[LinearMatch], bool] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    make_tensor: TensorFactory = in_memory,
) -> LinearPassReport:
    """Rewrite ``model`` in place; returns what was rewritten, skipped and packed."""
    start = time.perf_counter()
    graph = model.graph
    accepted, skipped, untouched = find_matches(graph, tuple(rules), excluded)
    report = LinearPassReport(nodes=list(skipped), untouched=untouched)

    by_weight: dict[WeightKey, list[tuple[Rule, LinearMatch]]] = {}
    for rule, m in accepted:
        by_weight.setdefault(m.key, []).append((rule, m))

    items = list(by_weight.items())
    for key, rule_matches in progress(items) if progress else items:
        matches = [m for _, m in rule_matches]
        weight = matches[0].weight
        w = weight_array(weight, key)
        qw = quantize(key, w, matches)
        del w
        packed = pack(qw)
        inputs = _register_packed(graph, key, packed, make_tensor)
        attributes = {**qw.fmt.attributes(), "accuracy_level": int(accuracy_level)}
        for rule, m in rule_matches:
            new_nodes = rule.replace(m, inputs, attributes)
            ir.convenience.replace_nodes_and_values(
                graph, m.node, [m.node], new_nodes, [m.node.outputs[0]], [new_nodes[-1].outputs[0]]
            )
            report.nodes.append(NodeOutcome(m.name, m.node.op_type, weight.name, True))
        report.weights.append(
            WeightOutcome(
                name=weight.name,
                K=qw.fmt.K,
                N=qw.fmt.N,
                nodes=[m.name for m in matches],
                attributes=attributes,
                original_bytes=weight.const_value.nbytes,
                packed_bytes=packed_bytes(packed),
            )
        )
        _release(weight)

    if accepted:
        model.opset_imports[DOMAIN] = OP_VERSION
        common_passes.RemoveUnusedNodesPass()(model)
    report.seconds = time.perf_counter() - start
    return report
