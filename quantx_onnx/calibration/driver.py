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


def _inputs(matches: list[LinearMatch]) -> list[ir.Value]:
    """The distinct activations a weight's readers multiply it with (none for a Gather)."""
    return list({id(a): a for m in matches if (a := _activation(m)) is not None}.values())


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
    propagation: float = 0.0,
) -> CalibrationResult:
    """``refine(stage, matches, weights, live, targets) -> (weights, report)``, when given,
    tunes each stage's freshly quantized weights against the float model's stage outputs
    (:mod:`.blockwise`); the float model then runs beside the quantized one.

    ``propagation`` > 0 (sequential only) also runs the float model beside the quantized one
    and quantizes, instead of W, the weight that maps the quantized model's inputs closest to
    the float layer's outputs (:meth:`InputStats.propagated`, this fraction of the way), so
    each layer also makes up for the error the layers before it left in its input."""
    start = time.perf_counter()
    runner = StageRunner(model, lambda: session_options(threads=threads))
    stage_index = stage_of_node(runner.stages)
    by_key: dict[WeightKey, list[LinearMatch]] = {}
    for m in matches:
        by_key.setdefault(m.key, []).append(m)
    last_stage = {k: max(stage_index.get(id(m.node), 0) for m in ms) for k, ms in by_key.items()}

    live = [dict(f) for f in feeds]
    beside = sequential and (refine is not None or propagation > 0)
    float_live = [dict(f) for f in feeds] if beside else None
    tokens = int(sum(f["input_ids"].size for f in feeds if "input_ids" in f))
    weights, info, refined = {}, {}, []
    stages = progress(runner.stages) if progress else runner.stages
    for stage in stages:
        keys = [k for k, s in last_stage.items() if s == stage.index]
        acts = {id(a): a for k in keys for a in _inputs(by_key[k])}
        stats = {
            i: InputStats(int(v.shape[-1]) if v.shape else 0, hessian_mode) for i, v in acts.items()
        }
        names = {v.name: i for i, v in acts.items()}
        targets = float_acts = None
        if float_live is not None:
            targets, float_acts = _float_pass(
                runner, stage, float_live, by_key, keys, list(acts.values()) if propagation else []
            )

        def collect(i, captured, names=names, stats=stats, float_acts=float_acts):
            for name, x in captured.items():
                st = stats[names[name]]
                if st.K == 0:  # unknown width until the first batch arrives
                    st.__init__(x.shape[-1], hessian_mode)
                st.update(x, float_acts[i].pop(name, None) if float_acts else None)

        # With propagation, each matmul's input is computed with this layer's earlier weights
        # already quantized (q/k/v before o_proj, gate/up before down_proj): its correction
        # must not make up again for an error those weights' corrections took care of.
        groups = _reader_groups(stage, keys, by_key) if propagation and sequential else [keys]
        overrides = {}
        for group in groups:
            group_acts = {id(a): a for k in group for a in _inputs(by_key[k])}
            runner.run_stage(
                stage,
                live,
                list(group_acts.values()),
                overrides=overrides,
                on_batch=collect,
                keep_outputs=not sequential,
            )
            for k in group:
                weight = by_key[k][0].weight
                stat = next((stats[id(a)] for a in _inputs(by_key[k])), None)
                reader_names = [m.name for m in by_key[k]]
                w = weight_array(weight, k)
                if propagation and stat is not None and _one_input(by_key[k]):
                    w = stat.propagated(w, propagation)
                q, entry = quantize(k, w, stat, reader_names)
                weights[k], info[k] = q, entry
                if sequential:
                    overrides[weight.name] = _override(weight, k, q)
        if refine is not None and float_live is not None:
            tuned, report = refine(
                stage, {k: by_key[k] for k in keys}, {k: weights[k] for k in keys}, live, targets
            )
            weights.update(tuned)
            if report is not None:
                refined.append(report)
            for k in tuned:
                weight = by_key[k][0].weight
                overrides[weight.name] = _override(weight, k, weights[k])
        if sequential and stage.outputs:
            runner.run_stage(stage, live, [], overrides=overrides, keep_outputs=True)
        runner.release(stage, live)
        if float_live is not None:
            runner.release(stage, float_live)
    return CalibrationResult(weights, info, tokens, time.perf_counter() - start, refined)


def _reader_groups(stage, keys, by_key) -> list[list[WeightKey]]:
    """``keys`` grouped by the input their matmuls read, in the order the stage reads them."""
    position = {id(n): i for i, n in enumerate(stage.nodes)}
    groups: dict[int, list[WeightKey]] = {}
    first: dict[int, int] = {}
    for k in keys:
        acts = _inputs(by_key[k])
        group = id(acts[0]) if acts else id(k)
        groups.setdefault(group, []).append(k)
        at = min(position.get(id(m.node), len(position)) for m in by_key[k])
        first[group] = min(first.get(group, at), at)
    return [groups[g] for g in sorted(groups, key=first.get)]


def _one_input(matches: list[LinearMatch]) -> bool:
    """Error propagation changes W for one input: not for a table a Gather also reads (a tied
    lm_head), nor for a weight two matmuls with different inputs share."""
    return len(_inputs(matches)) == 1 and all(m.rule != "gather" for m in matches)


def _float_pass(runner, stage, float_live, by_key, keys, captures):
    """Advance the float model through ``stage``. Returns per batch the float values block
    reconstruction fits (the stage's outputs, or for the last stage the inputs of its output
    projection) and the float values of ``captures``."""
    from .blockwise import _float_outputs

    wanted = _float_outputs(stage, list(runner.model.graph.outputs), {k: by_key[k] for k in keys})
    targets: list[dict[str, np.ndarray]] = [{} for _ in float_live]
    captured: list[dict[str, np.ndarray]] = [{} for _ in float_live]
    if not wanted and not captures and not stage.outputs:  # nothing to fit or hand on
        return targets, captured
    target_names = {v.name for v in wanted}
    capture_names = {v.name for v in captures}

    def collect(i, values):
        for name, x in values.items():
            if name in target_names:
                targets[i][name] = x
            if name in capture_names:
                captured[i][name] = x

    everything = list({id(v): v for v in [*wanted, *captures]}.values())
    runner.run_stage(stage, float_live, everything, on_batch=collect, keep_outputs=True)
    return targets, captured
