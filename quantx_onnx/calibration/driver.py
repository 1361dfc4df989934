"""Calibrated quantization: the stage loop of :mod:`.stages` with a quantizer called as soon as
a weight's last reader has been seen.

For each stage: run every calibration batch through it capturing the inputs of the weight
matmuls it contains (reduced into :class:`InputStats` on the fly), quantize the weights whose
last reader is in this stage, then (sequential mode) run the stage again with those weights
dequantized, so that the next stage calibrates on what the quantized model will feed it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ..format import QuantizedWeight, dequantize
from ..passes import LinearMatch, WeightKey
from ..passes.rule import weight_array
from ..runtime import session_options
from .stages import StageRunner, stage_of_node
from .stats import InputStats

# quantize(key, W[K, N], stats or None) -> (quantized weight, report entry)
CalibratedQuantizeFn = Callable[
    [WeightKey, np.ndarray, InputStats | None], tuple[QuantizedWeight, dict]
]


@dataclasses.dataclass
class CalibrationResult:
    weights: dict[WeightKey, QuantizedWeight]
    info: dict[WeightKey, dict]
    tokens: int
    seconds: float
    refined: list = dataclasses.field(default_factory=list)  # blockwise.BlockReport per stage


def _activation(m: LinearMatch) -> ir.Value | None:
    return None if m.rule == "gather" else m.node.inputs[0]


def _override(weight: ir.Value, key: WeightKey, q: QuantizedWeight) -> np.ndarray:
    """The dequantized weight in the initializer's own orientation, scale and dtype."""
    w = dequantize(q)
    if key.alpha != 1.0:
        w = w / np.float32(key.alpha)
    if key.transposed:
        w = w.T
    return np.ascontiguousarray(w.astype(weight.const_value.dtype.numpy()))


def calibrate_and_quantize(
    model: ir.Model,
    matches: list[LinearMatch],
    feeds: list[dict[str, np.ndarray]],
    quantize: CalibratedQuantizeFn,
    *,
    sequential: bool = True,
    hessian_mode: str = "norm",
    threads: int | None = None,
    progress=None,
    refine: Callable | None = None,
) -> CalibrationResult:
    """``refine(stage, matches, weights, live, targets) -> (weights, report)``, when given,
    tunes each stage's freshly quantized weights against the float model's stage outputs
    (:mod:`.blockwise`); the float model then runs beside the quantized one."""
    start = time.perf_counter()
    runner = StageRunner(model, lambda: session_options(threads=threads))
    stage_index = stage_of_node(runner.stages)
    by_key: dict[WeightKey, list[LinearMatch]] = {}
    for m in matches:
        by_key.setdefault(m.key, []).append(m)
    last_stage = {k: max(stage_index.get(id(m.node), 0) for m in ms) for k, ms in by_key.items()}

    live = [dict(f) for f in feeds]
    float_live = [dict(f) for f in feeds] if refine is not None and sequential else None
    tokens = int(sum(f["input_ids"].size for f in feeds if "input_ids" in f))
    weights, info, refined = {}, {}, []
    stages = progress(runner.stages) if progress else runner.stages
    for stage in stages:
        keys = [k for k, s in last_stage.items() if s == stage.index]
        acts: dict[int, ir.Value] = {}
        for k in keys:
            for m in by_key[k]:
                a = _activation(m)
                if a is not None:
                    acts[id(a)] = a
        stats = {
            i: InputStats(int(v.shape[-1]) if v.shape else 0, hessian_mode) for i, v in acts.items()
        }
        names = {v.name: i for i, v in acts.items()}

        def collect(_, captured, names=names, stats=stats, acts=acts):
            for name, x in captured.items():
                st = stats[names[name]]
                if st.K == 0:  # unknown width until the first batch arrives
                    st.__init__(x.shape[-1], hessian_mode)
                st.update(x)

        runner.run_stage(
            stage, live, list(acts.values()), on_batch=collect, keep_outputs=not sequential
        )
        overrides = {}
        for k in keys:
            weight = by_key[k][0].weight
            stat = next(
                (stats[id(a)] for m in by_key[k] if (a := _activation(m)) is not None), None
            )
            names = [m.name for m in by_key[k]]
            q, entry = quantize(k, weight_array(weight, k), stat, names)
            weights[k], info[k] = q, entry
        if float_live is not None:
            targets = _float_targets(runner, stage, float_live, by_key, keys)
            tuned, report = refine(
                stage, {k: by_key[k] for k in keys}, {k: weights[k] for k in keys}, live, targets
            )
            weights.update(tuned)
            if report is not None:
                refined.append(report)
        if sequential:
            for k in keys:
                weight = by_key[k][0].weight
                overrides[weight.name] = _override(weight, k, weights[k])
        if sequential and stage.outputs:
            runner.run_stage(stage, live, [], overrides=overrides, keep_outputs=True)
        runner.release(stage, live)
        if float_live is not None:
            runner.release(stage, float_live)
    return CalibrationResult(weights, info, tokens, time.perf_counter() - start, refined)


def _float_targets(runner, stage, float_live, by_key, keys) -> list[dict[str, np.ndarray]]:
    """Advance the float model through ``stage`` and return, per batch, the float values the
    stage's block reconstruction fits: its outputs, or for the last stage the inputs of its
    output projection."""
    from .blockwise import _float_outputs

    wanted = _float_outputs(stage, list(runner.model.graph.outputs), {k: by_key[k] for k in keys})
    targets: list[dict[str, np.ndarray]] = [{} for _ in float_live]
    if not wanted and not stage.outputs:  # nothing to fit, nothing to hand on
        return targets

    def collect(i, captured):
        targets[i].update(captured)

    runner.run_stage(stage, float_live, wanted, on_batch=collect, keep_outputs=True)
    return targets
