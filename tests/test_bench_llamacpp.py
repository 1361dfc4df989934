"""bench llamacpp's pieces that need no llama.cpp build: the bytes a decoded token reads, and
the cached build being reused."""

from __future__ import annotations

import onnx

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.bench import llamacpp


def test_quantx_token_bytes(tiny_llama, tmp_path):
    q = tmp_path / "q"
    optimize(tiny_llama, q, QuantConfig(data_free=True, accuracy_level=4))
    proto = onnx.load(str(q / "model.onnx"), load_external_data=False)
    sizes = {i.name: len(i.raw_data) for i in proto.graph.initializer}
    tb = llamacpp.quantx_token_bytes(q, depth=10)
    # tiny Llama: 2 layers, 2 KV heads of 16 -> K and V, fp32, 10 positions
    assert tb.kv == 2 * 2 * (2 * 16) * 10 * 4
    # tied: the lm_head reads the whole packed table the QxGather looks rows up in
    assert 0 < tb.weights <= sum(sizes.values())
    table = next(n for n in proto.graph.node if n.op_type == "QxGather").input[1]
    lm_head = [n for n in proto.graph.node if n.op_type == "QxMatMul" and table in n.input]
    assert lm_head and tb.weights > sizes[table]


def test_existing_build_is_reused(tmp_path):
    bindir = tmp_path / "build" / "bin"
    bindir.mkdir(parents=True)
    for t in llamacpp.TARGETS:
        (bindir / t).write_text("")
    said = []
    assert llamacpp.ensure_llamacpp(tmp_path, out=said.append) == bindir
    assert said == []  # nothing downloaded or built
