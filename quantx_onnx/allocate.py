"""Bit allocation: per weight matrix, the candidate recipe that minimises the model's
estimated loss under a byte budget: a multiple-choice knapsack, solved exactly by dynamic
programming over the budget cut into ``BINS`` units (each candidate's bytes rounded up to
whole units, so a plan never exceeds the budget). Estimates add over matrices
(second-order, independent errors), which is what makes the problem separable.
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
