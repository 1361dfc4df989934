"""The bit plan of a calibrated run: per weight matrix the recipe (bits, grid) that the measured
sensitivity (:mod:`.calibration.sensitivity`) says costs the model least under the budget
(:mod:`.allocate`).

Candidates per matrix are the run's own grid (group size, scale format) at 2, 3, 4 and 8 bits
(never below ``--bits - 1``); embedding tables (and the tied lm_head) also keep their
dedicated recipe (4-bit, fp16 scales per 32). Each candidate is priced by its exact stored
bytes and its estimated loss increase, 1/2 tr(dW^T F dW) per token, with dW the error of an
importance-weighted clip-search rounding (the final GPTQ pass lowers every candidate's error
by a similar factor, so the ranking holds). User overrides pin their matrices.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .allocate import Candidate, allocate
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


def candidate_recipes(bases: list[Recipe], pinned: bool) -> list[Recipe]:
    """Each base grid at 2 (never below its bits - 1), 3, 4 and 8 bits; a pinned weight keeps
    its first base."""
    if pinned:
        return [bases[0]]
    out = []
    for base in bases:
        for b in SUPPORTED_BITS:
            r = dataclasses.replace(base, bits=b)
            if b >= max(2, base.bits - 1) and r not in out:
                out.append(r)
    return out


def estimate(
    recipe: Recipe, key: WeightKey, w_kn: np.ndarray, sens: Sensitivity, layout: Layout
) -> float:
    """Estimated loss increase of ``recipe`` on W (clip search weighted by the Fisher
    diagonal; symmetric grids round to nearest)."""
    K, N = w_kn.shape
    fmt: WeightFormat = recipe.format(K, N, layout)
    w = np.asarray(w_kn, np.float32)
    if recipe.symmetric:
        q = quantize_rtn(w, fmt, symmetric=True)
    else:
        imp = np.diag(sens.fisher[key]) if key in sens.fisher else None
        w_nk = np.ascontiguousarray(w.T)
        scales, lo = clip_search(w_nk, fmt, imp)
        q = finish_uniform(w_nk, fmt, scales, lo, False, np.float16)
    return sens.loss_increase(key, w, dequantize(q))


@dataclasses.dataclass
class Plan:
    recipes: dict[WeightKey, Recipe]
    budget_bytes: int
    planned_bytes: int
    estimated_loss: float  # summed estimates, nats per token

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
        return {
            "budget_bytes": self.budget_bytes,
            "planned_bytes": self.planned_bytes,
            "estimated_loss_increase": self.estimated_loss,
            "recipes": counts,
        }


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
    total = sum(w.shape[0] * w.shape[1] for w in weights.values())
    if budget_mb is not None:
        budget = int(budget_mb * 1e6) - other_bytes - OTHER_BYTES_MARGIN
    else:
        budget = int(budget_bpw * total / 8)
    budget -= reserved_bytes
    candidates = {}
    items = list(weights.items())
    for key, w in progress(items) if progress else items:
        K, N = w.shape
        bases = [base[key]] + ([tables[key]] if key in tables and tables[key] != base[key] else [])
        options = candidate_recipes(bases, key in pinned)
        candidates[key] = [
            Candidate(r, stored_bytes(r, K, N, layout), estimate(r, key, w, sens, layout))
            for r in options
        ]
    return Plan.of(allocate(candidates, budget), budget)
