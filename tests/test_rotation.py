"""Rotated weights (format attribute ``rotate``): the transform, the format, the quantizer, and
the kernels against the numpy reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from quantx_onnx import reference, rotation
from quantx_onnx.format import (
    FormatError,
    Layout,
    WeightFormat,
    dequantize,
    pack,
    stored_weight,
    unpack,
)
from quantx_onnx.recipes import Recipe, quantize_with

from .helpers import quantx_session, qx_matmul_model, random_quantized

ORDERS = (1, 2, 12, 24, 48, 64, 144, 192, 384, 576, 1536)


@pytest.mark.parametrize("K", ORDERS)
def test_rotation_is_orthogonal_and_hadamard(K):
    h = rotation.hadamard(K)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, K * np.eye(K, dtype=np.int64))
    q = rotation.rotation(K)
    np.testing.assert_allclose(q @ q.T, np.eye(K), atol=1e-12)


def test_orders():
    assert rotation.factors(576) == [12, 12, 2, 2]
    assert rotation.factors(1536) == [12] + [2] * 7
    for K in (0, 3, 36, 100, 7 * 64):
        assert not rotation.supported(K)


def test_kronecker_order_and_signs():
    """H_K's first factor is the most significant; the signs are the xorshift32 sequence (an
    independent loop over 32-bit arithmetic here)."""
    np.testing.assert_array_equal(
        rotation.hadamard(24), np.kron(rotation.paley12(), np.array([[1, 1], [1, -1]]))
    )
    s, want = np.uint32(rotation.SIGN_SEED), []
    with np.errstate(over="ignore"):
        for _ in range(40):
            s ^= s << np.uint32(13)
            s ^= s >> np.uint32(17)
            s ^= s << np.uint32(5)
            want.append(-1.0 if s >> np.uint32(31) else 1.0)
    np.testing.assert_array_equal(rotation.signs(40), want)
    assert 10 < (rotation.signs(576) < 0).sum() < 566  # both signs, not a constant


def test_rotated_weight_round_trip(rng):
    w = rng.standard_normal((192, 20))
    np.testing.assert_allclose(rotation.unrotate_weight(rotation.rotate_weight(w)), w, atol=1e-12)
    x = rng.standard_normal((3, 192))
    np.testing.assert_allclose(rotation.rotate_rows(x) @ rotation.rotate_weight(w), x @ w)


def test_format_attribute(rng):
    q, _ = random_quantized(rng, 96, 20, 3, 32, Layout.TILE16, rotate=1)
    assert q.fmt.attributes()["rotate"] == 1
    assert "rotate" not in dataclasses.replace(q.fmt, rotate=0).attributes()
    back = unpack(pack(q), WeightFormat.from_attributes(q.fmt.attributes()))
    assert back.fmt.rotate == 1
    # dequantize gives the weight of the unrotated activations: Q W'
    np.testing.assert_allclose(
        dequantize(back), rotation.unrotate_weight(stored_weight(back)), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(FormatError, match="K = 12\\^a \\* 2\\^b, got K=100"):
        WeightFormat(100, 8, 3, 32, Layout.TILE16, rotate=1)
    with pytest.raises(FormatError, match="rotate must be 0 or 1"):
        WeightFormat(96, 8, 3, 32, Layout.TILE16, rotate=2)


def _outlier_problem(rng, K=384, N=64, tokens=4096):
    """Inputs with a few large channels, as a transformer's normalized activations, and a few
    large weight rows: what a group's range must cover."""
    x = rng.standard_normal((tokens, K)).astype(np.float32)
    x[:, rng.choice(K, 4, replace=False)] *= 15.0
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w[rng.choice(K, 4, replace=False)] *= 8.0
    stats = type("Stats", (), {})()
    stats.hessian = (x.T.astype(np.float64) @ x) / tokens
    stats.tokens = tokens
    return x, w, stats


def _output_error(x, w, w_hat) -> float:
    return float(np.square(x @ (w_hat - w)).sum() / np.square(x @ w).sum())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_rotated_quantization_lowers_the_output_error(method, rng):
    x, w, stats = _outlier_problem(rng)
    base = Recipe(3, 32, method, scale_bits=4, super_group=8)
    plain = quantize_with(base, w, Layout.TILE16, stats)
    rotated = quantize_with(dataclasses.replace(base, rotate=True), w, Layout.TILE16, stats)
    assert plain.fmt.rotate == 0 and rotated.fmt.rotate == 1
    # same bits: rotation is free in storage
    assert pack(rotated)["B"].nbytes == pack(plain)["B"].nbytes
    assert _output_error(x, w, dequantize(rotated)) < 0.9 * _output_error(x, w, dequantize(plain))


def test_recipe_rotates_only_where_it_can(rng):
    w = rng.standard_normal((100, 16)).astype(np.float32)  # K = 100: no Hadamard order
    q = quantize_with(Recipe(3, 32, "rtn", rotate=True), w, Layout.TILE16, None)
    assert q.fmt.rotate == 0
    q = quantize_with(Recipe(3, 32, "codebook", rotate=True), w[:96], Layout.TILE16, None)
    assert q.fmt.rotate == 0  # codebooks are fitted in the given basis


# --- the kernels (ONNX Runtime) against the numpy reference ---------------------------------
def _run(q, a, level, a_dtype=np.float32):
    model = qx_matmul_model(pack(q), q.fmt, a.shape, accuracy_level=level, a_dtype=a_dtype)
    return quantx_session(model).run(None, {"A": a.astype(a_dtype)})[0]


def _close(got, ref, rtol):
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= rtol * max(np.abs(ref).max(), 1e-6), (err, np.abs(ref).max())


NODE_SHAPES = [(12, 0), (48, 32), (64, 32), (384, 32), (576, 64), (1536, 128)]  # (K, group)


@pytest.mark.parametrize("K,group", NODE_SHAPES)
@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_rotated_node_matches_the_reference(K, group, level, rows, rng):
    q, _ = random_quantized(rng, K, 40, 3, group, Layout.TILE16, rotate=1)
    a = rng.standard_normal((rows, K)).astype(np.float32)
    a[:, 3] *= 20.0  # an outlier channel
    _close(_run(q, a, level), reference.matmul(a, q, level), 2e-5 if level else 1e-5)
    exact = a.astype(np.float64) @ dequantize(q).astype(np.float64)
    assert np.linalg.norm(_run(q, a, level) - exact) / np.linalg.norm(exact) < 0.02


@pytest.mark.parametrize("level", [0, 4])
def test_rotated_node_with_input_scale_and_float16(level, rng):
    K, N = 192, 24
    q, _ = random_quantized(rng, K, N, 4, 32, Layout.TILE16, rotate=1)
    q = dataclasses.replace(
        q, input_scale=rng.uniform(0.5, 2.0, K).astype(np.float16).astype(np.float32)
    )
    a = rng.standard_normal((3, K)).astype(np.float32)
    _close(_run(q, a, level), reference.matmul(a, q, level), 2e-5)
    a16 = a.astype(np.float16)
    got = _run(q, a16, level, a_dtype=np.float16)
    _close(got, reference.matmul(a16.astype(np.float32), q, level), 3e-3)


def test_rotate_attribute_is_validated_by_the_kernels(rng):
    q, _ = random_quantized(rng, 96, 16, 3, 32, Layout.TILE16)
    for attrs, match in (({"rotate": 2}, "rotate"), ({"rotate": 1, "K": 96}, None)):
        model = qx_matmul_model(pack(q), q.fmt, (1, 96), extra_attrs=attrs)
        if match is None:
            quantx_session(model)  # 96 = 12 * 8: accepted
            continue
        with pytest.raises(Exception, match=match):
            quantx_session(model)
    q, _ = random_quantized(rng, 100, 16, 3, 32, Layout.TILE16)
    model = qx_matmul_model(pack(q), q.fmt, (1, 100), extra_attrs={"rotate": 1})
    with pytest.raises(Exception, match=r"QxMatMul node 'qx'.*rotate.*K=100"):
        quantx_session(model)


# --- the pipeline -----------------------------------------------------------------------------
def _rotations(path) -> dict[str, int]:
    """rotate per weight initializer of a QuantX model (fused nodes split back)."""
    import onnx_ir as ir
    from quantx_onnx.passes.multi_matmul_rule import split_multi_matmuls

    from quantx_onnx.format import DOMAIN, OP_GATHER, OP_MATMUL

    model = ir.load(str(path))
    split_multi_matmuls(model)
    return {
        n.inputs[1].name: reference.node_weight(n).fmt.rotate
        for n in model.graph
        if n.domain == DOMAIN and n.op_type in (OP_MATMUL, OP_GATHER)  # weights, not attention
    }


def test_calibrated_optimize_rotates_where_it_can(tiny_llama, tmp_path):
    """Calibrated runs rotate every GPTQ'd matrix whose K is a Hadamard order (the tiny
    Llama's 64-wide inputs, the table with its tied lm_head included; not its MLP's 160), the
    file means what its numpy reference says, and --no-rotate writes none."""
    from quantx_onnx import QuantConfig, optimize

    from .helpers import assert_means_its_reference, llm_feeds

    sess = quantx_session(tiny_llama / "model.onnx")
    calib = [llm_feeds(sess, seq=32, batch=4, seed=s) for s in range(4)]
    cfg = QuantConfig(bits=3, e2e_epochs=2, uniform=True, accuracy_level=0)
    rep = optimize(tiny_llama, tmp_path / "rot", cfg, calib_feeds=calib)
    assert rep.config.rotate is True
    recipes = {w["weight"]: (w["K"], w["recipe"]) for w in rep.weights}
    rotated = {name for name, (_, recipe) in recipes.items() if recipe.endswith("rotated")}
    assert rotated == {n for n, (k, _) in recipes.items() if k == 64}
    assert any("embed" in n for n in rotated)  # the tied table: QxGather un-rotates its rows
    assert len(rotated) == 2 * 6 + 1  # q, k, v, o, gate, up of both layers; down_proj: K = 160
    assert sum(_rotations(tmp_path / "rot" / "model.onnx").values()) == len(rotated)
    assert_means_its_reference(tmp_path / "rot" / "model.onnx", llm_feeds(sess, 19, 2, seed=9))

    off = optimize(
        tiny_llama, tmp_path / "off", dataclasses.replace(cfg, rotate=False), calib_feeds=calib
    )
    assert off.config.rotate is False
    assert not any(_rotations(tmp_path / "off" / "model.onnx").values())


def test_table_recipe_rotates_only_a_table_a_matmul_reads(tiny_llama):
    """recipes.table_fields: the tied table (gathered and read by the lm_head) rotates, the
    same table with its lm_head match left out (only gathered) keeps its basis; with
    --embedding-bits 0 tables get no recipe of their own."""
    import onnx_ir as ir
    from quantx_onnx.passes.quantize_linear import DEFAULT_RULES, find_matches

    from quantx_onnx import QuantConfig
    from quantx_onnx.recipes import table_fields

    graph = ir.load(str(tiny_llama / "model.onnx")).graph
    matches = [m for _, m in find_matches(graph, DEFAULT_RULES, None)[0]]
    tables = {m.key for m in matches if m.rule == "gather"}
    assert len(tables) == 1
    cfg = QuantConfig(bits=3, rotate=True)  # as a calibrated run resolves it
    (tied,) = table_fields(cfg, tables, matches).values()
    assert tied["rotate"] is True and tied["bits"] == 4
    gathered = [m for m in matches if m.rule == "gather" or m.key not in tables]
    (alone,) = table_fields(cfg, tables, gathered).values()
    assert alone == {**tied, "rotate": False}
    assert (
        table_fields(QuantConfig(bits=3, rotate=False), tables, matches)[next(iter(tables))][
            "rotate"
        ]
        is False
    )
    assert table_fields(QuantConfig(bits=3, embedding_bits=0), tables, matches) == {}


def test_end_to_end_step_reads_a_rotated_table_as_the_kernels_do(tiny_llama, tmp_path, monkeypatch):
    """The tuning's torch graph un-rotates the rows its Gather reads from a rotated tied table
    (and rotates the lm_head's input): with a zero learning rate its KL on a batch is the KL
    of the written model run by ONNX Runtime on that batch."""
    import functools

    from quantx_onnx import QuantConfig, optimize
    from quantx_onnx.calibration import e2e

    from .helpers import llm_feeds
    from .test_calibration import _kl_to

    monkeypatch.setattr(e2e, "tune_end_to_end", functools.partial(e2e.tune_end_to_end, lr=0.0))
    sess = quantx_session(tiny_llama / "model.onnx")
    batch = llm_feeds(sess, seq=32, batch=4, seed=3)
    cfg = QuantConfig(bits=3, e2e_epochs=1, uniform=True, accuracy_level=0, e2e_span=0)
    rep = optimize(tiny_llama, tmp_path / "q", cfg, calib_feeds=[batch, batch])
    assert any(w["recipe"].endswith("rotated") for w in rep.weights if "embed" in w["weight"])
    ort_kl = _kl_to(tiny_llama / "model.onnx", tmp_path / "q" / "model.onnx", [batch])
    assert ort_kl > 1e-4
    assert rep.tuning["kl_first"] == pytest.approx(ort_kl, rel=0.05), (rep.tuning, ort_kl)


def test_portable_and_rotation_exclude_each_other(tiny_llama, tmp_path):
    from quantx_onnx import QuantConfig, optimize
    from quantx_onnx.errors import InputError
    from quantx_onnx.portable import convert

    from .helpers import llm_feeds

    sess = quantx_session(tiny_llama / "model.onnx")
    calib = [llm_feeds(sess, seq=16, batch=2, seed=s) for s in range(2)]
    cfg = QuantConfig(bits=3, e2e_epochs=0, uniform=True, portable=True)
    rep = optimize(tiny_llama, tmp_path / "p", cfg, calib_feeds=calib)
    assert rep.config.rotate is False  # --portable turns the default off
    with pytest.raises(InputError, match="--rotate and --portable"):
        optimize(
            tiny_llama, tmp_path / "x", dataclasses.replace(cfg, rotate=True), calib_feeds=calib
        )
    rotated = optimize(
        tiny_llama,
        tmp_path / "r",
        dataclasses.replace(cfg, portable=False),
        calib_feeds=calib,
    )
    assert rotated.config.rotate is True
    with pytest.raises(InputError, match="stored rotated.*--no-rotate"):
        convert(tmp_path / "r", tmp_path / "r-portable")


@pytest.mark.parametrize("K", [12, 64, 512, 576, 1536, 2048])
def test_torch_rotation_matches_the_dense_reference(K, rng):
    """The end-to-end step's fast rotation (torch) against the dense numpy Q (512 and 2048:
    the 2s split over two Sylvester blocks)."""
    import torch

    x = rng.standard_normal((2, 3, K))
    got = rotation.torch_rotate_rows(torch, torch.from_numpy(x), K).numpy()
    np.testing.assert_allclose(got, rotation.rotate_rows(x), rtol=1e-10, atol=1e-10)
    back = rotation.torch_rotate_rows(torch, torch.from_numpy(x), K, inverse=True).numpy()
    np.testing.assert_allclose(back, x @ rotation.rotation(K).T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(rotation.unrotate_rows(rotation.rotate_rows(x)), x, atol=1e-12)
