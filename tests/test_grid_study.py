"""scripts/grid_study.py: the trellis Viterbi against brute force, block LDLQ's error feedback,
and the fake-quantized export against its source."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "grid_study.py"
sys.path.insert(0, str(SCRIPT.parent))
import grid_study  # noqa: E402


def brute_force(x: np.ndarray, table: np.ndarray, L: int, k: int) -> float:
    """Least squared error over every path of the bitshift trellis (free start state)."""
    best = np.inf
    mask = (1 << L) - 1
    for start in range(1 << L):
        for steps in itertools.product(range(1 << k), repeat=len(x) - 1):
            s, err = start, (x[0] - table[start]) ** 2
            for t, b in enumerate(steps, 1):
                s = ((s << k) | b) & mask
                err += (x[t] - table[s]) ** 2
            best = min(best, err)
    return float(best)


def test_viterbi_finds_the_least_squares_path():
    L, k, T = 4, 2, 5
    table = grid_study.trellis_table(L)
    rng = np.random.default_rng(3)
    X = torch.from_numpy(rng.standard_normal((3, T)).astype(np.float32))
    costs = grid_study.viterbi(X, table, k, back=False)
    paths = grid_study.viterbi(X, table, k)
    t = table.numpy()
    for i in range(3):
        exact = brute_force(X[i].numpy(), t, L, k)
        assert float(costs[i]) == pytest.approx(exact, rel=1e-5)
        # the reconstruction is that path: its error is the least cost ...
        assert float(((paths[i] - X[i]) ** 2).sum()) == pytest.approx(exact, rel=1e-5)
        # ... and a walk of the trellis: each state's high bits are its predecessor's low bits
        assert len(set(t.tolist())) == len(t)  # distinct values: a value names its state
        states = [int(np.flatnonzero(t == v)[0]) for v in paths[i].numpy()]
        low = (1 << (L - k)) - 1
        assert all(b >> k == a & low for a, b in zip(states, states[1:]))


def test_block_ldlq_feedback_lowers_the_output_error():
    """With a correlated Hessian, feeding each block's error forward (LDLQ) must beat the same
    trellis without feedback (identity Hessian) on tr(dW^T H dW)."""
    from quantx_onnx.quantize.gptq import output_error

    rng = np.random.default_rng(0)
    K, N = 192, 32
    X = rng.standard_normal((4096, K)) @ (np.eye(K) + 0.3 * rng.standard_normal((K, K)))
    H = X.T @ X / len(X)
    w = rng.standard_normal((K, N)).astype(np.float32)
    table = grid_study.trellis_table(6)
    with_feedback = output_error(w, grid_study.trellis_ldlq(w, H, table, 3), H)
    without = output_error(w, grid_study.trellis_ldlq(w, np.eye(K), table, 3), H)
    assert with_feedback < 0.8 * without


def test_fake_rewrites_only_the_weight_matmuls(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((192, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")],
    )
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    onnx.save(helper.make_model(graph), str(src / "model.onnx"))
    (src / "config.json").write_text("{}")
    cmd = [sys.executable, str(SCRIPT), "fake", str(src), str(dst), "--grid", "t3", "--L", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "1 matrices" in out
    graph_out = onnx.load(str(dst / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph_out.initializer}
    np.testing.assert_array_equal(inits["b"], bias)  # not a weight MatMul: untouched
    err = float(((inits["w"] - w) ** 2).sum() / (w**2).sum())
    assert 0.005 < err < 0.06  # quantized at about 3 bits, not copied, not destroyed
    assert (dst / "config.json").is_file()
    source = onnx.load(str(src / "model.onnx")).graph.initializer[0]
    np.testing.assert_array_equal(numpy_helper.to_array(source), w)  # the source is untouched


def test_outliers_kept_exact_lower_the_output_error():
    """GPTQ with no weight kept is GPTQ (the pipeline's result, up to summation order); keeping
    1% exact lowers the output error further."""
    from quantx_onnx.format import Layout, WeightFormat, dequantize
    from quantx_onnx.quantize.gptq import output_error, quantize_gptq
    from quantx_onnx.quantize.mse import clip_search
    from quantx_onnx.quantize.rtn import finish_uniform

    rng = np.random.default_rng(2)
    K, N = 128, 32
    X = rng.standard_normal((4096, K)) * np.exp(rng.standard_normal(K))
    H = X.T @ X / len(X)
    w = (rng.standard_normal((K, N)) * (1 + 4 * (rng.random((K, N)) < 0.01))).astype(np.float32)
    fmt = WeightFormat(K, N, 3, 32, Layout.TILE16)
    s, lo = clip_search(np.ascontiguousarray(w.T), fmt, np.diag(H))
    base = finish_uniform(np.ascontiguousarray(w.T), fmt, s, lo, False, np.float16)
    pipeline = output_error(w, dequantize(quantize_gptq(w, H, fmt, base)), H)
    none_kept = output_error(w, grid_study.gptq_with_outliers(w, H, fmt, 0.0), H)
    kept = output_error(w, grid_study.gptq_with_outliers(w, H, fmt, 0.01), H)
    assert none_kept == pytest.approx(pipeline, rel=0.02)
    assert kept < 0.9 * none_kept
