"""graph_outline: the nodes and outputs read from the protobuf wire format without the weights
equal onnx.load's; a damaged file is refused."""

from __future__ import annotations

import onnx
import pytest

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.graph_outline import appends_kv_in_place, outline_of, read_graph_outline


def _onnx_outline(path):
    graph = onnx.load(str(path)).graph
    nodes = [(n.op_type, n.domain, tuple(n.output)) for n in graph.node]
    return nodes, tuple(o.name for o in graph.output)


def test_outline_equals_onnx_load(tiny_llama, tmp_path):
    optimize(tiny_llama, tmp_path / "q", QuantConfig(data_free=True, bits=3))
    for path in (tiny_llama / "model.onnx", tmp_path / "q" / "model.onnx"):
        got = read_graph_outline(path)
        nodes, outputs = _onnx_outline(path)
        assert [(n.op_type, n.domain, n.outputs) for n in got.nodes] == nodes
        assert got.outputs == outputs
    ops = {n.op_type for n in read_graph_outline(tmp_path / "q" / "model.onnx").nodes}
    assert {"QxGroupQueryAttention", "QxMultiMatMul", "QxGather"} <= ops


def test_outline_of_a_model_in_memory_and_kv_appends(tiny_llama, tmp_path):
    """outline_of gives the file's outline; only the fused graph appends its KV in place."""
    import onnx_ir as ir

    optimize(tiny_llama, tmp_path / "q", QuantConfig(data_free=True, bits=3))
    for path, fused in ((tiny_llama / "model.onnx", False), (tmp_path / "q" / "model.onnx", True)):
        outline = read_graph_outline(path)
        assert outline_of(ir.load(str(path))) == outline
        assert appends_kv_in_place(outline) is fused


def test_damaged_file_is_refused(tiny_llama, tmp_path):
    data = (tiny_llama / "model.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        read_graph_outline(cut)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x0f" * 64)  # wire type 7 does not exist
    with pytest.raises(ValueError, match="wire type"):
        read_graph_outline(junk)
