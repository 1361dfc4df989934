"""The main graph's nodes and outputs of an ONNX file, read without its weights.

``onnx.load`` parses every initializer held in the file: for a QuantX decoder that is the
whole model again (62 MB for SmolLM2) on top of what ONNX Runtime already holds, which raised a
generation run's peak memory by 70 MB just to look at a few node types. This reads the
protobuf wire format over a memory map instead and skips the initializers by their lengths, so
only the bytes of the node and output records are touched.

``appends_kv_in_place`` says from an outline (of a file, or of a model in memory:
``outline_of``) whether its attention can append to a shared KV buffer.

ModelProto.graph is field 7; in GraphProto, node is field 1 and output field 12; in NodeProto,
output is field 2, op_type field 4 and domain field 7; in ValueInfoProto, name is field 1.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from .format import DOMAIN
from .passes.qx_attention_rule import MS_DOMAIN, OP_ORT, OP_QX

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


@dataclasses.dataclass(frozen=True)
class NodeOutline:
    op_type: str
    domain: str
    outputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GraphOutline:
    nodes: tuple[NodeOutline, ...]
    outputs: tuple[str, ...]


def outline_of(model: ir.Model) -> GraphOutline:
    """The same outline of a model already in memory."""
    graph = model.graph
    nodes = (NodeOutline(n.op_type, n.domain, tuple(v.name for v in n.outputs)) for n in graph)
    return GraphOutline(tuple(nodes), tuple(v.name for v in graph.outputs))


# The attention ops that read the valid length from the mask and append in place (QuantX's has
# GroupQueryAttention's contract).
_IN_PLACE_ATTENTION = {(MS_DOMAIN, OP_ORT), (DOMAIN, OP_QX)}


def appends_kv_in_place(graph: GraphOutline) -> bool:
    """Every present output comes straight from a GroupQueryAttention node (or QuantX's, with
    its contract), which can append to a past buffer in place: onnxruntime-genai's
    past_present_share_buffer, and ``llm.KVCache``'s shared cache."""
    presents = {name for name in graph.outputs if name.startswith("present.")}
    written = {
        out
        for node in graph.nodes
        if (node.domain, node.op_type) in _IN_PLACE_ATTENTION
        for out in node.outputs[1:3]
    }
    return bool(presents) and presents <= written


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field in buf[start:end]; other
    wire types are skipped."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == _VARINT:
            _, i = _varint(buf, i)
        elif wire == _FIXED64:
            i += 8
        elif wire == _FIXED32:
            i += 4
        elif wire == _BYTES:
            n, i = _varint(buf, i)
            yield key >> 3, i, i + n
            i += n
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
    if i != end:
        raise ValueError("a protobuf record runs past its end")


def _text(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8")


def _node(buf, start: int, end: int) -> NodeOutline:
    outputs, op_type, domain = [], "", ""
    for field, a, b in _fields(buf, start, end):
        if field == 2:
            outputs.append(_text(buf, a, b))
        elif field == 4:
            op_type = _text(buf, a, b)
        elif field == 7:
            domain = _text(buf, a, b)
    return NodeOutline(op_type, domain, tuple(outputs))


def read_graph_outline(path: str | Path) -> GraphOutline:
    """The main graph's nodes (op type, domain, outputs) and output names of the model file
    at ``path``. Raises ValueError for a file that is not a well-formed ModelProto."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        view = memoryview(buf)
        try:
            graphs = [(a, b) for field, a, b in _fields(view, 0, len(view)) if field == 7]
            if len(graphs) != 1:
                raise ValueError(f"{len(graphs)} graph records")
            nodes, outputs = [], []
            for field, a, b in _fields(view, *graphs[0]):
                if field == 1:
                    nodes.append(_node(view, a, b))
                elif field == 12:
                    name = next(
                        (_text(view, c, d) for f2, c, d in _fields(view, a, b) if f2 == 1), ""
                    )
                    outputs.append(name)
            return GraphOutline(tuple(nodes), tuple(outputs))
        except IndexError:
            raise ValueError("the file ends inside a protobuf record") from None
        finally:
            view.release()
