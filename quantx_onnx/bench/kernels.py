"""`python -m quantx_onnx bench kernels`: QuantX against ONNX Runtime's own MatMulNBits and
fp32 MatMul on the same shapes, threads and process, runs alternating.

Decode (M=1) is memory-bound only when the weights come from DRAM, as they do in a real model
whose layers together exceed the last-level cache. Each configuration therefore runs over
enough distinct copies of its weights (chained nodes in one graph) that its working set is at
least ``--working-set`` MB (default 2x a 32 MB L3); ``--hot`` measures a single, cache-resident
copy instead. Beside each time the command prints the time to simply read the same bytes with
the same threads (the read-bandwidth roofline, measured on the spot).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import platform
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..format import DOMAIN, OP_MATMUL, TENSOR_ORDER, WeightFormat
from ..runtime import _lib, kernel_name, session_options
from ..targets import resolve_target

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (576, 1536), (1536, 576))
ROWS = (1, 16, 128)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    kind: str  # fp32 | ort | quantx
    bits: int = 0
    block: int = 0  # ORT block size / QuantX group size
    accuracy_level: int = 4


def default_configs(quantx_group: int = 64) -> list[Config]:
    return [
        Config("fp32 MatMul", "fp32"),
        Config("ORT 4-bit b32", "ort", 4, 32),
        Config("ORT 4-bit b128", "ort", 4, 128),
        Config("ORT 2-bit b32", "ort", 2, 32),
        Config("QuantX 2-bit", "quantx", 2, quantx_group),
        Config("QuantX 3-bit", "quantx", 3, quantx_group),
        Config("QuantX 4-bit", "quantx", 4, quantx_group),
    ]


BASELINE = "ORT 4-bit b32"


# --- weights and single-op graphs ---------------------------------------------------------------
def _fp32_weights(rng, K, N):
    return {"B": (rng.standard_normal((K, N), dtype=np.float32) * 0.02)}


def _ort_weights(rng, K, N, bits, block):
    blocks = math.ceil(K / block)
    return {
        "B": rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8),
        "scales": (rng.random(N * blocks, dtype=np.float32) * 0.01 + 0.001),
        "zero_points": rng.integers(0, 256, N * math.ceil(blocks * bits / 8), dtype=np.uint8),
    }


def _quantx_weights(rng, fmt: WeightFormat):
    shapes = fmt.shapes()
    return {
        "B": rng.integers(0, 256, shapes["B"], dtype=np.uint8),
        "scales": (rng.random(shapes["scales"], dtype=np.float32) * 0.01 + 0.001).astype(
            np.float16
        ),
        "zero_points": rng.integers(0, 256, shapes["zero_points"], dtype=np.uint8),
    }


def _node(
    cfg: Config,
    copy: int,
    a: str,
    y: str,
    K: int,
    N: int,
    fmt: WeightFormat | None,
    names: dict[str, str],
):
    if cfg.kind == "fp32":
        return helper.make_node("MatMul", [a, names["B"]], [y], name=f"mm{copy}")
    if cfg.kind == "ort":
        return helper.make_node(
            "MatMulNBits",
            [a, names["B"], names["scales"], names["zero_points"]],
            [y],
            domain="com.microsoft",
            name=f"mnb{copy}",
            K=K,
            N=N,
            bits=cfg.bits,
            block_size=cfg.block,
            accuracy_level=cfg.accuracy_level,
        )
    inputs = [a] + [names.get(t, "") for t in TENSOR_ORDER]
    while inputs[-1] == "":
        inputs.pop()
    return helper.make_node(
        OP_MATMUL,
        inputs,
        [y],
        domain=DOMAIN,
        name=f"qx{copy}",
        accuracy_level=cfg.accuracy_level,
        **fmt.attributes(),
    )


@dataclasses.dataclass
class Built:
    session: ort.InferenceSession
    copies: int
    weight_bytes: int  # one copy
    feeds: dict


def build(cfg: Config, K: int, N: int, M: int, threads: int, working_set: int, rng, layout):
    """A session running `copies` independent matmuls of the same shape (each its own weights,
    all reading the same A); time per matmul = run time / copies."""
    fmt = None
    if cfg.kind == "fp32":
        make = lambda: _fp32_weights(rng, K, N)  # noqa: E731
    elif cfg.kind == "ort":
        make = lambda: _ort_weights(rng, K, N, cfg.bits, cfg.block)  # noqa: E731
    else:
        g = cfg.block if cfg.block < K else 0
        fmt = WeightFormat(K, N, cfg.bits, g, layout)
        make = lambda: _quantx_weights(rng, fmt)  # noqa: E731
    first = make()
    weight_bytes = sum(v.nbytes for v in first.values())
    copies = 1 if working_set <= 0 else max(1, min(256, math.ceil(working_set / weight_bytes)))
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        w = first if c == 0 else make()
        names = {}
        for t, arr in w.items():
            names[t] = f"{t}_{c}"
            inits.append(numpy_helper.from_array(arr, names[t]))
        y = f"y{c}"
        nodes.append(_node(cfg, c, "A", y, K, N, fmt, names))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [M, N]))
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, K])],
        outputs,
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 18),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid(DOMAIN, 1),
        ],
    )
    model.ir_version = 8  # what every ONNX Runtime since 1.14 reads (a newer onnx writes more)
    so = bench_options(threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"A": rng.standard_normal((M, K), dtype=np.float32)}
    return Built(sess, copies, weight_bytes, feeds)


def bench_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime's defaults: a per-session intra-op pool that spins while busy."""
    so = session_options(threads=threads)
    so.inter_op_num_threads = 1
    return so


def stream_ms(nbytes: int, threads: int, iters: int = 30) -> float:
    """Median time to read `nbytes` (freshly allocated) with `threads` threads."""
    buf = np.ones(max(64, nbytes // 64 * 64), np.uint8)
    fn = _lib().QuantxStreamReadMs
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
    return float(fn(buf.ctypes.data, buf.nbytes, threads, iters))


def _time_burst(built: Built, runs: int) -> list[float]:
    """ms per matmul for `runs` runs in a row, after two warm-up runs. A short pause first lets
    the thread pool of the session that ran before stop spinning, so it cannot slow this one."""
    time.sleep(0.02)
    for _ in range(2):
        built.session.run(None, built.feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        built.session.run(None, built.feeds)
        times.append((time.perf_counter() - t0) * 1e3 / built.copies)
    return times


def bench_shape(K, N, M, configs, threads, rounds, working_set, rng, layout):
    built = {c.name: build(c, K, N, M, threads, working_set, rng, layout) for c in configs}
    samples = {name: [] for name in built}
    deadline = time.perf_counter() + 25.0  # bound the time spent on one shape
    burst = 5 if M <= 16 else 2
    for r in range(rounds):
        for name, b in built.items():  # alternating bursts: drift hits every config alike
            samples[name].extend(_time_burst(b, burst))
        if r >= 2 and time.perf_counter() > deadline:
            break
    rows = []
    for c in configs:
        b = built[c.name]
        ms = statistics.median(samples[c.name])
        roof = stream_ms(b.weight_bytes * b.copies, threads) / b.copies
        rows.append(
            {
                "config": c.name,
                "K": K,
                "N": N,
                "M": M,
                "ms": ms,
                "weight_bytes": b.weight_bytes,
                "copies": b.copies,
                "gb_per_s": b.weight_bytes / ms / 1e6,
                "stream_ms": roof,
                "vs_roofline": ms / roof,
            }
        )
    base = next((r["ms"] for r in rows if r["config"] == BASELINE), None)
    fp32 = next((r["ms"] for r in rows if r["config"] == "fp32 MatMul"), None)
    for r in rows:
        r["speedup_vs_ort4_b32"] = base / r["ms"] if base else None
        r["speedup_vs_fp32"] = fp32 / r["ms"] if fp32 else None
    del built
    return rows


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "onnxruntime": ort.__version__,
        "quantx_kernels": kernel_name(),
        "python": platform.python_version(),
    }


def run(
    threads=2,
    shapes=SHAPES,
    rows=ROWS,
    rounds=15,
    working_set_mb=64,
    hot=False,
    group=None,
    target="auto",
    out=print,
):
    """Benchmark every shape and M; returns the result rows (and prints a table)."""
    tgt = resolve_target(target)
    group = group or 64
    configs = default_configs(group)
    rng = np.random.default_rng(0)
    working_set = 0 if hot else working_set_mb * 1_000_000
    info = machine_info(threads)
    out(
        f"QuantX kernel benchmark: {info['cpu']}, {threads} threads, ORT {info['onnxruntime']}, "
        f"QuantX kernels {info['quantx_kernels']} (layout {tgt.layout.name.lower()}, group {group})"
    )
    out(
        "weights: "
        + (
            "one cache-resident copy (--hot)"
            if hot
            else f"rotating copies, >= {working_set_mb} MB per config "
            "(DRAM-resident, as in a real model)"
        )
    )
    header = (
        f"{'shape KxN':>12} {'M':>4}  {'config':<15} {'ms':>8} {'MB':>7} {'GB/s':>6} "
        f"{'stream ms':>9} {'x roof':>6} {'vs ORT4b32':>10} {'vs fp32':>7}"
    )
    results = []
    for K, N in shapes:
        for M in rows:
            out(header)
            for r in bench_shape(K, N, M, configs, threads, rounds, working_set, rng, tgt.layout):
                results.append(r)
                out(
                    f"{f'{K}x{N}':>12} {M:>4}  {r['config']:<15} {r['ms']:>8.4f} "
                    f"{r['weight_bytes'] / 1e6:>7.2f} {r['gb_per_s']:>6.1f} {r['stream_ms']:>9.4f} "
                    f"{r['vs_roofline']:>6.2f} {r['speedup_vs_ort4_b32']:>10.2f} "
                    f"{r['speedup_vs_fp32']:>7.2f}"
                )
    return {
        "machine": info,
        "hot": hot,
        "working_set_mb": 0 if hot else working_set_mb,
        "group": group,
        "results": results,
    }


def save_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
