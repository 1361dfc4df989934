"""Portable form (`optimize --portable`, `python -m quantx_onnx portable`): QuantX models in
stock ONNX Runtime operators, run by a plain InferenceSession without the QuantX library."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from quantx_onnx import QuantConfig, make_portable, optimize, reference
from quantx_onnx.format import (
    DOMAIN,
    OP_GATHER,
    TENSOR_ORDER,
    Layout,
    QuantizedWeight,
    WeightFormat,
    dequantize,
    pack,
)
from quantx_onnx.portable import FUNCTION_DOMAIN, bit_planes, to_portable
from quantx_onnx.quantize.rtn import quantize_rtn

from .helpers import llm_feeds, quantx_session, qx_matmul_model, rel_err

MAX_SIZE_RATIO = 1.25


def stock_session(model) -> ort.InferenceSession:
    """A plain ONNX Runtime session: no QuantX library registered."""
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _portable_proto(model: onnx.ModelProto, **kw) -> tuple[onnx.ModelProto, object]:
    m = ir.from_proto(model)
    report = to_portable(m, **kw)
    return ir.to_proto(m), report


def _op_types(model: onnx.ModelProto) -> set[tuple[str, str]]:
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    return ops | {(n.domain, n.op_type) for f in model.functions for n in f.node}


# --- bit planes ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_bit_planes_store_exactly_bits_per_value(bits, rng):
    v = rng.integers(0, 1 << bits, (3, 64)).astype(np.uint8)
    planes = bit_planes(v, bits)
    assert sum(p.shape[-1] for _, _, p in planes) == 64 * bits // 8
    back = np.zeros_like(v)
    for offset, width, packed in planes:
        vals = np.unpackbits(packed, axis=-1, bitorder="little").reshape(3, 64, width)
        back |= (vals << np.arange(width, dtype=np.uint8)).sum(-1).astype(np.uint8) << offset
    np.testing.assert_array_equal(back, v)


# --- single nodes against the numpy reference ------------------------------------------------
def _weight(rng, K, N, bits, group, layout, kind):
    fmt_kw = {"scale_bits": 4, "super_group": 3} if kind == "hierarchical" else {}
    fmt = WeightFormat(K, N, bits, group, layout, **fmt_kw)
    w = rng.standard_normal((K, N)).astype(np.float32)
    q = quantize_rtn(w, fmt, symmetric=kind == "symmetric")
    if kind.startswith("codebook"):
        rows = N if kind == "codebook-rows" else 1
        cb = rng.standard_normal((rows, 1 << bits)).astype(np.float16).astype(np.float32)
        q = QuantizedWeight(fmt, q.codes, q.scales, codebook=cb)
    if kind in ("input_scale", "codebook-rows"):
        s = rng.uniform(0.5, 2.0, K).astype(np.float16).astype(np.float32)
        q = dataclasses.replace(q, input_scale=s)
    return q


CASES = [
    # K, N, bits, group, layout, kind
    (96, 40, 3, 32, Layout.TILE16, "asymmetric"),
    (150, 37, 3, 32, Layout.ROW, "hierarchical"),  # K % group != 0, super-groups cut short
    (128, 24, 3, 0, Layout.TILE16, "symmetric"),  # per-channel: one block of 128
    (96, 24, 3, 0, Layout.ROW, "asymmetric"),  # per-channel, K not a power of two
    (96, 40, 3, 32, Layout.TILE16, "codebook"),
    (96, 40, 2, 32, Layout.ROW, "codebook-rows"),  # with an input scale
    (112, 20, 4, 48, Layout.TILE16, "asymmetric"),  # group not a power of two
    (256, 40, 4, 64, Layout.TILE16, "input_scale"),  # MatMulNBits
    (200, 33, 2, 64, Layout.ROW, "asymmetric"),  # MatMulNBits, K % group != 0
    (128, 16, 8, 32, Layout.TILE16, "symmetric"),  # MatMulNBits without zero points
    (160, 24, 4, 32, Layout.ROW, "hierarchical"),  # MatMulNBits, expanded scales
    (128, 24, 4, 512, Layout.ROW, "asymmetric"),  # group beyond MatMulNBits' 256
    (96, 40, 5, 32, Layout.TILE16, "asymmetric"),  # 5 bits: planes of 4 and 1, a subgraph
    (150, 37, 6, 32, Layout.ROW, "hierarchical"),  # 6 bits: planes of 4 and 2
]


@pytest.mark.parametrize("K,N,bits,group,layout,kind", CASES)
def test_matmul_matches_reference_without_the_library(K, N, bits, group, layout, kind, rng):
    q = _weight(rng, K, N, bits, group, layout, kind)
    bias = rng.standard_normal(N).astype(np.float32)
    model = qx_matmul_model(pack(q), q.fmt, ["B", "M", K], bias=bias)
    portable, report = _portable_proto(model)
    ops = _op_types(portable)
    assert not any(d == DOMAIN for d, _ in ops)
    native = (group or K) in (16, 32, 64, 128, 256) and "codebook" not in kind
    native = native and bits not in (5, 6)  # MatMulNBits has no 5- or 6-bit codes
    assert report.matmulnbits == int(native) and report.subgraph == int(not native)
    assert (("com.microsoft", "MatMulNBits") in ops) == native
    a = rng.standard_normal((2, 3, K)).astype(np.float32)
    got = stock_session(portable).run(None, {"A": a})[0]
    want = reference.matmul(a, q, 0, bias=bias)
    assert got.shape == (2, 3, N)
    assert rel_err(got, want) < 1e-5
    # weights stay packed: at most MAX_SIZE_RATIO of the QuantX tensors
    assert report.packed_bytes_after <= MAX_SIZE_RATIO * report.packed_bytes_before


@pytest.mark.parametrize(
    "bits,group,kind",
    [(3, 32, "asymmetric"), (4, 64, "hierarchical"), (3, 32, "codebook"), (2, 48, "input_scale")],
)
def test_float16_activations(bits, group, kind, rng):
    q = _weight(rng, 96, 40, bits, group, Layout.TILE16, kind)
    model = qx_matmul_model(pack(q), q.fmt, [3, 96], a_dtype=np.float16)
    portable, _ = _portable_proto(model)
    a = rng.standard_normal((3, 96)).astype(np.float16)
    got = stock_session(portable).run(None, {"A": a})[0]
    assert got.dtype == np.float16
    assert rel_err(got, reference.matmul(a.astype(np.float32), q)) < 2e-3


@pytest.mark.parametrize(
    "bits,group,layout,kind",
    [
        (3, 32, Layout.TILE16, "input_scale"),
        (4, 32, Layout.ROW, "asymmetric"),
        (3, 64, Layout.ROW, "hierarchical"),
        (3, 32, Layout.TILE16, "codebook-rows"),
        (5, 32, Layout.TILE16, "asymmetric"),
        (6, 64, Layout.ROW, "hierarchical"),
    ],
)
def test_gather_reads_packed_rows(bits, group, layout, kind, rng):
    K, N = 72 if kind != "hierarchical" else 200, 50
    q = _weight(rng, K, N, bits, group, layout, kind)
    packed = pack(q)
    inits = [numpy_helper.from_array(packed[n], n) for n in TENSOR_ORDER if n in packed]
    inputs = ["ids"] + [n if n in packed else "" for n in TENSOR_ORDER]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(OP_GATHER, inputs, ["E"], domain=DOMAIN, dtype=1, **q.fmt.attributes())
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("E", 1, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )
    portable, report = _portable_proto(model)
    assert report.gathers == 1
    ids = np.array([[0, 49, 7], [-1, 3, 3]], np.int64)
    got = stock_session(portable).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, dequantize(q).T[ids], rtol=1e-6, atol=1e-7)
    # the table is gathered packed: no initializer holds K*N floats
    assert all(
        i.data_type != onnx.TensorProto.FLOAT or len(i.dims) < 2 for i in portable.graph.initializer
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_3bit_codes_become_4bit_matmulnbits_when_the_session_loads(symmetric, rng, tmp_path):
    kind = "symmetric" if symmetric else "asymmetric"
    q = _weight(rng, 176, 48, 3, 64, Layout.TILE16, kind)  # G = 3: zero points padded
    portable, report = _portable_proto(qx_matmul_model(pack(q), q.fmt, [4, 176]))
    assert report.matmulnbits == report.repacked == 1
    # stored: 3 bits a code in planes, fp16 scales (the last group padded to a full block)
    assert report.packed_bytes_after <= MAX_SIZE_RATIO * report.packed_bytes_before
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(portable.SerializeToString(), so)
    # ONNX Runtime folded the unpacking: one 4-bit MatMulNBits over constant initializers
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert [n.op_type for n in optimized.graph.node] == ["MatMulNBits"]
    a = rng.standard_normal((4, 176)).astype(np.float32)
    assert rel_err(session.run(None, {"A": a})[0], reference.matmul(a, q)) < 1e-5


def test_accuracy_level_is_kept_or_overridden(rng):
    q = _weight(rng, 128, 32, 4, 32, Layout.ROW, "asymmetric")
    model = qx_matmul_model(pack(q), q.fmt, [4, 128], accuracy_level=4)

    def level(m):
        (n,) = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
        return next(a.i for a in n.attribute if a.name == "accuracy_level")

    assert level(_portable_proto(model)[0]) == 4
    assert level(_portable_proto(model, accuracy_level=0)[0]) == 0


# --- the tiny Llama end to end ---------------------------------------------------------------
RECIPES = {
    "3bit": dict(bits=3),
    "4bit": dict(bits=4),
    "2bit": dict(bits=2),
    "codebook": dict(bits=3, method="codebook"),
    "hierarchical": dict(bits=3, group_size=32, scale_bits=4),
    "3bit-tile16": dict(bits=3, target="x86-avx2"),
}


def _model_bytes(folder):
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tiny_llama_portable_matches_quantx_and_reference(recipe, tiny_llama, tmp_path):
    fields = {"data_free": True, "accuracy_level": 0, "target": "generic", **RECIPES[recipe]}
    config = QuantConfig(**fields)
    qx, out = tmp_path / "qx", tmp_path / "portable"
    optimize(tiny_llama, qx, config)
    report = make_portable(qx, out)
    assert (out / "config.json").read_bytes() == (tiny_llama / "config.json").read_bytes()
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    ops = _op_types(model)
    assert not any(d == DOMAIN for d, _ in ops)
    assert DOMAIN not in {o.domain for o in model.opset_import}
    if recipe != "codebook":
        assert report.subgraph == 0 and report.matmulnbits == 15  # 14 projections + lm_head
    else:
        assert report.subgraph == 15 and report.matmulnbits == 0  # the lm_head too
    if recipe in ("3bit", "codebook", "hierarchical", "3bit-tile16"):
        assert ("", "BitShift") in ops and (FUNCTION_DOMAIN, "BitShift") not in ops
    assert report.gathers == 1
    assert _model_bytes(out) <= MAX_SIZE_RATIO * _model_bytes(qx)

    portable = stock_session(out / "model.onnx")
    quantx = quantx_session(qx / "model.onnx")
    ref_model = reference.dequantized_model(ir.load(str(qx / "model.onnx")))
    ref = stock_session(ir.to_proto(ref_model))
    fp32 = stock_session(tiny_llama / "model.onnx")
    for seq, batch in ((7, 1), (1, 2), (33, 2)):
        feeds = llm_feeds(quantx, seq=seq, batch=batch, seed=seq)
        got = portable.run(None, feeds)
        names = [o.name for o in portable.get_outputs()]
        for name, g, q, r in zip(names, got, quantx.run(names, feeds), ref.run(names, feeds)):
            assert rel_err(g, q) < 1e-3, (name, rel_err(g, q))
            assert rel_err(g, r) < 1e-3, (name, rel_err(g, r))
        # and it is really the quantized model, not the float one
        assert rel_err(got[0], fp32.run(["logits"], feeds)[0]) > 1e-2


def test_int8_quantx_model_stays_close(tiny_llama, tmp_path):
    """A QuantX model on the int8-activation path: its MatMulNBits keep accuracy_level 4 (ORT's
    own int8 blocks), the 3-bit matrices compute in float: close, not identical."""
    qx, out = tmp_path / "qx", tmp_path / "portable"
    optimize(tiny_llama, qx, QuantConfig(data_free=True, accuracy_level=4, target="x86-avx2"))
    make_portable(qx, out)
    quantx = quantx_session(qx / "model.onnx")
    feeds = llm_feeds(quantx, seq=9)
    got = stock_session(out / "model.onnx").run(["logits"], feeds)[0]
    assert rel_err(got, quantx.run(["logits"], feeds)[0]) < 0.03


def test_optimize_portable_writes_a_stock_model(tiny_llama, tmp_path):
    config = QuantConfig(data_free=True, accuracy_level=0, target="generic", portable=True)
    report = optimize(tiny_llama, tmp_path / "p", config)
    assert report.portable["repacked"] == 14 and report.portable["gathers"] == 1
    optimize(tiny_llama, tmp_path / "qx", dataclasses.replace(config, portable=False))
    session = stock_session(tmp_path / "p" / "model.onnx")
    feeds = llm_feeds(session, seq=5)
    got = session.run(["logits"], feeds)[0]
    want = quantx_session(tmp_path / "qx" / "model.onnx").run(["logits"], feeds)[0]
    assert rel_err(got, want) < 1e-3


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "quantx_onnx", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_portable_converts_files_and_folders(tiny_llama, tmp_path):
    qx = tmp_path / "qx"
    optimize(tiny_llama, qx, QuantConfig(data_free=True, bits=4, accuracy_level=0))
    r = _cli("portable", qx, "-o", tmp_path / "folder")
    assert r.returncode == 0, r.stderr
    assert "MatMulNBits" in r.stdout
    assert (tmp_path / "folder" / "config.json").is_file()
    r = _cli("portable", qx / "model.onnx", "-o", tmp_path / "single.onnx", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "single.onnx")
    # a process that never imports quantx_onnx runs it
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1])\n"
        "ids = np.array([[1, 2, 3]], np.int64)\n"
        "feeds = {'input_ids': ids, 'attention_mask': np.ones_like(ids),\n"
        "         'position_ids': np.arange(3)[None]}\n"
        "for i in s.get_inputs():\n"
        "    if i.name.startswith('past'):\n"
        "        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)\n"
        "assert 'quantx_onnx' not in sys.modules\n"
        "print(s.run(['logits'], feeds)[0].shape)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "single.onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 3, 320)"
    # optimize --portable from the command line
    r = _cli("optimize", tiny_llama, "-o", tmp_path / "opt", "--data-free", "--portable")
    assert r.returncode == 0, r.stderr
    assert "portable (stock ONNX Runtime)" in r.stdout
    stock_session(tmp_path / "opt" / "model.onnx")


def test_cli_portable_refuses_a_model_without_quantx_nodes(tiny_llama, tmp_path):
    r = _cli("portable", tiny_llama, "-o", tmp_path / "out")
    assert r.returncode == 2
    assert "not a QuantX model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_decode_bench_runs_the_portable_model_on_stock_ort(tiny_llama, tmp_path):
    from quantx_onnx.bench import decode
    from quantx_onnx.llm import DecoderSession, uses_quantx_ops

    qx, out = tmp_path / "qx", tmp_path / "portable"
    optimize(tiny_llama, qx, QuantConfig(data_free=True, accuracy_level=0, target="generic"))
    make_portable(qx, out)
    assert uses_quantx_ops(qx) and not uses_quantx_ops(out)
    ids = np.array([[5, 17, 99, 3]], np.int64)
    want = DecoderSession(qx).logits(ids)
    assert rel_err(DecoderSession(out, quantx_ops=False).logits(ids), want) < 1e-3
    lines = []
    results = decode.run(
        [str(out), str(qx)],
        prompt_tokens=8,
        new_tokens=3,
        rounds=1,
        measure_memory=False,
        out=lines.append,
        stock_ort=True,
    )
    assert len(results) == 2 and all(r.decode_tokens_per_s > 0 for r in results)
    assert any(line.startswith(f"{out} [stock ORT]") for line in lines)
    assert not any(line.startswith(f"{qx} [stock ORT]") for line in lines)


def test_portable_folder_gets_a_genai_config_without_the_quantx_library(
    tiny_with_tokenizer, tmp_path
):
    import json

    qx, out = tmp_path / "qx", tmp_path / "portable"
    config = QuantConfig(data_free=True, accuracy_level=0)  # float path: same tokens
    optimize(tiny_with_tokenizer, qx, config)
    genai = json.loads((qx / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["custom_ops_library"]
    report = make_portable(qx, out)
    assert not list(out.glob("*.so")) and "genai_config.json" not in report.copied
    genai = json.loads((out / "genai_config.json").read_text())
    assert "custom_ops_library" not in genai["model"]["decoder"]["session_options"]
    assert genai["model"]["decoder"]["filename"] == "model.onnx"
    # optimize --portable writes the same
    optimize(tiny_with_tokenizer, tmp_path / "direct", dataclasses.replace(config, portable=True))
    direct = json.loads((tmp_path / "direct" / "genai_config.json").read_text())
    assert direct == genai
    # onnxruntime-genai runs it with no custom-op library, greedy tokens as the QuantX model's
    og = pytest.importorskip("onnxruntime_genai")
    from quantx_onnx.generate import SamplingConfig, eos_ids, generate_ids
    from quantx_onnx.llm import DecoderSession

    from .helpers import genai_greedy

    prompt = [5, 17, 99, 3, 250]
    ids, _ = genai_greedy(og, out, prompt, 12)
    session = DecoderSession(qx)
    want = list(generate_ids(session, prompt, SamplingConfig(max_new_tokens=12), set(eos_ids(qx))))
    assert ids == want
