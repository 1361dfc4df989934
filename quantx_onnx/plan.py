"""The bit plan of a calibrated run: per weight matrix the recipe (bits, grid) that the measured
sensitivity (:mod:`.calibration.sensitivity`) says costs the model least under the budget
(:mod:`.allocate`).

Candidates per matrix are the run's own grid (group size, scale format) at 2, 3, 4 and 8 bits
(never below ``--bits - 1``; explicit budgets also 5 and 6 bits and other grids, see
:func:`search_recipes`); embedding tables (and the tied lm_head) also keep their
dedicated recipe (4-bit, fp16 scales per 32). Each candidate is priced by its exact stored
bytes and its estimated loss increase, 1/2 tr(dW^T F dW) per token, with dW the error of an
importance-weighted clip-search rounding (the final GPTQ pass lowers every candidate's error
by a similar factor, so the ranking holds), made in the rotated basis for recipes that rotate
(as GPTQ will quantize them). User overrides pin their matrices.

With an explicit budget (``--budget-bpw``, ``--budget-mb``, ``--speedup``) the search is wider:
group sizes 32 and 128 and fp16 or hierarchical scales besides the bits (:data:`SEARCH_GROUPS`),
each candidate also timed by the target's cost model (:mod:`.bench.target_cost`), and
``--budget-bpw`` bounds the whole file: bytes * 8 / (quantized weights) <= X.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import rotation
from .allocate import Candidate, allocate, allocate_with_time, fastest_time, plan_time
from .calibration.sensitivity import Sensitivity
from .format import SUPPORTED_BITS, Layout, WeightFormat, dequantize
from .passes import WeightKey
from .quantize.mse import clip_search
from .quantize.rtn import finish_uniform, quantize_rtn
from .recipes import Recipe

OTHER_BYTES_MARGIN = 4096  # slack for what the estimate of the rest of the file misses


def stored_bytes(recipe: Recipe, K: int, N: int, layout: Layout, scale_bytes: int = 2) -> int:
    fmt = recipe.format(K, N, layout)
    total = 0
    for name, shape in fmt.shapes().items():
        if name == "zero_points" and recipe.symmetric:
            continue
        total += int(np.prod(shape)) * (scale_bytes if name == "scales" else 1)
    return total


# The default plan's widths: 5 and 6 bits (since 2026-12-07) are for explicit budgets, the
# wider search; the default plan was measured without them and keeps its candidates.
DEFAULT_PLAN_BITS = (2, 3, 4, 8)


def candidate_recipes(
    bases: list[Recipe], pinned: bool, two_bits: bool = False, widths=DEFAULT_PLAN_BITS
) -> list[Recipe]:
    """Each base grid at its bits, one step below (never under 3 bits unless ``two_bits`` or
    the base is 2-bit), and every width of ``widths`` above. A pinned weight keeps its first
    base.

    The default plan (the run's bits plus a margin) has no 2-bit candidates: lowering a few
    matrices to 2 bits to raise others to 4 is priced by a round-to-nearest error on the
    calibration text, and on SmolLM2 those bets lost on the genres it did not see (two
    own-text seeds; docs/ACCURACY.md). Explicit budgets below 3 bits need them."""
    if pinned:
        return [bases[0]]
    out = []
    for base in bases:
        lowest = min(base.bits, max(2 if two_bits else 3, base.bits - 1))
        for b in sorted({base.bits, *widths}):
            r = dataclasses.replace(base, bits=b)
            if b >= lowest and r not in out:
                out.append(r)
    return out


SEARCH_GROUPS = (32, 128)  # group sizes of the wider search (explicit budgets)
SEARCH_FP16_GROUPS = (128,)  # ... where fp16 scales (no sub-scales) are also tried


def search_recipes(bases: list[Recipe], pinned: bool) -> list[Recipe]:
    """The wider search: each base at 2-6 bits over SEARCH_GROUPS with its own scale format
    and, where SEARCH_FP16_GROUPS says, fp16 scales; 8 bits on the base grid only."""
    if pinned:
        return [bases[0]]
    out = []
    for r in candidate_recipes(bases, False, two_bits=True, widths=SUPPORTED_BITS):
        variants = [r]
        if r.bits < 8:
            for g in SEARCH_GROUPS:
                variants.append(dataclasses.replace(r, group_size=g))
                if g in SEARCH_FP16_GROUPS:
                    variants.append(dataclasses.replace(r, group_size=g, scale_bits=0))
        for v in variants:
            if v not in out:
                out.append(v)
    return out


class _Problem:
    """One matrix as a candidate quantizes it: W and the Fisher diagonal that weights its clip
    search, and, made on first use, the same in the rotated basis (W' = Q^T W, diag(Q^T F Q))
    for recipes that rotate: a rotated candidate is priced by the error it makes there."""

    def __init__(self, key: WeightKey, w_kn: np.ndarray, sens: Sensitivity):
        self.w = np.asarray(w_kn, np.float32)
        self.fisher = sens.fisher.get(key)
        self.importance = None if self.fisher is None else np.diag(self.fisher)
        self._rotated = None

    def rotated(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._rotated is None:
            imp = None if self.fisher is None else rotation.rotated_diagonal(self.fisher)
            self._rotated = (rotation.rotate_weight(self.w).astype(np.float32), imp)
        return self._rotated


def estimate(
    recipe: Recipe,
    key: WeightKey,
    w_kn: np.ndarray,
    sens: Sensitivity,
    layout: Layout,
    problem: _Problem | None = None,
) -> float:
    """Estimated loss increase of ``recipe`` on W (clip search weighted by the Fisher
    diagonal; symmetric grids round to nearest), in the rotated basis where the recipe
    rotates (its error taken back to W's basis). ``problem`` caches per-matrix work."""
    K, N = w_kn.shape
    problem = problem or _Problem(key, w_kn, sens)
    fmt: WeightFormat = recipe.format(K, N, layout)
    w, imp = problem.rotated() if recipe.rotates(K) else (problem.w, problem.importance)
    if recipe.symmetric:
        q = quantize_rtn(w, fmt, symmetric=True)
    else:
        w_nk = np.ascontiguousarray(w.T)
        scales, lo = clip_search(w_nk, fmt, imp)
        q = finish_uniform(w_nk, fmt, scales, lo, False, np.float16)
    w_hat = dequantize(q)
    if recipe.rotates(K):
        w_hat = rotation.unrotate_weight(w_hat)
    return sens.loss_increase(key, problem.w, w_hat)


@dataclasses.dataclass
class Plan:
    recipes: dict[WeightKey, Recipe]
    budget_bytes: int
    planned_bytes: int
    estimated_loss: float  # summed estimates, nats per token
    # the cost model's view (explicit budgets): kernel time of one decode token, ns
    estimated_ns: float | None = None
    fp32_ns: float | None = None
    fastest_ns: float | None = None  # the fastest plan within the byte budget
    time_budget_ns: float | None = None
    cost_model: str | None = None
    matrices: list[dict] | None = None  # per matrix: the choice and every candidate's price

    @classmethod
    def of(cls, chosen: dict, budget: int) -> Plan:
        """The plan of an allocation (:func:`..allocate.allocate`'s result)."""
        return cls(
            {k: c.recipe for k, c in chosen.items()},
            budget,
            sum(c.bytes for c in chosen.values()),
            float(sum(c.cost for c in chosen.values())),
        )

    def to_json(self) -> dict:
        counts: dict[str, int] = {}
        for r in self.recipes.values():
            counts[r.describe()] = counts.get(r.describe(), 0) + 1
        out = {
            "budget_bytes": self.budget_bytes,
            "planned_bytes": self.planned_bytes,
            "estimated_loss_increase": self.estimated_loss,
            "recipes": counts,
        }
        if self.estimated_ns is not None:
            out.update(
                cost_model=self.cost_model,
                estimated_decode_matmul_ms=self.estimated_ns / 1e6,
                estimated_speedup_vs_fp32=self.fp32_ns / self.estimated_ns,
                max_speedup_vs_fp32=self.fp32_ns / self.fastest_ns,
                speedup_budget=(
                    self.fp32_ns / self.time_budget_ns if self.time_budget_ns else None
                ),
            )
        if self.matrices is not None:
            out["matrices"] = self.matrices
        return out


def price_candidates(
    weights: dict[WeightKey, np.ndarray],
    base: dict[WeightKey, Recipe],
    pinned: set[WeightKey],
    tables: dict[WeightKey, Recipe],
    sens: Sensitivity,
    layout: Layout,
    *,
    search: bool = False,
    cost_model=None,
    matmul_keys: set[WeightKey] | None = None,
    prices: dict | None = None,
    progress=None,
) -> dict[WeightKey, list[Candidate]]:
    """Every candidate of every matrix with its bytes, estimated loss increase and (with a
    cost model) decode kernel time in ns; ``prices`` caches (key, recipe) -> Candidate across
    plans of one sensitivity measurement (a sweep of budgets)."""
    candidates = {}
    items = list(weights.items())
    for key, w in progress(items) if progress else items:
        K, N = w.shape
        bases = [base[key]] + ([tables[key]] if key in tables and tables[key] != base[key] else [])
        pick = search_recipes if search else candidate_recipes
        out = []
        problem = _Problem(key, w, sens)
        for r in pick(bases, key in pinned):
            c = None if prices is None else prices.get((key, r))
            if c is None:
                loss = estimate(r, key, w, sens, layout, problem)
                c = Candidate(r, stored_bytes(r, K, N, layout), loss)
                if prices is not None:
                    prices[(key, r)] = c
            t = 0.0
            if cost_model is not None and (matmul_keys is None or key in matmul_keys):
                t = K * N * cost_model.recipe_ns(r)
            out.append(dataclasses.replace(c, time=t))
        candidates[key] = out
    return candidates


def weight_budget(
    weights: dict[WeightKey, np.ndarray],
    *,
    budget_bpw: float | None,
    budget_mb: float | None,
    other_bytes: int,
    reserved_bytes: int,
    file_bpw: bool = False,
) -> int:
    """Bytes the packed weights may take. ``file_bpw``: --budget-bpw bounds the whole file
    (X bits per quantized weight, the rest of the file included), as --budget-mb does."""
    total = sum(w.shape[0] * w.shape[1] for w in weights.values())
    if budget_mb is None and file_bpw:
        budget_mb = budget_bpw * total / 8 / 1e6
    if budget_mb is not None:
        budget = int(budget_mb * 1e6) - other_bytes - OTHER_BYTES_MARGIN
    else:
        budget = int(budget_bpw * total / 8)
    return budget - reserved_bytes


def plan_from_candidates(
    candidates: dict[WeightKey, list[Candidate]],
    budget: int,
    *,
    speedup: float | None = None,
    fp32_ns: float | None = None,
    cost_model_name: str | None = None,
    names: dict[WeightKey, str] | None = None,
) -> Plan:
    """Allocate under the byte budget (and, with ``speedup``, the time budget fp32_ns / speedup;
    no byte budget: ``budget`` < 0 means unbounded)."""
    if budget < 0:
        budget = sum(max(c.bytes for c in cs) for cs in candidates.values())
    time_budget = fp32_ns / speedup if speedup else None
    if time_budget is not None:
        chosen = allocate_with_time(candidates, budget, time_budget)
    else:
        chosen = allocate(candidates, budget)
    plan = Plan.of(chosen, budget)
    if fp32_ns is not None:
        plan.estimated_ns = plan_time(chosen)
        plan.fp32_ns = fp32_ns
        plan.fastest_ns = fastest_time(candidates, budget)
        plan.time_budget_ns = time_budget
        plan.cost_model = cost_model_name
        plan.matrices = [
            {
                "weight": (names or {}).get(k, k.initializer),
                "recipe": c.recipe.describe(),
                "bytes": c.bytes,
                "estimated_loss": c.cost,
                "decode_ns": c.time,
                "candidates": [
                    [o.recipe.describe(), o.bytes, o.cost, o.time] for o in candidates[k]
                ],
            }
            for k, c in chosen.items()
        ]
    return plan


def make_plan(
    weights: dict[WeightKey, np.ndarray],
    base: dict[WeightKey, Recipe],
    pinned: set[WeightKey],
    tables: dict[WeightKey, Recipe],
    sens: Sensitivity,
    layout: Layout,
    *,
    budget_bpw: float | None = None,
    budget_mb: float | None = None,
    other_bytes: int = 0,
    reserved_bytes: int = 0,
    progress=None,
) -> Plan:
    """``weights``: W[K, N] per key; ``base``: the recipe each would get without a plan;
    ``pinned``: keys the user fixed by --override; ``tables``: embedding-table keys with
    their dedicated recipe (tried besides the run's grid); ``other_bytes``: what the model
    file stores besides the packed weights (counted against --budget-mb); ``reserved_bytes``:
    what later steps add to the quantized weights whatever the plan (end-to-end tuning's
    input scales), taken off the budget first."""
    budget = weight_budget(
        weights,
        budget_bpw=budget_bpw,
        budget_mb=budget_mb,
        other_bytes=other_bytes,
        reserved_bytes=reserved_bytes,
    )
    candidates = price_candidates(weights, base, pinned, tables, sens, layout, progress=progress)
    return Plan.of(allocate(candidates, budget), budget)
