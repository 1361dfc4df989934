"""Bit allocation: per weight matrix, the candidate recipe that minimises the model's
estimated loss under a byte budget: a multiple-choice knapsack, solved exactly by dynamic
programming over the budget cut into ``BINS`` units (each candidate's bytes rounded up to
whole units, so a plan never exceeds the budget). Estimates add over matrices
(second-order, independent errors), which is what makes the problem separable.

A second budget, on time (each candidate's kernel time from the target's cost model,
:mod:`.bench.target_cost`), is handled by Lagrangian relaxation (:func:`allocate_with_time`):
the knapsack minimises loss + lambda * time under the byte budget, lambda bisected to the
smallest value whose plan meets the time budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Candidate:
    recipe: object  # a recipes.Recipe (opaque here)
    bytes: int
    cost: float  # estimated loss increase (any unit, the same for all matrices)
    time: float = 0.0  # estimated kernel time (any unit, the same for all matrices)


class BudgetError(ValueError):
    """Not even the smallest candidate of every matrix fits."""


BINS = 100_000  # rounding leaves at most (matrices / BINS) of the budget unused


def allocate(
    candidates: Mapping[Hashable, Sequence[Candidate]], budget_bytes: float, bins: int = BINS
) -> dict[Hashable, Candidate]:
    """The plan (one candidate per key) of least total cost whose bytes fit the budget."""
    if not candidates:
        return {}
    keys = list(candidates)
    smallest = sum(min(c.bytes for c in candidates[k]) for k in keys)
    if smallest > budget_bytes:
        raise BudgetError(
            f"the budget of {budget_bytes / 1e6:.2f} MB is below the smallest plan "
            f"({smallest / 1e6:.2f} MB)"
        )
    unit = max(budget_bytes / bins, 1e-9)
    cap = int(budget_bytes // unit)
    inf = np.inf
    best = np.zeros(cap + 1)  # best[b]: least cost of the matrices so far within b units
    choices = np.zeros((len(keys), cap + 1), np.int16)
    for i, k in enumerate(keys):
        new = np.full(cap + 1, inf)
        for j, c in enumerate(candidates[k]):
            u = int(np.ceil(c.bytes / unit - 1e-9))
            if u > cap:
                continue
            shifted = np.full(cap + 1, inf)
            shifted[u:] = best[: cap + 1 - u] + c.cost
            better = shifted < new
            new[better] = shifted[better]
            choices[i, better] = j
        best = new
    b = int(np.argmin(best))
    if not np.isfinite(best[b]):  # within rounding of the smallest plan: that plan
        return {k: min(candidates[k], key=lambda c: (c.bytes, c.cost)) for k in keys}
    plan = {}
    for i in range(len(keys) - 1, -1, -1):
        c = candidates[keys[i]][choices[i, b]]
        plan[keys[i]] = c
        b -= int(np.ceil(c.bytes / unit - 1e-9))
    return {k: plan[k] for k in keys}


def plan_time(plan: Mapping[Hashable, Candidate]) -> float:
    return float(sum(c.time for c in plan.values()))


def fastest_time(
    candidates: Mapping[Hashable, Sequence[Candidate]], budget_bytes: float, bins: int = BINS
) -> float:
    """The least total time of any plan within the byte budget."""
    timed = {k: [dataclasses.replace(c, cost=c.time) for c in cs] for k, cs in candidates.items()}
    return plan_time(allocate(timed, budget_bytes, bins))


def allocate_with_time(
    candidates: Mapping[Hashable, Sequence[Candidate]],
    budget_bytes: float,
    time_budget: float,
    bins: int = BINS,
    iterations: int = 40,
) -> dict[Hashable, Candidate]:
    """The plan of least cost within both budgets (Lagrangian on time: exact for the plans on
    the lower convex hull of (time, cost), the usual case with many matrices)."""
    plan = allocate(candidates, budget_bytes, bins)
    if plan_time(plan) <= time_budget:
        return plan
    fastest = fastest_time(candidates, budget_bytes, bins)
    if fastest > time_budget * (1 + 1e-12):
        raise BudgetError(
            f"no plan within the byte budget is fast enough: the fastest is "
            f"{fastest / time_budget:.3f}x the time budget"
        )

    def priced(lam: float):
        return {
            k: [dataclasses.replace(c, cost=c.cost + lam * c.time) for c in cs]
            for k, cs in candidates.items()
        }

    total_cost = sum(max(c.cost for c in cs) for cs in candidates.values()) or 1.0
    total_time = sum(min(c.time for c in cs) for cs in candidates.values()) or 1.0
    lo, hi = 0.0, total_cost / total_time
    while plan_time(allocate(priced(hi), budget_bytes, bins)) > time_budget:
        hi *= 4.0
        if hi > 1e12 * total_cost / total_time:  # time dominates: the fastest plan
            timed = {
                k: [dataclasses.replace(c, cost=c.time) for c in cs] for k, cs in candidates.items()
            }
            chosen = allocate(timed, budget_bytes, bins)
            return {
                k: next(c for c in candidates[k] if c.recipe == v.recipe and c.bytes == v.bytes)
                for k, v in chosen.items()
            }
    best = None
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        trial = allocate(priced(mid), budget_bytes, bins)
        if plan_time(trial) <= time_budget:
            hi, best = mid, trial
        else:
            lo = mid
        if hi - lo <= 1e-4 * hi:
            break
    if best is None:
        best = allocate(priced(hi), budget_bytes, bins)
    # back to the candidates' own costs
    return {
        k: next(c for c in candidates[k] if c.recipe == v.recipe and c.bytes == v.bytes)
        for k, v in best.items()
    }
