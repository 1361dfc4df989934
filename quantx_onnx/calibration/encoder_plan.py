"""The bit plan of an encoder: which matrices get more bits and which coarser groups within
the budget, from the model's own output on its calibration inputs (no backward pass, no
labels).

A decoder's plan weighs each matrix by the Fisher information of its next-token loss
(:mod:`.sensitivity`); an encoder has no such loss. Here each matrix's sensitivity is measured
directly in ONNX Runtime: the matrix alone is replaced by its round-to-nearest ``--bits``
version and the relative squared error of the model's outputs over a few calibration batches
is divided by the squared weight error, giving s_m (output error per unit of weight error).
Each candidate recipe (``--bits`` up to 4 and 8 bits, groups of 32 or 128) of matrix m is
then priced s_m * |W - W_hat|^2 and :func:`..allocate.allocate` picks the plan of least total
estimated output error within the byte budget, counted over the matrices (embedding tables
keep their own recipe). One session serves every measurement: the weights are made graph
inputs, so each run feeds one matrix's rounded copy.

A text encoder's default (:func:`.encoders.encoder_defaults`): a plan at --bits +
TEXT_ENCODER_MARGIN_BITS, the size of the uniform recipe (groups of 32, hierarchical scales).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from ..allocate import Candidate, allocate
from ..format import Layout, dequantize
from ..model_io import tensor_in_memory
from ..passes import LinearMatch, WeightKey
from ..passes.rule import weight_array
from ..plan import Plan, stored_bytes
from ..quantize.rtn import quantize_rtn
from ..recipes import Recipe
from ..runtime import session_options

SENSITIVITY_BATCHES = 2  # calibration batches each matrix's sensitivity is measured on
PLAN_BITS = (3, 4, 8)  # offered from the run's --bits up
PLAN_GROUPS = (32, 128)


def _in_orientation(weight: ir.Value, key: WeightKey, w_kn: np.ndarray) -> np.ndarray:
    w = w_kn / np.float32(key.alpha) if key.alpha != 1.0 else w_kn
    w = w.T if key.transposed else w
    return np.ascontiguousarray(w.astype(weight.const_value.dtype.numpy()))


def _weight_error(recipe: Recipe, w_kn: np.ndarray, layout: Layout) -> float:
    fmt = recipe.format(*w_kn.shape, layout)
    q = quantize_rtn(w_kn, fmt, symmetric=recipe.symmetric)
    return float(np.square(dequantize(q) - w_kn, dtype=np.float64).sum())


def output_sensitivity(
    model: ir.Model,
    by_key: dict[WeightKey, list[LinearMatch]],
    feeds: list[dict[str, np.ndarray]],
    recipe: Recipe,
    layout: Layout,
    threads: int | None = None,
    progress=None,
) -> dict[WeightKey, float]:
    """s_m per weight: relative output error when only that weight is rounded to ``recipe``,
    per unit of its squared weight error."""
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    values = model.graph.initializers
    for i, init in enumerate(proto.graph.initializer):  # the session is made from bytes
        if init.data_location == onnx.TensorProto.EXTERNAL:
            proto.graph.initializer[i].CopyFrom(
                tensor_in_memory(init.name, values[init.name].const_value)
            )
    names = {ms[0].weight.name for ms in by_key.values()}
    for init in proto.graph.initializer:
        if init.name in names:
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    so = session_options(threads=threads)
    so.log_severity_level = 3  # not one warning per weight for initializers fed as inputs
    sess = ort.InferenceSession(proto.SerializeToString(), so, ["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    feeds = [{k: v for k, v in f.items() if k in wanted} for f in feeds]

    def run(extra: dict) -> list[np.ndarray]:
        return [
            np.concatenate(
                [o.reshape(-1).astype(np.float64) for o in sess.run(None, {**f, **extra})]
            )
            for f in feeds
        ]

    ref = run({})
    power = sum(float(np.square(r).sum()) for r in ref)
    out = {}
    items = list(by_key.items())
    for key, ms in progress(items) if progress else items:
        weight = ms[0].weight
        w = weight_array(weight, key)
        fmt = recipe.format(*w.shape, layout)
        w_hat = dequantize(quantize_rtn(w, fmt, symmetric=recipe.symmetric))
        err_w = float(np.square(w_hat - w, dtype=np.float64).sum())
        got = run({weight.name: _in_orientation(weight, key, w_hat)})
        err_out = sum(float(np.square(g - r).sum()) for g, r in zip(got, ref)) / max(power, 1e-30)
        out[key] = err_out / max(err_w, 1e-30)
    return out


def candidate_recipes(base: Recipe) -> list[Recipe]:
    """``base`` and its variants at PLAN_BITS from ``base.bits`` up, in PLAN_GROUPS. Never fewer
    bits than ``base``: 2-bit bets lost to the uniform recipe on both encoders measured
    (docs/ACCURACY.md), as they did in the decoders' default plan."""
    out = [base]
    for bits in (base.bits, *PLAN_BITS):
        if bits < base.bits:
            continue
        for group in PLAN_GROUPS:
            r = dataclasses.replace(base, bits=bits, group_size=group)
            if r not in out:
                out.append(r)
    return out


def encoder_plan(
    model: ir.Model,
    matches: list[LinearMatch],
    feeds: list[dict[str, np.ndarray]],
    recipe: Recipe,
    recipes: dict[WeightKey, Recipe],
    pinned: set[WeightKey],
    tables: set[WeightKey],
    layout: Layout,
    budget_bpw: float,
    threads: int | None = None,
    progress=None,
) -> Plan:
    """The plan: ``recipes`` holds each weight's recipe without a plan (``recipe`` with
    overrides and the embedding-table recipe applied); ``pinned`` weights keep theirs. The
    budget counts the matrices' weights (the bits per weight encoders are compared by, as
    ONNX Runtime's quantizer leaves tables float); the embedding ``tables`` keep their recipe
    and their bytes come on top."""
    by_key: dict[WeightKey, list[LinearMatch]] = {}
    for m in matches:
        by_key.setdefault(m.key, []).append(m)
    fixed = pinned | tables
    free = {k: ms for k, ms in by_key.items() if k not in fixed}
    sens = output_sensitivity(
        model, free, feeds[:SENSITIVITY_BATCHES], recipe, layout, threads, progress
    )
    candidates = {}
    matrix_weights = table_bytes = 0
    for key, ms in by_key.items():
        w = weight_array(ms[0].weight, key)
        K, N = w.shape
        base = recipes[key]
        base_bytes = stored_bytes(base, K, N, layout)
        if key in tables:
            table_bytes += base_bytes
        else:
            matrix_weights += K * N
        if key in fixed:
            candidates[key] = [Candidate(base, base_bytes, 0.0)]
            continue
        candidates[key] = [
            Candidate(r, stored_bytes(r, K, N, layout), sens[key] * _weight_error(r, w, layout))
            for r in candidate_recipes(base)
        ]
    budget = int(budget_bpw * matrix_weights / 8) + table_bytes
    return Plan.of(allocate(candidates, budget), budget)


def plan_for_run(ir_model, matches, tables, feeds, config, recipe, overrides, layout, progress):
    """:func:`encoder_plan` with the run's recipes: ``recipe`` changed by the user's overrides
    (those weights pinned), embedding tables at their own recipe."""
    from ..allocate import BudgetError
    from ..recipes import recipe_for, table_fields

    if config.budget_bpw is None:
        raise BudgetError("an encoder's bit plan takes --budget-bpw, not --budget-mb")
    user = config.user_overrides(overrides)
    fields = table_fields(config, tables, matches)
    recipes, pinned = {}, set()
    for m in matches:
        names = [m.key.initializer, m.name]
        r = dataclasses.replace(recipe, **fields[m.key]) if m.key in fields else recipe
        recipes[m.key] = recipe_for(r, overrides, names)
        if recipe_for(recipe, user, names) != recipe:
            pinned.add(m.key)
    bar = None if progress is None else (lambda items: progress(items, "measuring sensitivity"))
    return encoder_plan(
        ir_model,
        matches,
        feeds,
        recipe,
        recipes,
        pinned,
        set(fields) & tables,
        layout,
        config.budget_bpw,
        config.threads,
        bar,
    )
