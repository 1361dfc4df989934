"""Portable form of a QuantX model: runs on stock ONNX Runtime, no QuantX library.

Every ``com.quantx`` node is replaced by operators ONNX Runtime ships, with the weight still
stored packed:

- **MatMulNBits** (``com.microsoft``) for the formats ORT executes natively: 2, 4 or 8 bits,
  no codebook, groups of 16..256 (a power of two). Its ``B`` and packed ``zero_points`` are
  byte for byte QuantX's ROW layout (docs/FORMAT.md section 3); its scales must have the
  activation's type, so they are stored as float32, hierarchical ones expanded exactly
  (``super * (sub + 1)`` of an fp16 super-scale and an integer below 257 is exact in float32).
  ORT's MatMulNBits supports no other bit width (1.32 rejects 3 bits when the session loads).
- a **standard-op subgraph** for everything else (3-bit, codebooks, other groups, or where
  MatMulNBits' float32 scales would grow the weight by more than ``max_growth``): the codes are
  stored as bit planes (a ``b``-bit code split into 8/4/2/1-bit planes by the binary digits of
  ``b``: 3 bits = a 2-bit plane + a 1-bit plane, each packed LSB-first as in the ROW layout, so
  exactly ``b`` bits per code), zero points and sub-scales the same way, scales and codebooks
  in their stored fp16. ``BitShift`` + ``BitwiseAnd`` (``Mod`` before opset 18) unpack the
  planes, ``Cast``/``Sub``/``Mul`` (``Gather`` for a codebook) dequantize, a ``MatMul`` follows.
  ONNX Runtime constant-folds the subgraph of a MatMul's weight when the session is created
  (float weights in memory, float MatMul speed; the file stays packed).
- ``QxGather`` becomes ``Gather`` of the packed rows followed by the same unpacking, so the
  embedding table stays packed in memory too.
- ``input_scale`` becomes a ``Mul`` of the activation before the product (of the gathered rows
  for a lookup); the bias an input of MatMulNBits or an ``Add``.

The result is numerically the QuantX model's float-activation path (``accuracy_level`` 0):
exactly the dequantized weights of :func:`quantx_onnx.reference.dequantized_model`.
MatMulNBits nodes keep each QuantX node's ``accuracy_level`` unless told otherwise (4: ORT
quantizes activations to int8 its own way, close to but not the same as QuantX's blocks).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import model_io
from .errors import InputError
from .format import (
    DOMAIN,
    K_ALIGN,
    OP_GATHER,
    OP_MATMUL,
    TENSOR_ORDER,
    QuantizedWeight,
    pack_bits,
)
from .reference import node_weight

MS_DOMAIN = "com.microsoft"
NBITS_BITS = (2, 4, 8)  # what ORT 1.32's MatMulNBits accepts (its constructor rejects 3)
NBITS_BLOCKS = (16, 32, 64, 128, 256)
MAX_GROWTH = 1.25  # a weight goes to MatMulNBits only if its bytes grow by at most this


@dataclasses.dataclass
class PortableReport:
    input: str | None = None
    output: str | None = None
    matmulnbits: int = 0  # QxMatMul -> MatMulNBits
    subgraph: int = 0  # QxMatMul -> unpacking subgraph + MatMul
    gathers: int = 0  # QxGather -> Gather of packed rows + unpacking
    packed_bytes_before: int = 0  # weight tensors of the QuantX nodes
    packed_bytes_after: int = 0  # what replaced them
    bytes_before: int = 0  # model files
    bytes_after: int = 0
    copied: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"QuantX portable: {self.input} -> {self.output}"]
        lines.append(
            f"  {self.matmulnbits} MatMulNBits, {self.subgraph} unpack+MatMul, "
            f"{self.gathers} unpack Gather (stock ONNX Runtime ops only)"
        )
        growth = self.packed_bytes_after / max(self.packed_bytes_before, 1)
        lines.append(
            f"  packed weights {self.packed_bytes_before / 1e6:.2f} MB -> "
            f"{self.packed_bytes_after / 1e6:.2f} MB ({growth:.3f}x)"
        )
        if self.bytes_before:
            lines.append(
                f"  model file {self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} "
                f"MB ({self.bytes_after / self.bytes_before:.3f}x)"
            )
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        lines.append(f"  time: {self.seconds:.1f} s")
        return "\n".join(lines)


# --- encoding -----------------------------------------------------------------------------------
def bit_planes(values: np.ndarray, bits: int) -> list[tuple[int, int, np.ndarray]]:
    """``(offset, width, packed)`` per plane: the binary digits of ``bits`` (8, 4, 2, 1) from the
    low bits up, each plane packed LSB-first along the last axis (exactly ``bits`` bits a
    value, plus byte padding of the last axis)."""
    out, offset = [], 0
    v = np.asarray(values, np.uint8)
    for width in (8, 4, 2, 1):
        if bits & width:
            plane = (v >> offset) & ((1 << width) - 1)
            out.append((offset, width, pack_bits(plane, width)))
            offset += width
    return out


def _stored_codes(q: QuantizedWeight) -> np.ndarray:
    """codes [N, K] -> [N, G, S]: groups of S = group rounded up to 16, the last one padded with
    zero codes (every group but the last is full, since group sizes are multiples of 16)."""
    f = q.fmt
    S = -(-f.group // K_ALIGN) * K_ALIGN
    padded = np.zeros((f.N, f.n_groups * S), np.uint8)
    padded[:, : f.K] = q.codes
    return padded.reshape(f.N, f.n_groups, S)


def _nbits_eligible(q: QuantizedWeight, act: np.dtype, max_growth: float) -> bool:
    f = q.fmt
    if q.codebook is not None or f.bits not in NBITS_BITS or f.group not in NBITS_BLOCKS:
        return False
    if act not in (np.float32, np.float16):
        return False
    if not np.array_equal(q.scales.astype(act).astype(np.float32), q.scales):
        return False  # hierarchical scales not exact in the activation type (fp16 models)
    G = f.n_groups
    zp = 0 if q.zero_points is None else f.N * -(-G * f.bits // 8)
    nbits = f.N * G * f.group * f.bits // 8 + f.N * G * np.dtype(act).itemsize + zp
    return nbits <= max_growth * _subgraph_bytes(q)


def _subgraph_bytes(q: QuantizedWeight) -> int:
    f = q.fmt
    G, S = f.n_groups, -(-f.group // K_ALIGN) * K_ALIGN
    s = np.dtype(q.scale_dtype).itemsize
    total = f.N * G * S * f.bits // 8
    total += f.N * (f.n_super if f.hierarchical else G) * s
    total += sum(f.N * -(-G * w // 8) for w in (8, 4, 2, 1) if f.scale_bits & w)
    if q.zero_points is not None:
        total += sum(f.N * -(-G * w // 8) for w in (8, 4, 2, 1) if f.bits & w)
    return total


@dataclasses.dataclass
class _Encoded:
    """The stored tensors of one weight in portable form (or, inside a function body, the
    function inputs standing for them)."""

    q: QuantizedWeight
    nbits: bool
    planes: list[tuple[int, int, ir.Value]]  # codes [N, G, S*w/8] per plane
    scales: ir.Value  # nbits: [N, G] activation type; else [N, G] or super [N, SG] fp16/32
    zero_points: list[tuple[int, int, ir.Value]] | None  # [N, ceil(G*w/8)] per plane
    sub_scales: list[tuple[int, int, ir.Value]] | None
    codebook: ir.Value | None
    input_scale: ir.Value | None
    scales_float: bool  # scales stored as float32 (no Cast needed)

    def tensors(self) -> list[ir.Value]:
        """Stored tensors in function-input order."""
        out = [p for _, _, p in self.planes] + [self.scales]
        out += [p for _, _, p in self.zero_points or ()]
        out += [p for _, _, p in self.sub_scales or ()]
        return out + [v for v in (self.codebook, self.input_scale) if v is not None]

    def with_tensors(self, values: list[ir.Value]) -> _Encoded:
        it = iter(values)

        def planes(ps):
            return None if ps is None else [(o, w, next(it)) for o, w, _ in ps]

        codes = planes(self.planes)
        scales = next(it)
        zp, sub = planes(self.zero_points), planes(self.sub_scales)
        cb = None if self.codebook is None else next(it)
        ins = None if self.input_scale is None else next(it)
        return dataclasses.replace(
            self,
            planes=codes,
            scales=scales,
            zero_points=zp,
            sub_scales=sub,
            codebook=cb,
            input_scale=ins,
        )

    def signature(self) -> tuple:
        """What a function body depends on besides its inputs."""
        f = self.q.fmt
        return (
            f.K,
            f.N,
            f.bits,
            f.group,
            f.scale_bits,
            f.super_group,
            self.zero_points is not None,
            None if self.codebook is None else self.q.codebook.shape[0] == 1,
            self.input_scale is not None,
            self.scales_float,
        )


# --- graph building -----------------------------------------------------------------------------
FUNCTION_DOMAIN = "quantx.portable"


class _Builder:
    """Nodes with unique names and named outputs; constants are cached initializers in the main
    graph (``graph`` given) or Constant nodes in a function body."""

    def __init__(self, graph: ir.Graph | None, opset: int, prefix: str = "qxp"):
        self.graph = graph
        self.opset = opset
        self.nodes: list[ir.Node] = []
        self.prefix = prefix
        self._count = 0
        self._consts: dict[tuple, ir.Value] = {}
        self._names = set(graph.initializers) if graph is not None else set()

    def op(self, op_type: str, inputs, domain: str = "", **attrs) -> ir.Value:
        self._count += 1
        name = f"{self.prefix}/{self._count}"
        node = ir.node(op_type, list(inputs), attributes=attrs, domain=domain, name=name)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        base, i = name, 1
        while name in self._names:
            i += 1
            name = f"{base}.{i}"
        self._names.add(name)
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        self.graph.register_initializer(value)
        return value

    def const(self, array) -> ir.Value:
        a = np.asarray(array)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            if self.graph is not None:
                v = self.initializer(f"qxp.c{len(self._consts)}", a)
            else:
                v = self.op("Constant", [], value=ir.tensor(a))
            self._consts[key] = v
        return self._consts[key]

    def take_nodes(self) -> list[ir.Node]:
        nodes, self.nodes = self.nodes, []
        return nodes

    # -- helpers
    def reshape(self, x, shape):
        return self.op("Reshape", [x, self.const(np.array(shape, np.int64))])

    def cast(self, x, to: ir.DataType):
        return self.op("Cast", [x], to=int(to))

    def slice_last(self, x, count: int):
        c = self.const
        return self.op(
            "Slice",
            [x, c(np.array([0], np.int64)), c(np.array([count], np.int64)), c(np.array([-1]))],
        )

    def mask(self, x, bits: int):
        if self.opset >= 18:
            return self.op("BitwiseAnd", [x, self.const(np.array((1 << bits) - 1, np.uint8))])
        return self.op("Mod", [x, self.const(np.array(1 << bits, np.uint8))])

    def unpack(self, planes, rank: int, count: int | None):
        """uint8 values [..., count] from bit planes of rank ``rank`` (LSB-first streams)."""
        total = None
        for offset, width, packed in planes:
            x = packed
            if width < 8:
                x = self.reshape(x, [0] * rank + [1])
                shifts = self.const(np.arange(0, 8, width, dtype=np.uint8))
                x = self.op("BitShift", [x, shifts], direction="RIGHT")
                x = self.mask(x, width)
                x = self.reshape(x, [0] * (rank - 1) + [-1])
            if count is not None:  # planes of different widths pad differently
                x = self.slice_last(x, count)
            if offset:
                x = self.op(
                    "BitShift", [x, self.const(np.array(offset, np.uint8))], direction="LEFT"
                )
            total = x if total is None else self.op("Add", [total, x])
        return total


def _act_dtype(node: ir.Node) -> np.dtype:
    if node.op_type == OP_GATHER:
        dt = node.attributes.get("dtype")
        return np.dtype(np.float16) if dt is not None and dt.value == 10 else np.dtype(np.float32)
    dtype = node.outputs[0].dtype or node.inputs[0].dtype or ir.DataType.FLOAT
    return np.dtype(dtype.numpy())


def _ir_dtype(dtype: np.dtype) -> ir.DataType:
    return ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT


def _encode(b: _Builder, name: str, q: QuantizedWeight, nbits: bool, act: np.dtype) -> _Encoded:
    f = q.fmt

    def planes(values, bits, what):
        return [
            (off, w, b.initializer(f"{name}.{what}" + ("" if w == bits else f".bits{off}"), p))
            for off, w, p in bit_planes(values, bits)
        ]

    codes = planes(_stored_codes(q), f.bits, "codes")
    zp = None if q.zero_points is None else planes(q.zero_points, f.bits, "zero_points")
    sub = None
    if nbits:
        scales = b.initializer(f"{name}.scales", q.scales.astype(act))
    elif f.hierarchical:
        scales = b.initializer(f"{name}.super_scales", q.super_scales.astype(q.scale_dtype))
        sub = planes(q.sub_scales, f.scale_bits, "sub_scales")
    else:
        scales = b.initializer(f"{name}.scales", q.scales.astype(q.scale_dtype))
    cb = None
    if q.codebook is not None:
        cb = b.initializer(f"{name}.codebook", q.codebook.astype(q.scale_dtype))
    ins = None
    if q.input_scale is not None:
        ins = b.initializer(f"{name}.input_scale", q.input_scale.astype(q.scale_dtype))
    is_float = scales.const_value.dtype == ir.DataType.FLOAT
    return _Encoded(q, nbits, codes, scales, zp, sub, cb, ins, is_float)


def _dequant_rows(b: _Builder, e: _Encoded, rows: ir.Value | None) -> ir.Value:
    """float32 rows [M, K] of the table E = W^T (all N rows when ``rows`` is None; otherwise the
    rows a flat int index tensor selects), input scale not applied."""
    f, q = e.q.fmt, e.q
    FLOAT = ir.DataType.FLOAT

    def take(v):
        return v if rows is None else b.op("Gather", [v, rows], axis=0)

    G = f.n_groups
    S = -(-f.group // K_ALIGN) * K_ALIGN
    code = b.unpack([(o, w, take(p)) for o, w, p in e.planes], 3, None)  # [M, G, S]
    if q.codebook is not None:
        if q.codebook.shape[0] == 1:
            flat = b.reshape(b.cast(e.codebook, FLOAT), [-1])
            vals = b.op("Gather", [flat, b.cast(code, ir.DataType.INT64)], axis=0)
        else:
            table = b.cast(take(e.codebook), FLOAT)  # [M, L]
            idx = b.reshape(b.cast(code, ir.DataType.INT64), [0, -1])
            vals = b.reshape(b.op("GatherElements", [table, idx], axis=1), [0, G, S])
    else:
        vals = b.cast(code, FLOAT)
        if e.zero_points is not None:
            zp = b.unpack([(o, w, take(p)) for o, w, p in e.zero_points], 2, G)
            z = b.reshape(b.cast(zp, FLOAT), [0, 0, 1])
        else:
            z = b.const(np.array(1 << (f.bits - 1), np.float32))
        vals = b.op("Sub", [vals, z])
    if e.sub_scales is not None:
        sup = b.reshape(b.cast(take(e.scales), FLOAT), [0, 0, 1])  # [M, SG, 1]
        sup = b.op("Tile", [sup, b.const(np.array([1, 1, f.super_group], np.int64))])
        sup = b.reshape(sup, [0, -1])
        if f.n_super * f.super_group != G:
            sup = b.slice_last(sup, G)
        sub = b.cast(b.unpack([(o, w, take(p)) for o, w, p in e.sub_scales], 2, G), FLOAT)
        sub = b.op("Add", [sub, b.const(np.array(1, np.float32))])
        scales = b.op("Mul", [sup, sub])  # exact: fp16 * integer <= 256 fits float32
    else:
        scales = take(e.scales)
        if not e.scales_float:
            scales = b.cast(scales, FLOAT)
    vals = b.op("Mul", [vals, b.reshape(scales, [0, 0, 1])])
    w = b.reshape(vals, [0, -1])  # [M, G*S]
    if G * S != f.K:
        w = b.slice_last(w, f.K)
    return w


def _matmul_body(b: _Builder, e: _Encoded, a: ir.Value, act: np.dtype, bias) -> ir.Value:
    """Y = (A * input_scale) @ W (+ bias) with W unpacked from ``e``."""
    act_ir = _ir_dtype(act)
    if e.input_scale is not None:
        a = b.op("Mul", [a, b.cast(e.input_scale, act_ir)])
    w = b.op("Transpose", [_dequant_rows(b, e, None)], perm=[1, 0])
    if act != np.float32:
        w = b.cast(w, act_ir)
    y = b.op("MatMul", [a, w])
    return y if bias is None else b.op("Add", [y, bias])


def _gather_body(b: _Builder, e: _Encoded, indices: ir.Value, act: np.dtype) -> ir.Value:
    """Rows ``indices`` of the table E = W^T, shape [*indices.shape, K]."""
    rows = _dequant_rows(b, e, b.reshape(indices, [-1]))  # [M, K] float32
    if e.input_scale is not None:
        rows = b.op("Mul", [rows, b.cast(e.input_scale, ir.DataType.FLOAT)])
    if act != np.float32:
        rows = b.cast(rows, _ir_dtype(act))
    k = b.const(np.array([e.q.fmt.K], np.int64))
    shape = b.op("Concat", [b.op("Shape", [indices]), k], axis=0)
    return b.op("Reshape", [rows, shape])


class _Functions:
    """Model-local functions, one per distinct (op, weight signature): the unpacking subgraph
    is stored once per shape instead of once per weight."""

    def __init__(self, model: ir.Model, opset: int):
        self.model = model
        self.opset = opset
        self.made: dict[tuple, str] = {}

    def call(self, kind: str, e: _Encoded, first: ir.Value, act: np.dtype, bias) -> ir.Node:
        key = (kind, e.signature(), act.str, bias is not None)
        if key not in self.made:
            name = f"{kind}{len(self.made)}"
            b = _Builder(None, self.opset, prefix="n")
            x = ir.Value(name="x")
            params = [ir.Value(name=f"t{i}") for i in range(len(e.tensors()))]
            fe = e.with_tensors(params)
            bias_in = [ir.Value(name="bias")] if bias is not None else []
            if kind == "matmul":
                y = _matmul_body(b, fe, x, act, bias_in[0] if bias_in else None)
            else:
                y = _gather_body(b, fe, x, act)
            y.name = "y"
            graph = ir.Graph(
                [x, *params, *bias_in],
                [y],
                nodes=b.nodes,
                opset_imports={"": self.opset},
                name=name,
            )
            func = ir.Function(FUNCTION_DOMAIN, name, "", graph=graph, attributes=[])
            self.model.functions[func.identifier()] = func
            self.model.opset_imports.setdefault(FUNCTION_DOMAIN, 1)
            self.made[key] = name
        inputs = [first, *e.tensors(), *([bias] if bias is not None else [])]
        return ir.node(self.made[key], inputs, domain=FUNCTION_DOMAIN)


def to_portable(
    model: ir.Model, *, accuracy_level: int | None = None, max_growth: float = MAX_GROWTH
) -> PortableReport:
    """Replace every QuantX node of ``model`` (in place) by stock ONNX Runtime operators; see
    the module docstring. ``accuracy_level`` overrides the MatMulNBits nodes' (default: each
    QuantX node's own)."""
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < 13:
        raise InputError(f"portable form needs ONNX opset >= 13 (the model has {opset})")
    b = _Builder(graph, opset)
    functions = _Functions(model, opset)
    report = PortableReport()
    nodes = [n for n in graph if n.domain == DOMAIN]
    n_weight = len(TENSOR_ORDER)
    # one encoding per packed weight (a tied lm_head and its embedding lookup share it)
    users: dict[tuple, list[ir.Node]] = {}
    for node in nodes:
        if node.op_type not in (OP_MATMUL, OP_GATHER):
            raise InputError(f"{node.name}: unknown QuantX op {node.op_type}")
        key = tuple(id(v) for v in node.inputs[1 : 1 + n_weight])
        users.setdefault(key, []).append(node)
    encoded: dict[tuple, _Encoded] = {}
    for key, group in users.items():
        first = group[0]
        q = node_weight(first)
        report.packed_bytes_before += sum(
            v.const_value.nbytes for v in first.inputs[1 : 1 + n_weight] if v is not None
        )
        acts = {_act_dtype(n) for n in group if n.op_type == OP_MATMUL}
        act = next(iter(acts)) if acts else _act_dtype(first)
        nbits = len(acts) == 1 and _nbits_eligible(q, act, max_growth)
        name = first.inputs[1].name or first.name
        for suffix in (".B", "/B", "_B"):
            name = name.removesuffix(suffix)
        e = _encode(b, name, q, nbits, act)
        encoded[key] = e
        report.packed_bytes_after += sum(v.const_value.nbytes for v in e.tensors())

    for i, node in enumerate(nodes):
        e = encoded[tuple(id(v) for v in node.inputs[1 : 1 + n_weight])]
        f = e.q.fmt
        b.prefix = f"qxp{i}"
        act = _act_dtype(node)
        act_ir = _ir_dtype(act)
        if node.op_type == OP_MATMUL:
            a = node.inputs[0]
            bias = node.inputs[1 + n_weight] if len(node.inputs) > 1 + n_weight else None
            if bias is not None and bias.dtype not in (None, act_ir):
                bias = b.cast(bias, act_ir)
            if e.nbits:
                if e.input_scale is not None:
                    a = b.op("Mul", [a, b.cast(e.input_scale, act_ir)])
                level = node.attributes.get("accuracy_level")
                if accuracy_level is not None:
                    level = accuracy_level
                else:
                    level = 0 if level is None else level.value
                ((_, _, packed),) = e.planes
                zp = e.zero_points[0][2] if e.zero_points else None
                y = b.op(
                    "MatMulNBits",
                    [a, packed, e.scales, zp, None, bias],
                    domain=MS_DOMAIN,
                    K=f.K,
                    N=f.N,
                    bits=f.bits,
                    block_size=f.group,
                    accuracy_level=int(level),
                )
                report.matmulnbits += 1
            else:
                call = functions.call("matmul", e, a, act, bias)
                b.nodes.append(call)
                y = call.outputs[0]
                report.subgraph += 1
        else:
            call = functions.call("gather", e, node.inputs[0], act, None)
            b.nodes.append(call)
            y = call.outputs[0]
            report.gathers += 1
        for n in b.nodes:
            n.name = n.name or f"{node.name}/portable"
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], b.take_nodes(), [node.outputs[0]], [y]
        )
    import onnx_ir.passes.common as common_passes

    common_passes.RemoveUnusedNodesPass()(model)
    model.opset_imports.pop(DOMAIN, None)
    if report.matmulnbits:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return report


def convert(
    model: str | Path,
    output: str | Path,
    *,
    accuracy_level: int | None = None,
    max_growth: float = MAX_GROWTH,
) -> PortableReport:
    """Portable form of the QuantX model ``model`` (a .onnx file or an export folder) written
    to ``output`` (a .onnx path, or a folder; an export folder's companion files are copied)."""
    start = time.perf_counter()
    source = model_io.resolve_input(model)
    out_model = model_io.check_output(source, Path(output))
    in_files = [source.model_path, *model_io.external_data_files(source.model_path)]
    ir_model = model_io.load_model(source)
    if not any(n.domain == DOMAIN for n in ir_model.graph):
        raise InputError(f"{source.model_path}: not a QuantX model (no {DOMAIN} nodes)")
    try:
        report = to_portable(ir_model, accuracy_level=accuracy_level, max_growth=max_growth)
    except ValueError as e:  # format violations in the packed tensors
        raise InputError(f"{source.model_path}: {e}") from e
    with model_io.staged_output(out_model) as stage:
        staged = stage / out_model.name
        model_io.save_model(ir_model, staged, external=source.uses_external_data or None)
        report.copied = model_io.copy_companions(source, stage)
        report.bytes_after = sum(
            f.stat().st_size for f in stage.iterdir() if f.name.startswith(out_model.name)
        )
    report.bytes_before = sum(p.stat().st_size for p in in_files if p.is_file())
    report.input, report.output = str(source.model_path), str(out_model)
    report.seconds = time.perf_counter() - start
    return report
