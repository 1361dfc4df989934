"""Portable form of a QuantX model: runs on stock ONNX Runtime, no QuantX library.

Every ``com.quantx`` node is replaced by operators ONNX Runtime ships; the file keeps the weights
packed (3 bits stay 3 bits):

- **MatMulNBits** (``com.microsoft``) for every uniform grid with groups of 16..256 (a power of
  two; per-channel when K is one). 2, 4 and 8-bit codes are stored as MatMulNBits' ``B`` and
  packed ``zero_points`` directly: byte for byte QuantX's ROW layout (docs/FORMAT.md section 3).
  ORT 1.32's MatMulNBits accepts only 2, 4 and 8 bits (3 is rejected when the session loads), so
  3-bit codes are stored as two bit planes (the low 2 bits and bit 2, each packed LSB-first:
  exactly 3 bits a code) and turned into 4-bit ``B`` by a small constant subgraph (two table
  lookups and an ``Add``) that ONNX Runtime folds when it creates the session: in memory
  the weight is an ordinary 4-bit MatMulNBits. Their zero points are stored as MatMulNBits'
  4-bit ones (1/group bits a weight more). Scales stay in their stored fp16; a folded ``Cast``
  (and for hierarchical scales ``Tile``/unpack/``Mul``: ``super * (sub + 1)`` of an fp16
  super-scale and an integer <= 256 is exact in float32) gives MatMulNBits the activation type.
- a **standard-op subgraph** for the rest (codebooks, groups that are not a power of two or
  above 256): codes, zero points and sub-scales as bit planes (a ``b``-bit value split into
  8/4/2/1-bit planes by the binary digits of ``b``), scales and codebooks in fp16;
  ``BitShift`` + ``BitwiseAnd`` (``Mod`` before opset 18) unpack, ``Cast``/``Sub``/``Mul``
  (``Gather``/``GatherElements`` for a codebook) dequantize, a ``MatMul`` follows. ORT folds
  the weight's subgraph at load: float weights in memory, float MatMul speed.
- ``QxGather`` becomes ``Gather`` of the packed rows followed by the same unpacking, so the
  embedding table stays packed in memory too.
- ``input_scale`` becomes a ``Mul`` of the activation before the product (of the gathered rows
  for a lookup); the bias an input of MatMulNBits or an ``Add``.

The subgraphs live in model-local functions (domain ``quantx.portable``, one per op kind and
weight shape), which ORT inlines. On the float path (``accuracy_level`` 0) the result is
exactly the dequantized weights of :func:`quantx_onnx.reference.dequantized_model`. MatMulNBits
nodes keep each QuantX node's ``accuracy_level`` unless told otherwise (4: ORT quantizes
activations to int8 its own way: close to QuantX's int8 path, not the same).
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
    WeightFormat,
    pack_bits,
)
from .genai import CONFIG_NAME as GENAI_CONFIG
from .genai import write_genai_config
from .passes.multi_matmul_rule import split_multi_matmuls
from .passes.qx_attention_rule import restore_attention
from .reference import node_weight
from .runtime import _LIB_NAME

MS_DOMAIN = "com.microsoft"
NBITS_BITS = (2, 4, 8)  # what ORT 1.32's MatMulNBits accepts (its constructor rejects 3)
NBITS_BLOCKS = (16, 32, 64, 128, 256)


@dataclasses.dataclass
class PortableReport:
    input: str | None = None
    output: str | None = None
    matmulnbits: int = 0  # QxMatMul -> MatMulNBits
    repacked: int = 0  # of which 3-bit, repacked to 4-bit codes when the session loads
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
            f"  {self.matmulnbits} MatMulNBits ({self.repacked} from 3-bit planes), "
            f"{self.subgraph} unpack+MatMul, "
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


def _nbits_eligible(q: QuantizedWeight, act: np.dtype) -> bool:
    """MatMulNBits computes this weight exactly: a uniform grid, a block size it accepts (3-bit
    codes are repacked to 4 bits when the session loads), scales exact in the activation type
    (hierarchical scales of an fp16 model may not be)."""
    f = q.fmt
    if q.codebook is not None or f.bits not in (*NBITS_BITS, 3) or f.group not in NBITS_BLOCKS:
        return False
    if act not in (np.float32, np.float16):
        return False
    return np.array_equal(q.scales.astype(act).astype(np.float32), q.scales)


@dataclasses.dataclass
class _Encoded:
    """The stored tensors of one weight in portable form (or, inside a function body, the
    function inputs standing for them)."""

    fmt: WeightFormat
    shared_codebook: bool | None  # None: no codebook; True: one row for all columns
    nbits: bool
    planes: list[tuple[int, int, ir.Value]]  # codes [N, G, S*w/8] per plane
    scales: ir.Value  # [N, G], or super-scales [N, SG] (hierarchical), as QuantX stores them
    zero_points: list[tuple[int, int, ir.Value]] | None  # [N, ceil(G*w/8)] per plane
    sub_scales: list[tuple[int, int, ir.Value]] | None
    codebook: ir.Value | None
    input_scale: ir.Value | None
    scales_float: bool  # scales stored as float32 (no Cast needed)

    def tensors(self, extras: bool = True) -> list[ir.Value]:
        """Stored tensors in function-input order (``extras``: codebook and input scale too)."""
        out = [p for _, _, p in self.planes] + [self.scales]
        out += [p for _, _, p in self.zero_points or ()]
        out += [p for _, _, p in self.sub_scales or ()]
        if extras:
            out += [v for v in (self.codebook, self.input_scale) if v is not None]
        return out

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
        f = self.fmt
        return (
            f.K,
            f.N,
            f.bits,
            f.group,
            f.scale_bits,
            f.super_group,
            self.zero_points is not None,
            self.shared_codebook,
            self.input_scale is not None,
            self.scales_float,
            *(tuple((o, w) for o, w, _ in ps or ()) for ps in (self.zero_points, self.sub_scales)),
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


def _encode(b: _Builder, name: str, q: QuantizedWeight, nbits: bool) -> _Encoded:
    f = q.fmt

    def planes(values, bits, what):
        return [
            (off, w, b.initializer(f"{name}.{what}" + ("" if w == bits else f".bits{off}"), p))
            for off, w, p in bit_planes(values, bits)
        ]

    codes = planes(_stored_codes(q), f.bits, "codes")
    zp = None
    if q.zero_points is not None and nbits and f.bits == 3:
        # MatMulNBits' own packed 4-bit zero points: 1/group bits a weight more, no unpacking
        zp = [(0, 4, b.initializer(f"{name}.zero_points", pack_bits(q.zero_points, 4)))]
    elif q.zero_points is not None:
        zp = planes(q.zero_points, f.bits, "zero_points")
    sub = None
    if f.hierarchical:
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
    shared = None if q.codebook is None else q.codebook.shape[0] == 1
    return _Encoded(f, shared, nbits, codes, scales, zp, sub, cb, ins, is_float)


def _dequant_rows(b: _Builder, e: _Encoded, rows: ir.Value | None) -> ir.Value:
    """float32 rows [M, K] of the table E = W^T (all N rows when ``rows`` is None; otherwise the
    rows a flat int index tensor selects), input scale not applied."""
    f, FLOAT = e.fmt, ir.DataType.FLOAT

    def take(v):
        return v if rows is None else b.op("Gather", [v, rows], axis=0)

    G = f.n_groups
    S = -(-f.group // K_ALIGN) * K_ALIGN
    code = b.unpack([(o, w, take(p)) for o, w, p in e.planes], 3, None)  # [M, G, S]
    if e.codebook is not None:
        if e.shared_codebook:
            flat = b.reshape(b.cast(e.codebook, FLOAT), [-1])
            vals = b.op("Gather", [flat, b.cast(code, ir.DataType.INT32)], axis=0)
        else:
            table = b.cast(take(e.codebook), FLOAT)  # [M, L]
            idx = b.reshape(b.cast(code, ir.DataType.INT32), [0, -1])
            vals = b.reshape(b.op("GatherElements", [table, idx], axis=1), [0, G, S])
    else:
        vals = b.cast(code, FLOAT)
        if e.zero_points is not None:
            zp = b.unpack([(o, w, take(p)) for o, w, p in e.zero_points], 2, G)
            z = b.reshape(b.cast(zp, FLOAT), [0, 0, 1])
        else:
            z = b.const(np.array(1 << (f.bits - 1), np.float32))
        vals = b.op("Sub", [vals, z])
    vals = b.op("Mul", [vals, b.reshape(_scales(b, e, take), [0, 0, 1])])
    w = b.reshape(vals, [0, -1])  # [M, G*S]
    if G * S != f.K:
        w = b.slice_last(w, f.K)
    return w


def _scales(b: _Builder, e: _Encoded, take=lambda v: v) -> ir.Value:
    """float32 effective scales [M, G] (hierarchical ones expanded)."""
    f, FLOAT = e.fmt, ir.DataType.FLOAT
    G = f.n_groups
    if e.sub_scales is None:
        return take(e.scales) if e.scales_float else b.cast(take(e.scales), FLOAT)
    sup = b.reshape(b.cast(take(e.scales), FLOAT), [0, 0, 1])  # [M, SG, 1]
    sup = b.op("Tile", [sup, b.const(np.array([1, 1, f.super_group], np.int64))])
    sup = b.reshape(sup, [0, -1])
    if f.n_super * f.super_group != G:
        sup = b.slice_last(sup, G)
    sub = b.cast(b.unpack([(o, w, take(p)) for o, w, p in e.sub_scales], 2, G), FLOAT)
    sub = b.op("Add", [sub, b.const(np.array(1, np.float32))])
    return b.op("Mul", [sup, sub])  # exact: fp16 * integer <= 256 fits float32


def _lut_3bit() -> tuple[np.ndarray, np.ndarray]:
    """Byte -> 4-bit packed bytes: a byte of the low 2-bit plane (4 codes) gives 2 bytes of their
    low bits, a byte of the high 1-bit plane (8 codes) 4 bytes of their bit 2."""
    v = np.arange(256, dtype=np.uint8)[:, None]
    two = (v >> np.arange(0, 8, 2, dtype=np.uint8)) & 3  # [256, 4]
    one = (v >> np.arange(8, dtype=np.uint8)) & 1  # [256, 8]
    low = (two[:, 0::2] | two[:, 1::2] << 4).astype(np.uint8)
    high = (one[:, 0::2] << 2 | one[:, 1::2] << 6).astype(np.uint8)
    return low, high


def _repack_3bit(b: _Builder, planes, luts) -> ir.Value:
    """MatMulNBits' 4-bit B [N, G, S/2] from the 2-bit and 1-bit code planes, by two table
    lookups (few, small intermediates: ONNX Runtime folds this for every weight at load).
    ``luts``: the tables of :func:`_lut_3bit` (inputs shared by every function)."""
    (_, _, low), (_, _, high) = planes
    lut_low, lut_high = luts
    INT32 = ir.DataType.INT32
    low = b.op("Gather", [lut_low, b.cast(low, INT32)], axis=0)  # [N, G, S/4, 2]
    high = b.op("Gather", [lut_high, b.cast(high, INT32)], axis=0)  # [N, G, S/8, 4]
    both = b.op("Add", [b.reshape(low, [0, 0, -1, 4]), high])
    return b.reshape(both, [0, 0, -1])


def _nbits_inputs(b: _Builder, e: _Encoded, act: np.dtype, luts) -> list[ir.Value]:
    """MatMulNBits' scales in the activation type, and for 3-bit codes the 4-bit B (and the
    zero points 4 of a symmetric grid): constant subgraphs ORT folds when it loads the model."""
    f = e.fmt
    scales = _scales(b, e)
    if act != np.float32:
        scales = b.cast(scales, _ir_dtype(act))
    if f.bits != 3:
        return [scales]
    out = [scales, _repack_3bit(b, e.planes, luts)]
    if e.zero_points is None:  # symmetric 3-bit: z = 4 (MatMulNBits' 4-bit default is 8)
        shape = b.const(np.array([f.N, -(-f.n_groups // 2)], np.int64))
        out.append(b.op("Expand", [b.const(np.array(0x44, np.uint8)), shape]))
    return out


def _dequant_kn(b: _Builder, e: _Encoded) -> ir.Value:
    """float32 W [K, N] (input scale not applied). Like :func:`_dequant_rows` over every row,
    but the codes are transposed while still bytes: ORT folds this into the weight at load and
    keeps every intermediate until it is done, so float temporaries are the cost to avoid."""
    f, FLOAT = e.fmt, ir.DataType.FLOAT
    G, S = f.n_groups, -(-f.group // K_ALIGN) * K_ALIGN
    code = b.unpack(e.planes, 3, None)  # [N, G, S]
    code = b.op("Transpose", [code], perm=[1, 2, 0])  # [G, S, N]
    if e.codebook is not None:
        flat = b.reshape(b.cast(e.codebook, FLOAT), [-1])
        idx = b.cast(code, ir.DataType.INT32)
        if not e.shared_codebook:  # row n of the codebook: entries n*L .. n*L + L-1
            offsets = np.arange(f.N, dtype=np.int32) * f.code_levels
            idx = b.op("Add", [idx, b.const(offsets)])
        vals = b.op("Gather", [flat, idx], axis=0)
    else:
        vals = b.cast(code, FLOAT)
        if e.zero_points is not None:
            zp = b.unpack(e.zero_points, 2, G)  # [N, G]
            z = b.op("Transpose", [b.cast(zp, FLOAT)], perm=[1, 0])
        else:
            z = b.const(np.array(1 << (f.bits - 1), np.float32))
        vals = b.op("Sub", [vals, b.reshape(z, [G, 1, f.N]) if e.zero_points else z])
    scales = b.op("Transpose", [_scales(b, e)], perm=[1, 0])  # [G, N]
    vals = b.op("Mul", [vals, b.reshape(scales, [G, 1, f.N])])
    w = b.reshape(vals, [G * S, f.N])
    if G * S != f.K:
        c = b.const
        w = b.op("Slice", [w, c(np.array([0])), c(np.array([f.K])), c(np.array([0]))])
    return w


def _matmul_body(b: _Builder, e: _Encoded, a: ir.Value, act: np.dtype, bias) -> ir.Value:
    """Y = (A * input_scale) @ W (+ bias) with W unpacked from ``e``."""
    act_ir = _ir_dtype(act)
    if e.input_scale is not None:
        a = b.op("Mul", [a, b.cast(e.input_scale, act_ir)])
    w = _dequant_kn(b, e)
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
    k = b.const(np.array([e.fmt.K], np.int64))
    shape = b.op("Concat", [b.op("Shape", [indices]), k], axis=0)
    return b.op("Reshape", [rows, shape])


class _Functions:
    """Model-local functions, one per distinct (op, weight signature): the unpacking subgraph
    is stored once per shape instead of once per weight."""

    def __init__(self, model: ir.Model, opset: int, main: _Builder):
        self.model = model
        self.opset = opset
        self.made: dict[tuple, str] = {}
        self.main = main  # the main graph's builder: shared constant inputs

    def call(self, kind: str, e: _Encoded, act: np.dtype, first=None, bias=None) -> ir.Node:
        """A call of the ``kind`` function (matmul: Y from A; gather: rows from indices;
        nbits: MatMulNBits' inputs) over the stored tensors of ``e``."""
        extras = kind != "nbits"
        repack = kind == "nbits" and e.fmt.bits == 3
        key = (kind, e.signature(), act.str, bias is not None)
        if key not in self.made:
            name = f"{kind}{len(self.made)}"
            b = _Builder(None, self.opset, prefix="n")
            x = [ir.Value(name="x")] if first is not None else []
            params = [ir.Value(name=f"t{i}") for i in range(len(e.tensors(extras)))]
            if not extras:
                params += [None] * (len(e.tensors()) - len(params))
            fe = e.with_tensors(params)
            params = [p for p in params if p is not None]
            bias_in = [ir.Value(name="bias")] if bias is not None else []
            luts = [ir.Value(name="lut_low"), ir.Value(name="lut_high")] if repack else []
            if kind == "matmul":
                ys = [_matmul_body(b, fe, x[0], act, bias_in[0] if bias_in else None)]
            elif kind == "gather":
                ys = [_gather_body(b, fe, x[0], act)]
            else:
                ys = _nbits_inputs(b, fe, act, luts)
            for i, y in enumerate(ys):
                y.name = f"y{i}"
            graph = ir.Graph(
                [*x, *params, *bias_in, *luts],
                ys,
                nodes=b.nodes,
                opset_imports={"": self.opset},
                name=name,
            )
            func = ir.Function(FUNCTION_DOMAIN, name, "", graph=graph, attributes=[])
            self.model.functions[func.identifier()] = func
            self.model.opset_imports.setdefault(FUNCTION_DOMAIN, 1)
            self.made[key] = name
        func = self.model.functions[(FUNCTION_DOMAIN, self.made[key], "")]
        inputs = [*([first] if first is not None else []), *e.tensors(extras)]
        inputs += [bias] if bias is not None else []
        if repack:
            inputs += [self.main.const(t) for t in _lut_3bit()]
        return ir.node(
            self.made[key], inputs, domain=FUNCTION_DOMAIN, num_outputs=len(func.outputs)
        )


def to_portable(model: ir.Model, *, accuracy_level: int | None = None) -> PortableReport:
    """Replace every QuantX node of ``model`` (in place) by stock ONNX Runtime operators; see
    the module docstring. ``accuracy_level`` overrides the MatMulNBits nodes' (default: each
    QuantX node's own)."""
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < 13:
        raise InputError(f"portable form needs ONNX opset >= 13 (the model has {opset})")
    split_multi_matmuls(model)  # each weight converts on its own
    restore_attention(model)  # stock ONNX Runtime's GroupQueryAttention
    b = _Builder(graph, opset)
    functions = _Functions(model, opset, b)
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
        if q.fmt.rotate:
            raise InputError(
                f"{first.name}: its weight is stored rotated (attribute rotate=1), which stock "
                "ONNX Runtime cannot compute; optimize the model with --no-rotate for --portable"
            )
        report.packed_bytes_before += sum(
            v.const_value.nbytes for v in first.inputs[1 : 1 + n_weight] if v is not None
        )
        acts = {_act_dtype(n) for n in group if n.op_type == OP_MATMUL}
        act = next(iter(acts)) if acts else _act_dtype(first)
        nbits = len(acts) == 1 and _nbits_eligible(q, act)
        name = first.inputs[1].name or first.name
        for suffix in (".B", "/B", "_B"):
            name = name.removesuffix(suffix)
        e = _encode(b, name, q, nbits)
        encoded[key] = e
        report.packed_bytes_after += sum(v.const_value.nbytes for v in e.tensors())

    for i, node in enumerate(nodes):
        e = encoded[tuple(id(v) for v in node.inputs[1 : 1 + n_weight])]
        f = e.fmt
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
                zp = e.zero_points[0][2] if e.zero_points else None
                packed = e.planes[0][2]
                if (
                    f.bits == 3
                    or not e.scales_float
                    or e.sub_scales is not None
                    or act_ir != (ir.DataType.FLOAT)
                ):
                    prep = functions.call("nbits", e, act)
                    b.nodes.append(prep)
                    scales = prep.outputs[0]
                    if f.bits == 3:
                        packed = prep.outputs[1]
                        zp = zp if zp is not None else prep.outputs[2]
                        report.repacked += 1
                else:
                    scales = e.scales
                y = b.op(
                    "MatMulNBits",
                    [a, packed, scales, zp, None, bias],
                    domain=MS_DOMAIN,
                    K=f.K,
                    N=f.N,
                    bits=4 if f.bits == 3 else f.bits,
                    block_size=f.group,
                    accuracy_level=int(level),
                )
                report.matmulnbits += 1
            else:
                call = functions.call("matmul", e, act, a, bias)
                b.nodes.append(call)
                y = call.outputs[0]
                report.subgraph += 1
        else:
            call = functions.call("gather", e, act, node.inputs[0])
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
        report = to_portable(ir_model, accuracy_level=accuracy_level)
    except ValueError as e:  # format violations in the packed tensors
        raise InputError(f"{source.model_path}: {e}") from e
    with model_io.staged_output(out_model) as stage:
        staged = stage / out_model.name
        model_io.save_model(ir_model, staged, external=source.uses_external_data or None)
        report.copied = model_io.copy_companions(source, stage)
        # what optimize wrote for onnxruntime-genai named the QuantX library: write it anew
        for name in (_LIB_NAME, GENAI_CONFIG):
            if name in report.copied:
                (stage / name).unlink()
                report.copied.remove(name)
        if source.folder is not None:
            write_genai_config(stage, ir_model, out_model.name)
        report.bytes_after = sum(
            f.stat().st_size for f in stage.iterdir() if f.name.startswith(out_model.name)
        )
    report.bytes_before = sum(p.stat().st_size for p in in_files if p.is_file())
    report.input, report.output = str(source.model_path), str(out_model)
    report.seconds = time.perf_counter() - start
    return report
