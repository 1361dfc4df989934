"""`python -m quantx_onnx bench calibrate-target`: the cost model of a target, measured.

For every candidate format the bit allocator may choose (bits 2-6 and 8, group 32/64/128, fp16
or hierarchical 4-bit sub-scales) one QuantX MatMul of a fixed shape is timed at decode (M=1)
and at a prefill M, its weights DRAM-resident (rotating copies, as :mod:`.kernels` does); an
fp32 MatMul of the same shape is the reference. The result, nanoseconds per weight, is cached
as JSON under ``~/.cache/quantx_onnx/targets/`` per target, CPU model and thread count.
Targets this machine cannot run (arm64 here) get built-in defaults: a bandwidth model (bytes
read per weight over a typical phone's DRAM bandwidth) plus a per-format unpack cost, not a
measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ..format import SUPPORTED_BITS, WeightFormat
from ..targets import TARGETS, resolve_target

GROUPS = (32, 64, 128)
SCALE_BITS = (0, 4)  # fp16 scales per group, or 4-bit sub-scales under an fp16 super-scale
SUPER_GROUP = 8
SHAPE = (1536, 1536)  # K, N of the timed matmul
PREFILL_M = 64
VERSION = 2  # 2: 5- and 6-bit formats


def cache_dir() -> Path:
    base = os.environ.get("QUANTX_CACHE") or os.path.join(Path.home(), ".cache", "quantx_onnx")
    return Path(base) / "targets"


def fmt_key(bits: int, group: int, scale_bits: int) -> str:
    return f"b{bits}-g{group}-s{scale_bits}"


def bytes_per_weight(bits: int, group: int, scale_bits: int, K: int = 1536) -> float:
    """Stored bytes per weight of a format (codes, scales, zero points), TILE16."""
    fmt = WeightFormat(
        K, 16, bits, group, scale_bits=scale_bits, super_group=SUPER_GROUP if scale_bits else 0
    )
    total = 0
    for name, shape in fmt.shapes().items():
        total += int(np.prod(shape)) * (2 if name == "scales" else 1)
    return total / (K * 16)


@dataclasses.dataclass
class CostModel:
    """Kernel time per weight (ns) of each candidate format at decode (M=1) and prefill."""

    target: str
    source: str  # "measured" or "built-in default"
    decode_ns: dict[str, float]  # fmt_key -> ns per weight, M=1
    prefill_ns: dict[str, float]  # fmt_key -> ns per weight per row, M=PREFILL_M
    fp32_decode_ns: float
    fp32_prefill_ns: float
    machine: dict = dataclasses.field(default_factory=dict)

    def ns_per_weight(self, bits: int, group: int, scale_bits: int, prefill: bool = False):
        """The measured format, or the nearest measured group of the same bits and scales."""
        table = self.prefill_ns if prefill else self.decode_ns
        key = fmt_key(bits, group, scale_bits)
        if key in table:
            return table[key]
        same = [
            (abs(math.log2(max(g, 1) / max(group, 1))), v)
            for k, v in table.items()
            for b, g, s in [_parse(k)]
            if b == bits and s == scale_bits
        ]
        if same:
            return min(same)[1]
        # unmeasured format: scale the fp32 time by the bytes read
        fp = self.fp32_prefill_ns if prefill else self.fp32_decode_ns
        return fp * bytes_per_weight(bits, group or 32, scale_bits) / 4.0

    def recipe_ns(self, recipe, prefill: bool = False) -> float:
        scale_bits = recipe.scale_bits if recipe.scale_bits else 0
        return self.ns_per_weight(recipe.bits, recipe.group_size, scale_bits, prefill)

    def to_json(self) -> dict:
        return {"version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        data = {k: v for k, v in data.items() if k != "version"}
        return cls(**data)


def _parse(key: str) -> tuple[int, int, int]:
    b, g, s = key.split("-")
    return int(b[1:]), int(g[1:]), int(s[1:])


def _formats():
    for bits in SUPPORTED_BITS:
        for group in GROUPS:
            for scale_bits in SCALE_BITS:
                yield bits, group, scale_bits


# --- built-in defaults for targets not measurable here -------------------------------------
# A phone-class ARM core cluster: ~15 GB/s of DRAM read bandwidth for decode; unpack cost per
# weight grows for odd widths (3-bit bit planes) and hierarchical scales. Prefill is compute
# bound: int8 dot throughput (sdot ~4x smull/sadalp), plus the same unpack cost.
_ARM = {
    "arm64-neon": {"gbps": 12.0, "dot_ns": 0.020, "unpack": 0.030},
    "arm64-dotprod": {"gbps": 15.0, "dot_ns": 0.006, "unpack": 0.025},
}
# 5 and 6 bits scaled from 3 and 4 by the instructions of the dotprod decode loop per
# super-block (generated code: 3-bit 107, 5-bit 94, 6-bit 62, 4-bit 41).
_UNPACK_FACTOR = {2: 0.8, 3: 1.4, 4: 0.6, 5: 1.3, 6: 0.9, 8: 0.3}


def builtin_default(target: str) -> CostModel:
    p = _ARM.get(target, {"gbps": 10.0, "dot_ns": 0.05, "unpack": 0.05})
    decode, prefill = {}, {}
    for bits, group, scale_bits in _formats():
        read = bytes_per_weight(bits, group, scale_bits) / p["gbps"]  # ns per weight
        unpack = p["unpack"] * _UNPACK_FACTOR[bits] * (1.2 if scale_bits else 1.0)
        decode[fmt_key(bits, group, scale_bits)] = max(read, unpack) + 0.1 * min(read, unpack)
        prefill[fmt_key(bits, group, scale_bits)] = p["dot_ns"] + unpack / PREFILL_M
    return CostModel(
        target,
        "built-in default",
        decode,
        prefill,
        fp32_decode_ns=4.0 / p["gbps"],
        fp32_prefill_ns=4 * p["dot_ns"],
        machine={"note": "not measured: bandwidth model of a phone-class arm64 CPU"},
    )


# --- measurement -----------------------------------------------------------------------------
def _time(built, runs: int) -> float:
    time.sleep(0.01)
    built.session.run(None, built.feeds)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        built.session.run(None, built.feeds)
        samples.append((time.perf_counter() - t0) / built.copies)
    return float(np.min(samples))  # the machine is shared: the least disturbed run


def _build(fmt: WeightFormat | None, M: int, threads: int, working_set: int, rng):
    """A session of chained copies of one matmul (the QuantX format, or fp32 when None)."""
    from onnx import TensorProto, helper, numpy_helper

    from ..format import DOMAIN, OP_MATMUL, TENSOR_ORDER
    from .kernels import Built, _fp32_weights, _quantx_weights, bench_options

    K, N = SHAPE
    make = (
        (lambda: _fp32_weights(rng, K, N)) if fmt is None else (lambda: _quantx_weights(rng, fmt))
    )
    first = make()
    if fmt is not None and fmt.hierarchical:
        first["sub_scales"] = rng.integers(0, 256, fmt.shapes()["sub_scales"], dtype=np.uint8)
    one = sum(v.nbytes for v in first.values())
    copies = max(1, min(64, math.ceil(working_set / one)))
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        w = first if c == 0 else make()
        if c and fmt is not None and fmt.hierarchical:
            w["sub_scales"] = first["sub_scales"]
        names = {t: f"{t}_{c}" for t in w}
        inits += [numpy_helper.from_array(a, names[t]) for t, a in w.items()]
        if fmt is None:
            nodes.append(helper.make_node("MatMul", ["A", names["B"]], [f"y{c}"]))
        else:
            inputs = ["A"] + [names.get(t, "") for t in TENSOR_ORDER]
            while inputs[-1] == "":
                inputs.pop()
            nodes.append(
                helper.make_node(
                    OP_MATMUL, inputs, [f"y{c}"], domain=DOMAIN, accuracy_level=4,
                    **fmt.attributes(),
                )
            )  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, [M, N]))
    graph = helper.make_graph(
        nodes, "cost", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, K])], outputs,
        inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )
    model.ir_version = 8
    import onnxruntime as ort

    so = bench_options(threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"A": rng.standard_normal((M, K), dtype=np.float32)}
    return Built(sess, copies, one, feeds)


def measure(
    target: str = "auto", threads: int = 2, working_set_mb: float = 48, runs: int = 7, progress=None
) -> CostModel:
    """Time every candidate format on this machine (about a minute on 2 cores)."""
    from .kernels import machine_info

    tgt = resolve_target(target)
    rng = np.random.default_rng(0)
    K, N = SHAPE
    ws = int(working_set_mb * 1e6)
    decode, prefill = {}, {}
    formats = list(_formats())
    items = progress(formats) if progress else formats
    fp_dec = _time(_build(None, 1, threads, ws, rng), runs) * 1e9 / (K * N)
    fp_pre = _time(_build(None, PREFILL_M, threads, ws, rng), max(2, runs // 2)) * 1e9 / (K * N)
    for bits, group, scale_bits in items:
        fmt = WeightFormat(
            K, N, bits, group, tgt.layout, scale_bits, SUPER_GROUP if scale_bits else 0
        )
        key = fmt_key(bits, group, scale_bits)
        try:
            decode[key] = _time(_build(fmt, 1, threads, ws, rng), runs) * 1e9 / (K * N)
            pre = _build(fmt, PREFILL_M, threads, ws // 4, rng)
            prefill[key] = _time(pre, max(2, runs // 2)) * 1e9 / (K * N * PREFILL_M)
        except Exception:  # noqa: BLE001 - a format the kernels refuse is simply not a candidate
            continue
    return CostModel(
        tgt.name,
        "measured",
        decode,
        prefill,
        fp_dec,
        fp_pre / PREFILL_M,
        machine={**machine_info(threads), "shape": list(SHAPE), "prefill_m": PREFILL_M},
    )


def cache_path(target: str, threads: int) -> Path:
    from .kernels import machine_info

    cpu = machine_info(threads)["cpu"]
    tag = hashlib.sha1(cpu.encode()).hexdigest()[:8]
    return cache_dir() / f"{target}-{tag}-t{threads}.json"


def measurable(target: str) -> bool:
    """Whether this machine runs the target's kernels (so its cost can be measured here)."""
    from ..runtime import kernel_name

    return target == "auto" or TARGETS[target].kernels in (kernel_name(), "ref")


def calibrate_target(
    target: str = "auto", threads: int = 2, force: bool = False, progress=None, **kw
) -> tuple[CostModel, Path | None]:
    """The target's cost model: cached, measured (and cached) here, or the built-in default."""
    name = resolve_target(target).name
    if not measurable(name):
        return builtin_default(name), None
    path = cache_path(name, threads)
    if path.is_file() and not force:
        try:
            data = json.loads(path.read_text())
            if data.get("version") == VERSION:
                return CostModel.from_json(data), path
        except (OSError, ValueError, TypeError):
            pass
    model = measure(name, threads, progress=progress, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(model.to_json(), indent=1))
    tmp.replace(path)
    return model, path


def load_cost_model(target: str, threads: int = 2) -> CostModel:
    """What the allocator uses: the cached measurement, else a measurement now (cached), else
    for targets this machine cannot run the built-in default."""
    return calibrate_target(target, threads)[0]


def describe(model: CostModel, out=print) -> None:
    out(
        f"cost model of {model.target} ({model.source}); fp32 MatMul: "
        f"{model.fp32_decode_ns:.3f} ns/weight decode, {model.fp32_prefill_ns:.4f} ns/weight/row "
        f"prefill"
    )
    out(
        f"{'format':<22} {'B/weight':>8} {'decode ns/w':>11} {'x fp32':>7} {'prefill ns/w/row':>16}"
    )
    for key in sorted(model.decode_ns, key=_parse):
        b, g, s = _parse(key)
        name = f"{b}-bit g{g} " + (f"hier{s}x{SUPER_GROUP}" if s else "fp16 scales")
        dec = model.decode_ns[key]
        out(
            f"{name:<22} {bytes_per_weight(b, g, s):8.3f} {dec:11.4f} "
            f"{model.fp32_decode_ns / dec:7.2f} {model.prefill_ns.get(key, float('nan')):16.5f}"
        )
