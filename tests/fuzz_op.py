"""Fuzzer over the QxMatMul / QxGather ops: random attributes and tensor sizes, valid and
invalid. Every case must either run and match the numpy reference, or fail with a clean ORT
error; a crash (signal, abort, sanitizer report) fails the run.

    python -m tests.fuzz_op --cases 300 --seed 1   (prints "fuzz: N valid ok, M rejected")
Run in a subprocess by tests/test_fuzz.py, and under ASan/UBSan by tests/test_sanitizers.py.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import quantx_onnx
from quantx_onnx import reference
from quantx_onnx.format import (
    DOMAIN,
    TENSOR_ORDER,
    FormatError,
    Layout,
    QuantizedWeight,
    WeightFormat,
    pack,
    unpack,
)
from quantx_onnx.quantize.rtn import quantize_rtn


def _valid_weight(rng) -> tuple[QuantizedWeight, dict]:
    bits = int(rng.choice([2, 3, 4, 5, 6, 8]))
    K = int(rng.integers(1, 300))
    N = int(rng.integers(1, 70))
    group = int(rng.choice([0, 16, 32, 64, 128]))
    layout = Layout(int(rng.integers(0, 2)))
    kw = {}
    if rng.random() < 0.25:
        kw = {"scale_bits": int(rng.integers(2, 9)), "super_group": int(rng.integers(2, 5))}
    fmt = WeightFormat(K, N, bits, group, layout, **kw)
    w = rng.standard_normal((K, N)).astype(np.float32)
    q = quantize_rtn(w, fmt, symmetric=not kw and rng.random() < 0.3)
    if not kw and q.zero_points is None and rng.random() < 0.3:
        cb = rng.standard_normal((int(rng.choice([1, N])), fmt.code_levels))
        q.codebook = cb.astype(np.float16).astype(np.float32)  # exactly what is stored
    if rng.random() < 0.2:
        q.input_scale = rng.uniform(0.5, 2.0, K).astype(np.float16).astype(np.float32)
    return q, pack(q)


def _mutate(rng, fmt: WeightFormat, packed: dict, attrs: dict) -> str:
    """Break one thing; returns what was broken."""
    choice = int(rng.integers(0, 9))
    if choice == 0:
        attrs["bits"] = int(rng.choice([0, 1, 7, 9, 16, -3]))
        return "bits"
    if choice == 1:
        attrs["group_size"] = int(rng.choice([-16, 8, 24, 5000, 1 << 40]))
        return "group_size"
    if choice == 2:
        attrs["K"] = int(rng.choice([0, -1, fmt.K + 1, 1 << 40]))
        return "K"
    if choice == 3:
        attrs["N"] = int(rng.choice([0, fmt.N + 16, fmt.N - 1 if fmt.N > 1 else 3]))
        return "N"
    if choice == 4:
        attrs["layout"] = int(rng.choice([2, -1, 99]))
        return "layout"
    name = str(rng.choice([n for n in packed if n in ("B", "scales", "zero_points", "sub_scales")]))
    arr = packed[name]
    if choice == 5 and arr.size > 1:
        packed[name] = arr.reshape(-1)[: arr.size - 1]
    elif choice == 6:
        packed[name] = np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]])
    elif choice == 7:
        packed[name] = arr.astype(np.int32 if arr.dtype == np.uint8 else np.float64)
    else:
        attrs["scale_bits"] = int(rng.choice([1, 9, 3]))
        attrs["super_group"] = int(rng.choice([0, 1, 2]))
    return f"tensor {name}"


def _model(op: str, packed: dict, attrs: dict, a_shape, a_type) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(packed[n], n) for n in TENSOR_ORDER if n in packed]
    inputs = ["X"] + [n if n in packed else "" for n in TENSOR_ORDER]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(op, inputs, ["Y"], domain=DOMAIN, name="fuzz", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", a_type, a_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )


def run_case(rng, so) -> str:
    """'ok' (valid case matched), 'rejected' (clean error), or raises AssertionError."""
    q, packed = _valid_weight(rng)
    fmt = q.fmt
    gather = rng.random() < 0.2
    attrs = {**fmt.attributes()}
    if not gather:
        attrs["accuracy_level"] = int(rng.choice([0, 4]))
    broken = _mutate(rng, fmt, packed, attrs) if rng.random() < 0.5 else None
    M = int(rng.choice([0, 1, 2, 5, 33]))
    if gather:
        ids = rng.integers(-fmt.N, fmt.N, size=(M,)).astype(np.int64)
        if rng.random() < 0.2:
            ids[:1] = fmt.N + int(rng.integers(0, 5))  # out of range
            broken = broken or "index"
        model = _model("QxGather", packed, attrs, [M], TensorProto.INT64)
        feed = ids
    else:
        k_in = fmt.K if rng.random() < 0.9 else fmt.K + 1
        broken = broken or (None if k_in == fmt.K else "A width")
        model = _model("QxMatMul", packed, attrs, [M, k_in], TensorProto.FLOAT)
        feed = rng.standard_normal((M, k_in)).astype(np.float32)
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        y = sess.run(None, {"X": feed})[0]
    except Exception as e:  # ORT errors surface as exceptions; anything else would be a crash
        if broken is None:
            raise AssertionError(f"valid case rejected: {e}") from e
        return "rejected"
    if broken is not None:
        # the op accepted a mutated node: the Python format must accept it too, and the result
        # must be right for the attributes given
        try:
            fmt = WeightFormat.from_attributes(attrs)
            q = unpack({k: v for k, v in packed.items()}, fmt)
        except (FormatError, ValueError) as e:
            raise AssertionError(f"C++ accepted what the format rejects ({broken}): {e}") from e
        broken = None
        status = "ran"
    else:
        status = "ok"
    if broken is None:
        if gather:
            want = reference.dequantize_rows(q, feed)
        else:
            want = reference.matmul(feed, q, attrs["accuracy_level"])
        err = np.abs(y - want).max() if y.size else 0.0
        scale = max(np.abs(want).max() if want.size else 0.0, 1e-6)
        assert err <= 3e-5 * scale + 1e-6, f"mismatch {err} vs {scale} ({fmt})"
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    ort.set_default_logger_severity(4)  # rejected cases are expected; keep the log quiet
    so = quantx_onnx.session_options(threads=2)
    so.log_severity_level = 4
    counts = {"ok": 0, "rejected": 0, "ran": 0}
    for i in range(args.cases):
        try:
            counts[run_case(rng, so)] += 1
        except AssertionError as e:
            print(f"fuzz case {i}: {e}", file=sys.stderr)
            return 1
    print(
        f"fuzz: {counts['ok']} valid ok, {counts['rejected']} rejected cleanly, "
        f"{counts['ran']} mutated but still valid"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
