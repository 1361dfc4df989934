"""``optimize --max-ppl-increase P``: the smallest model whose perplexity on a held-out part of
the calibration text stays within (1 + P) x fp32's.

The calibration windows are cut once: the last eighth of the batches (at least one) is held
out and never calibrated on, the rest calibrates every trial. The budget (bits per quantized
weight, whole file) is searched by bisection over :data:`BPW_GRID`; every step is one full
quantization (sensitivity and candidate prices computed once and shared) followed by the
held-out check in ONNX Runtime. When even the largest budget fails the run says so and keeps
nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from . import model_io
from .config import QuantConfig
from .errors import InputError
from .evaluate import log_softmax_nll
from .llm import DecoderSession

BPW_GRID = (2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5, 5.0, 5.5, 6.0, 7.0, 8.5)
HOLDOUT_SHARE = 8  # one batch in this many is held out (at least one)


class QualityNotMet(InputError):
    """No budget of the grid meets the perplexity bound."""


def split_holdout(feeds: list[dict]) -> tuple[list[dict], list[dict]]:
    if len(feeds) < 2:
        raise InputError(
            "--max-ppl-increase needs at least 2 calibration batches (one is held out): "
            "raise --calib-samples"
        )
    held = max(1, len(feeds) // HOLDOUT_SHARE)
    return feeds[:-held], feeds[-held:]


def heldout_nll(model_path, feeds: list[dict], threads: int | None = None) -> float:
    """Mean next-token NLL of the model over the held-out windows (each from an empty cache)."""
    session = DecoderSession(model_path, threads=threads)
    nll, count = 0.0, 0
    for f in feeds:
        for row in np.asarray(f["input_ids"], np.int64):
            logits = session.logits(row[None, :])[0]
            nll += log_softmax_nll(logits[:-1], row[1:])
            count += len(row) - 1
    return nll / count


def optimize_to_quality(
    model,
    output=None,
    config: QuantConfig | None = None,
    *,
    progress=None,
    grid=BPW_GRID,
    log=print,
):
    """Search the budget until the held-out perplexity is within ``config.max_ppl_increase``;
    returns the OptimizeReport of the model kept (its plan holds the search)."""
    from .pipeline import calibration_feeds, default_calibration, optimize

    config = config or QuantConfig()
    bound = config.max_ppl_increase
    if bound is None:
        raise InputError("optimize_to_quality needs config.max_ppl_increase")
    if config.budget_bpw is not None or config.budget_mb is not None:
        raise InputError("--max-ppl-increase searches the budget: drop --budget-bpw/--budget-mb")
    config.validate()
    source = model_io.resolve_input(model)
    output = Path(output) if output is not None else model_io.default_output(source)
    out_model = model_io.check_output(source, output)
    ir_model = model_io.load_model(source)
    folder = source.folder or source.model_path.parent
    calib = default_calibration(ir_model, folder, config)
    if not calib:
        raise InputError("--max-ppl-increase checks on calibration text: give --calib-text")
    cfg = dataclasses.replace(config, calib=calib, max_ppl_increase=None, report=None)
    feeds = calibration_feeds(ir_model, source, cfg.resolved(), None, progress)
    del ir_model
    train, held = split_holdout(feeds)
    base_nll = heldout_nll(source.model_path, held, config.threads)
    limit = math.log1p(bound)  # allowed NLL increase
    held_tokens = sum(int(np.asarray(f["input_ids"]).size) for f in held)
    log(
        f"quality search: held-out {held_tokens} calibration tokens, fp32 perplexity "
        f"{math.exp(base_nll):.3f}, bound +{100 * bound:.1f}% (<= {math.exp(base_nll + limit):.3f})"
    )
    scratch = out_model.parent / f".{out_model.parent.name}.search.{os.getpid()}"
    shared: dict = {"feeds": train}
    trials: dict[float, dict] = {}

    def trial(bpw: float) -> bool:
        dest = scratch / f"b{bpw:.2f}"
        dest_model = dest / "m" if source.folder is not None else dest / out_model.name
        rep = optimize(
            model,
            dest_model,
            dataclasses.replace(cfg, budget_bpw=bpw),
            progress=progress,
            calib_feeds=train,
            shared=shared,
        )
        nll = heldout_nll(rep.output, held, config.threads)
        increase = math.exp(nll - base_nll) - 1
        ok = nll - base_nll <= limit
        trials[bpw] = {
            "budget_bpw": bpw,
            "file_bytes": rep.bytes_after,
            "heldout_ppl": math.exp(nll),
            "increase": increase,
            "passed": ok,
            "report": rep,
            "dest": dest,
        }
        log(
            f"  {bpw:.2f} bits/weight: {rep.bytes_after / 1e6:.2f} MB, held-out perplexity "
            f"{math.exp(nll):.3f} (+{100 * increase:.1f}%) {'passes' if ok else 'fails'}"
        )
        return ok

    try:
        lo, hi = 0, len(grid) - 1  # invariant: every index < lo fails
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            if trial(grid[mid]):
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        if best is None:
            top = trials[grid[-1]]
            raise QualityNotMet(
                f"--max-ppl-increase {bound}: not met at any budget up to {grid[-1]} bits per "
                f"weight; the largest gave +{100 * top['increase']:.1f}% on the held-out "
                f"calibration text (fp32 {math.exp(base_nll):.3f}, quantized "
                f"{top['heldout_ppl']:.3f})"
            )
        kept = trials[grid[best]]
        report = kept["report"]
        _move(kept["dest"], out_model, source.folder is not None)
        report.output = str(out_model)
        search = [
            {k: v for k, v in t.items() if k not in ("report", "dest")} for t in trials.values()
        ]
        report.plan = {
            **(report.plan or {}),
            "quality_search": {
                "bound": bound,
                "heldout_tokens": held_tokens,
                "fp32_heldout_ppl": math.exp(base_nll),
                "chosen_bpw": grid[best],
                "trials": sorted(search, key=lambda t: t["budget_bpw"]),
            },
        }
        if config.report:
            Path(config.report).write_text(json.dumps(report.to_json(), indent=1))
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _move(dest: Path, out_model: Path, folder: bool) -> None:
    """The kept trial's files into the requested output."""
    src_dir = dest / "m" if folder else dest
    out_dir = out_model.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.iterdir(), key=lambda p: p.suffix == ".onnx"):  # the model last
        os.replace(f, out_dir / f.name)
