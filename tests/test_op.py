"""The C++ QxMatMul/QxGather ops in ONNX Runtime against the numpy reference."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from quantx_onnx import reference
from quantx_onnx.format import (
    DOMAIN,
    OP_GATHER,
    TENSOR_ORDER,
    Layout,
    QuantizedWeight,
    WeightFormat,
    dequantize,
    pack,
    stored_weight,
)
from quantx_onnx.quantize.rtn import quantize_rtn

from .helpers import quantx_session, qx_matmul_model, random_quantized


def _run(q, a, accuracy_level=0, bias=None, a_dtype=np.float32):
    packed = pack(q)
    model = qx_matmul_model(
        packed, q.fmt, a.shape, accuracy_level=accuracy_level, bias=bias, a_dtype=a_dtype
    )
    return quantx_session(model).run(None, {"A": a.astype(a_dtype)})[0]


def _check(got, ref, rtol):
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= rtol * max(np.abs(ref).max(), 1e-6), (err, np.abs(ref).max())


SHAPES = [  # (a_shape, K, N, group)
    ((1, 96), 96, 7, 32),  # M = 1, odd N
    ((3, 100), 100, 33, 32),  # K not a multiple of the group
    ((2, 5, 70), 70, 16, 64),  # 3-D input, partial group
    ((129, 64), 64, 1, 0),  # per-channel, N = 1
    ((7, 200), 200, 40, 128),
]


@pytest.mark.parametrize(
    "bits,layout,shape",
    list(itertools.product((2, 3, 4, 5, 6, 8), (Layout.ROW, Layout.TILE16), SHAPES)),
)
def test_float_path_matches_dequantized_matmul(bits, layout, shape, rng):
    a_shape, K, N, g = shape
    q, _ = random_quantized(rng, K, N, bits, g, layout)
    a = rng.standard_normal(a_shape).astype(np.float32)
    got = _run(q, a)
    ref = a.astype(np.float64) @ dequantize(q).astype(np.float64)
    assert got.shape == (*a_shape[:-1], N)
    _check(got, ref, 1e-5)


@pytest.mark.parametrize(
    "bits,layout,shape",
    list(itertools.product((2, 3, 4, 5, 6, 8), (Layout.ROW, Layout.TILE16), SHAPES)),
)
def test_int8_path_matches_reference_simulation(bits, layout, shape, rng):
    a_shape, K, N, g = shape
    q, _ = random_quantized(rng, K, N, bits, g, layout)
    a = rng.standard_normal(a_shape).astype(np.float32)
    got = _run(q, a, accuracy_level=4)
    _check(got, reference.matmul(a, q, accuracy_level=4), 2e-6)
    # and the int8 activations cost little against float activations
    exact = a.astype(np.float64) @ dequantize(q).astype(np.float64)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("layout", [Layout.ROW, Layout.TILE16])
def test_symmetric_hierarchical_bias(level, layout, rng):
    q, _ = random_quantized(rng, 150, 37, 3, 32, layout, symmetric=True)
    a = rng.standard_normal((4, 150)).astype(np.float32)
    bias = rng.standard_normal(37).astype(np.float32)
    _check(_run(q, a, level, bias), reference.matmul(a, q, level, bias), 2e-5)
    h = WeightFormat(150, 37, 3, 32, layout, scale_bits=4, super_group=3)
    q = quantize_rtn(rng.standard_normal((150, 37)).astype(np.float32), h)
    _check(_run(q, a, level), reference.matmul(a, q, level), 2e-5)


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("rows", [1, 37])
def test_codebook_and_input_scale(level, rows, rng):
    K, N = 96, 37
    fmt = WeightFormat(K, N, 3, 32, Layout.TILE16)
    cb = rng.standard_normal((rows, 8)).astype(np.float16).astype(np.float32)
    q = QuantizedWeight(
        fmt,
        rng.integers(0, 8, (N, K)).astype(np.uint8),
        rng.standard_normal((N, 3)).astype(np.float16).astype(np.float32),
        codebook=cb,
        input_scale=rng.uniform(0.5, 2.0, K).astype(np.float16).astype(np.float32),
    )
    a = rng.standard_normal((5, K)).astype(np.float32)
    _check(_run(q, a, level), reference.matmul(a, q, level), 2e-5)


@pytest.mark.parametrize("level", [0, 4])
def test_float16_activations(level, rng):
    q, _ = random_quantized(rng, 128, 48, 4, 32, Layout.TILE16)
    a = rng.standard_normal((3, 128)).astype(np.float16)
    got = _run(q, a, level, a_dtype=np.float16)
    assert got.dtype == np.float16
    _check(got, reference.matmul(a.astype(np.float32), q, level), 2e-3)


def test_empty_batch(rng):
    q, _ = random_quantized(rng, 64, 16, 3, 32, Layout.TILE16)
    got = _run(q, np.zeros((0, 64), np.float32))
    assert got.shape == (0, 16)


# --- QxGather -------------------------------------------------------------------------------
def _gather_model(q: QuantizedWeight, idx_shape, dtype=1):
    packed = pack(q)
    inits = [numpy_helper.from_array(packed[n], n) for n in TENSOR_ORDER if n in packed]
    inputs = ["ids"] + [n if n in packed else "" for n in TENSOR_ORDER]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(
        OP_GATHER, inputs, ["E"], domain=DOMAIN, name="emb", dtype=dtype, **q.fmt.attributes()
    )
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, idx_shape)],
        [helper.make_tensor_value_info("E", dtype, None)],
        inits,
    )
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )


@pytest.mark.parametrize("bits", [3, 5, 6])
@pytest.mark.parametrize("layout", [Layout.ROW, Layout.TILE16])
def test_gather_reads_rows_of_the_transposed_weight(layout, bits, rng):
    q, _ = random_quantized(rng, 72, 50, bits, 32, layout)  # W [K=72, N=50]: 50 table rows
    q = dataclasses.replace(
        q, input_scale=rng.uniform(0.5, 2, 72).astype(np.float16).astype(np.float32)
    )
    ids = np.array([[0, 49, 7], [-1, 3, 3]], np.int64)
    out = quantx_session(_gather_model(q, ids.shape)).run(None, {"ids": ids})[0]
    table = dequantize(q).T  # rows = columns of W = diag(input_scale) @ W_stored
    np.testing.assert_allclose(out, table[ids], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("K", [96, 576])
@pytest.mark.parametrize("dtype", [1, 10])
def test_rotated_gather_returns_the_table_rows(K, dtype, rng):
    """A rotated table stores W' = Q^T W: QxGather un-rotates each row (x @ Q^T, H_K^T in the
    kernel) before the input scale; the reference is the dense dequantization."""
    q, _ = random_quantized(rng, K, 40, 4, 32, Layout.TILE16, rotate=1)
    q = dataclasses.replace(
        q, input_scale=rng.uniform(0.5, 2, K).astype(np.float16).astype(np.float32)
    )
    ids = np.array([[0, 39, 7], [-1, 3, 3]], np.int64)
    out = quantx_session(_gather_model(q, ids.shape, dtype)).run(None, {"ids": ids})[0]
    table = reference.dequantize_rows(q, ids)  # diag(input_scale) Q W', rows of its transpose
    np.testing.assert_allclose(out, table, rtol=1e-5 if dtype == 1 else 1e-3, atol=1e-5)
    stored = stored_weight(q).T[ids]  # what an un-rotating QxGather would return instead
    assert np.abs(out - stored).max() > 0.1 * np.abs(table).max()


def test_gather_out_of_range_is_an_error(rng):
    q, _ = random_quantized(rng, 32, 10, 3, 32, Layout.TILE16)
    sess = quantx_session(_gather_model(q, [2]))
    with pytest.raises(Exception, match=r"QxGather node 'emb': index 10 out of range"):
        sess.run(None, {"ids": np.array([1, 10], np.int64)})


# --- validation -----------------------------------------------------------------------------
def test_wrong_packed_shape_is_refused_at_session_creation(rng):
    q, _ = random_quantized(rng, 64, 16, 3, 32, Layout.TILE16)
    packed = pack(q)
    packed["B"] = packed["B"][:, :1]
    model = qx_matmul_model(packed, q.fmt, (1, 64))
    with pytest.raises(Exception, match=r"QxMatMul node 'qx': input 'B' has shape \[1, 1, 96\]"):
        quantx_session(model)


@pytest.mark.parametrize(
    "attrs,match",
    [
        ({"bits": 7}, "bits must be"),
        ({"group_size": 24}, "group_size"),
        ({"layout": 7}, "layout must be"),
        ({"accuracy_level": 9}, "accuracy_level"),
        ({"K": -3}, "K and N"),
    ],
)
def test_bad_attributes_are_refused(attrs, match, rng):
    q, _ = random_quantized(rng, 64, 16, 3, 32, Layout.TILE16)
    model = qx_matmul_model(pack(q), q.fmt, (1, 64), extra_attrs=attrs)
    with pytest.raises(Exception, match=match):
        quantx_session(model)


def test_activation_width_mismatch_is_an_error(rng):
    q, _ = random_quantized(rng, 64, 16, 3, 32, Layout.TILE16)
    model = qx_matmul_model(pack(q), q.fmt, ("m", "k"))
    sess = quantx_session(model)
    with pytest.raises(Exception, match=r"input 'A' has shape \[2, 63\], expected \[..., K=64\]"):
        sess.run(None, {"A": np.zeros((2, 63), np.float32)})


def test_weights_fed_at_run_time_are_validated_per_run(rng):
    q, _ = random_quantized(rng, 96, 40, 3, 32, Layout.TILE16)
    packed = pack(q)
    inputs = [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [2, 96])]
    for name, arr in packed.items():
        et = helper.np_dtype_to_tensor_dtype(arr.dtype)
        inputs.append(helper.make_tensor_value_info(name, et, None))
    names = ["A"] + [n if n in packed else "" for n in TENSOR_ORDER]
    while names[-1] == "":
        names.pop()
    node = helper.make_node(
        "QxMatMul", names, ["Y"], domain=DOMAIN, name="fed", accuracy_level=0, **q.fmt.attributes()
    )
    g = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)]
    )
    model = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )
    sess = quantx_session(model)
    a = rng.standard_normal((2, 96)).astype(np.float32)
    y = sess.run(None, {"A": a, **packed})[0]
    _check(y, reference.matmul(a, q, 0), 1e-5)
    bad = dict(packed, B=packed["B"][:1])
    with pytest.raises(Exception, match=r"QxMatMul node 'fed': input 'B' has shape"):
        sess.run(None, {"A": a, **bad})
