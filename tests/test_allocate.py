"""The bit allocator against brute force, and the plan's pricing of recipes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from quantx_onnx.allocate import BINS, BudgetError, Candidate, allocate
from quantx_onnx.format import Layout, pack, packed_bytes
from quantx_onnx.plan import candidate_recipes, search_recipes, stored_bytes
from quantx_onnx.quantize.rtn import quantize_rtn
from quantx_onnx.recipes import Recipe


def _instance(rng, matrices=5, options=4):
    """Options per matrix with convex cost in bytes (as quantization error falls ~4x a bit)."""
    out = {}
    for m in range(matrices):
        size = int(rng.integers(100, 1000))
        weight = float(rng.uniform(0.1, 10))
        out[m] = [Candidate(b, size * b, weight * 4.0**-b) for b in range(2, 2 + options)]
    return out


def _brute(cands, budget):
    best = None
    for combo in itertools.product(*cands.values()):
        size = sum(c.bytes for c in combo)
        cost = sum(c.cost for c in combo)
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocation_fits_and_is_near_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    cands = _instance(rng)
    lo = sum(min(c.bytes for c in o) for o in cands.values())
    hi = sum(max(c.bytes for c in o) for o in cands.values())
    for budget in np.linspace(lo, hi, 7):
        plan = allocate(cands, budget)
        assert sum(c.bytes for c in plan.values()) <= budget
        cost = sum(c.cost for c in plan.values())
        # exact up to the rounding of each matrix's bytes to budget / BINS
        slack = len(cands) * budget / BINS
        reference = _brute(cands, budget - slack)
        if reference is not None:
            assert cost <= reference * (1 + 1e-9)


def test_more_budget_never_costs_more():
    cands = _instance(np.random.default_rng(1), matrices=12)
    lo = sum(min(c.bytes for c in o) for o in cands.values())
    costs = [sum(c.cost for c in allocate(cands, lo * f).values()) for f in (1, 1.2, 1.5, 2, 3)]
    assert all(a >= b for a, b in zip(costs, costs[1:]))
    assert costs[0] > costs[-1]


def test_an_impossible_budget_is_refused():
    cands = _instance(np.random.default_rng(2))
    lo = sum(min(c.bytes for c in o) for o in cands.values())
    with pytest.raises(BudgetError, match="below the smallest plan"):
        allocate(cands, lo - 1)


@pytest.mark.parametrize(
    "recipe",
    [Recipe(3, 32, scale_bits=4), Recipe(4, 64), Recipe(2, 128, symmetric=True), Recipe(8, 32)],
)
def test_stored_bytes_are_the_packed_bytes(rng, recipe):
    K, N = 200, 40  # a partial group and a partial tile
    w = rng.standard_normal((K, N)).astype(np.float32)
    q = quantize_rtn(w, recipe.format(K, N, Layout.TILE16), symmetric=recipe.symmetric)
    assert stored_bytes(recipe, K, N, Layout.TILE16) == packed_bytes(pack(q))


def test_candidates_span_the_bits_of_each_grid():
    base = Recipe(3, 32, "gptq", scale_bits=4)
    table = Recipe(4, 32, "gptq")
    got = candidate_recipes([base, table], pinned=False, two_bits=True)
    assert [r.bits for r in got if r.scale_bits] == [2, 3, 4, 8]
    assert [r.bits for r in got if not r.scale_bits] == [3, 4, 8]
    # the default plan's: no 2-bit candidates
    got = candidate_recipes([base, table], pinned=False)
    assert [r.bits for r in got if r.scale_bits] == [3, 4, 8]
    assert [r.bits for r in got if not r.scale_bits] == [3, 4, 8]
    two = Recipe(2, 32, "gptq", scale_bits=4)  # a 2-bit run keeps its own bits
    assert [r.bits for r in candidate_recipes([two], pinned=False)] == [2, 3, 4, 8]
    assert candidate_recipes([base, table], pinned=True) == [base]
    # explicit budgets search every width the format has, 5 and 6 bits included
    got = search_recipes([base, table], pinned=False)
    assert sorted({r.bits for r in got}) == [2, 3, 4, 5, 6, 8]
    assert {r.group_size for r in got if r.bits == 5} == {32, 128}
