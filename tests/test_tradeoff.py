"""Trade-offs (issue 10): the target's cost model, time budgets in the allocator, --budget-bpw
over the whole file, --speedup, --max-ppl-increase, and the sweep. Tiny models, no timing
thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.allocate import BudgetError, Candidate, allocate, allocate_with_time, plan_time
from quantx_onnx.bench import target_cost

from .helpers import assert_means_its_reference, llm_feeds, quantx_session


def _timed_instance(rng, matrices=8):
    """Per matrix: 2/3/4-bit options; the odd width is slow (as 3-bit bit planes are)."""
    out = {}
    for m in range(matrices):
        size = int(rng.integers(100, 1000))
        w = float(rng.uniform(0.1, 10))
        out[m] = [
            Candidate(
                (b, g), size * b + size // g, w * 4.0**-b * (1 + g / 256), size * (b + (b == 3))
            )
            for b in (2, 3, 4)
            for g in (32, 128)
        ]
    return out


def test_time_budget_is_met_and_costs_rise_as_it_tightens(rng):
    cands = _timed_instance(rng)
    budget = 0.8 * sum(max(c.bytes for c in cs) for cs in cands.values())
    free = allocate(cands, budget)
    costs, times = [], []
    for frac in (1.0, 0.95, 0.9, 0.85):
        limit = frac * plan_time(free)
        plan = allocate_with_time(cands, budget, limit)
        assert sum(c.bytes for c in plan.values()) <= budget
        assert plan_time(plan) <= limit
        costs.append(sum(c.cost for c in plan.values()))
        times.append(plan_time(plan))
    assert costs == sorted(costs)  # a tighter time budget never costs less
    with pytest.raises(BudgetError):
        allocate_with_time(cands, budget, 0.1 * plan_time(free))


def test_more_bytes_never_cost_more_under_a_time_budget(rng):
    cands = _timed_instance(rng)
    top = sum(max(c.bytes for c in cs) for cs in cands.values())
    limit = 0.95 * plan_time(allocate(cands, top))
    costs = [
        sum(c.cost for c in allocate_with_time(cands, f * top, limit).values())
        for f in (0.7, 0.8, 0.9, 1.0)
    ]
    assert all(a >= b - 1e-12 for a, b in zip(costs, costs[1:])), costs


def test_calibrate_target_measures_caches_and_has_arm_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTX_CACHE", str(tmp_path))
    model, path = target_cost.calibrate_target("auto", 1, working_set_mb=0.5, runs=1)
    assert path is not None and path.is_file() and path.parent == tmp_path / "targets"
    assert model.source == "measured" and len(model.decode_ns) >= 12
    assert all(v > 0 for v in [*model.decode_ns.values(), *model.prefill_ns.values()])
    assert model.fp32_decode_ns > 0 and model.fp32_prefill_ns > 0
    again, path2 = target_cost.calibrate_target("auto", 1)  # cached: no measurement
    assert path2 == path and again.decode_ns == model.decode_ns
    arm = target_cost.load_cost_model("arm64-dotprod")
    assert arm.source == "built-in default" and all(v > 0 for v in arm.decode_ns.values())
    # an unmeasured group falls back to the nearest measured one of the same bits and scales
    assert model.ns_per_weight(3, 256, 4) == model.ns_per_weight(3, 128, 4)


@pytest.fixture(scope="module")
def calib(tiny_llama):
    sess = quantx_session(tiny_llama / "model.onnx")
    return [llm_feeds(sess, seq=16, batch=2, seed=s) for s in range(3)]


@pytest.fixture
def cost_cache(tmp_path_factory, monkeypatch):
    """A small measured cost model, cached once for every test of the module."""
    folder = tmp_path_factory.getbasetemp() / "qxcache"
    monkeypatch.setenv("QUANTX_CACHE", str(folder))
    target_cost.calibrate_target("auto", 2, working_set_mb=0.5, runs=1)
    return folder


def test_budget_bpw_bounds_the_whole_file_and_ranks_plans(tiny_llama, calib, tmp_path, cost_cache):
    """Every quantized weight counts (the table too) and the file may not exceed X bits per
    weight; a larger budget buys a lower estimated loss. (A tiny model's graph framing is a
    large part of its file, hence the large budgets.)"""
    shared: dict = {}
    losses = []
    for bpw in (10.0, 12.0, 16.0):
        out = tmp_path / str(bpw)
        rep = optimize(
            tiny_llama,
            out,
            QuantConfig(budget_bpw=bpw, e2e_epochs=0),
            calib_feeds=calib,
            shared=shared,
        )
        size = (out / "model.onnx").stat().st_size
        assert 8 * size / rep.quantized_weights <= bpw, (bpw, size)
        assert rep.plan["planned_bytes"] <= rep.plan["budget_bytes"]
        assert rep.plan["estimated_speedup_vs_fp32"] > 0 and len(rep.plan["matrices"]) == len(
            rep.linear.weights
        )
        losses.append(rep.plan["estimated_loss_increase"])
    assert losses == sorted(losses, reverse=True)
    assert "sensitivity" in shared and shared["prices"]  # measured once, priced once


def test_speedup_makes_a_faster_plan_of_the_same_size(tiny_llama, calib, tmp_path, cost_cache):
    shared: dict = {}
    acc = optimize(
        tiny_llama, tmp_path / "acc", QuantConfig(budget_bpw=12.0, e2e_epochs=0),
        calib_feeds=calib, shared=shared,
    )  # fmt: skip
    lo = acc.plan["estimated_speedup_vs_fp32"]
    hi = acc.plan["max_speedup_vs_fp32"]
    assert hi >= lo
    want = lo + 0.9 * (hi - lo)
    fast = optimize(
        tiny_llama, tmp_path / "fast", QuantConfig(budget_bpw=12.0, speedup=want, e2e_epochs=0),
        calib_feeds=calib, shared=shared,
    )  # fmt: skip
    assert fast.plan["estimated_speedup_vs_fp32"] >= want * (1 - 1e-9)
    assert fast.plan["estimated_loss_increase"] >= acc.plan["estimated_loss_increase"] - 1e-12
    assert 8 * fast.bytes_after / fast.quantized_weights <= 12.0
    from quantx_onnx.errors import InputError

    with pytest.raises(InputError, match="speedup"):
        optimize(
            tiny_llama, tmp_path / "never", QuantConfig(budget_bpw=12.0, speedup=hi * 10),
            calib_feeds=calib, shared=shared,
        )  # fmt: skip


TEXT = " ".join(
    f"the {a} {b} of the {c} was {d} and {e}."
    for a in ("small", "old", "red", "quiet", "large")
    for b in ("house", "river", "town", "field")
    for c in ("north", "south", "valley", "coast")
    for d in ("seen", "built", "known", "named")
    for e in ("then", "later", "again")
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_max_ppl_increase_searches_the_budget(
    tiny_with_tokenizer, text_file, tmp_path, cost_cache, monkeypatch
):
    from quantx_onnx import tradeoff
    from quantx_onnx.tradeoff import QualityNotMet, optimize_to_quality

    cfg = QuantConfig(
        calib=str(text_file), calib_samples=8, calib_seq_len=32, e2e_epochs=0,
        max_ppl_increase=0.5, report=str(tmp_path / "r.json"),
    )  # fmt: skip
    logs = []
    rep = optimize_to_quality(
        tiny_with_tokenizer, tmp_path / "q", cfg, grid=(8.0, 12.0, 16.0), log=logs.append
    )
    search = rep.plan["quality_search"]
    kept = next(t for t in search["trials"] if t["budget_bpw"] == search["chosen_bpw"])
    assert kept["passed"] and kept["increase"] <= 0.5
    assert (tmp_path / "q" / "model.onnx").is_file() and rep.output.endswith("model.onnx")
    assert json.loads((tmp_path / "r.json").read_text())["plan"]["quality_search"]
    assert not list(tmp_path.glob(".*search*"))  # the trials are gone
    # a model that never gets close enough (a random tiny model's perplexity barely moves)
    real = tradeoff.heldout_nll
    monkeypatch.setattr(
        tradeoff,
        "heldout_nll",
        lambda path, feeds, threads=None: (
            real(path, feeds, threads) + (1.0 if "search" in str(path) else 0.0)
        ),
    )
    with pytest.raises(QualityNotMet, match="not met"):
        optimize_to_quality(
            tiny_with_tokenizer,
            tmp_path / "q2",
            QuantConfig(
                calib=str(text_file),
                calib_samples=8,
                calib_seq_len=32,
                e2e_epochs=0,
                max_ppl_increase=0.01,
            ),  # fmt: skip
            grid=(8.0, 9.0),
            log=logs.append,
        )
    assert not (tmp_path / "q2" / "model.onnx").exists()


def test_sweep_writes_the_table_and_the_plot(tiny_with_tokenizer, text_file, tmp_path, cost_cache):
    from quantx_onnx.sweep import run_sweep

    logs = []
    result = run_sweep(
        tiny_with_tokenizer,
        tmp_path / "sweep",
        calib=str(text_file),
        eval_texts=[str(text_file)],
        budgets=(12.0, 16.0),
        uniform_bits=(3,),
        speed_at=(12.0,),
        max_tokens=512,
        window=64,
        decode_rounds=1,
        config=QuantConfig(calib_samples=8, calib_seq_len=32, e2e_epochs=0),
        log=logs.append,
    )
    names = {r["name"] for r in result["rows"]}
    assert {"fp32", "uniform-3bit", "budget-12.00", "budget-16.00", "speed-12.00"} <= names
    for r in result["rows"]:
        assert r["file_mb"] > 0 and r["decode_tok_s"] > 0 and np.isfinite(r["ppl"][str(text_file)])
        if r["kind"] in ("budget", "speed"):
            assert r["file_bpw"] <= r["budget_bpw"]
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "budget-12.00" in table and "--speedup" in table
    png = (tmp_path / "sweep" / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run resumes: nothing is rebuilt
    logs.clear()
    run_sweep(
        tiny_with_tokenizer, tmp_path / "sweep", calib=str(text_file),
        eval_texts=[str(text_file)], budgets=(12.0, 16.0), uniform_bits=(3,), speed_at=(12.0,),
        max_tokens=512, window=64, decode_rounds=1,
        config=QuantConfig(calib_samples=8, calib_seq_len=32, e2e_epochs=0), log=logs.append,
    )  # fmt: skip
    assert not any(": optimize " in line for line in logs)


def test_budgets_between_4_and_8_bits_use_5_and_6_bit_codes(
    tiny_llama, calib, tmp_path, cost_cache
):
    """The wider search offers 5 and 6 bits: a budget between the 4- and 8-bit plans takes
    them, and the file (float path) computes what its numpy-dequantized reference does."""
    shared: dict = {}
    chosen = set()
    for bpw in (10.0, 11.0):
        out = tmp_path / str(bpw)
        rep = optimize(
            tiny_llama,
            out,
            QuantConfig(budget_bpw=bpw, e2e_epochs=0, accuracy_level=0),
            calib_feeds=calib,
            shared=shared,
        )
        bits = {m["recipe"].split()[1] for m in rep.plan["matrices"]}
        chosen |= bits
        if bits & {"5-bit", "6-bit"}:
            assert_means_its_reference(out / "model.onnx", calib[0])
    assert chosen & {"5-bit", "6-bit"}, chosen
