"""`python -m quantx_onnx bench profile MODEL`: where a decode step's time goes, per op type.

ONNX Runtime's own profiler (SessionOptions.enable_profiling) records every node's kernel
time. We run a prefill and then `steps` decode steps, keep the node events of the decode steps
only and add them up per op type. The remainder between the summed kernel times and the whole
`model_run` is ORT's own overhead (scheduling, allocation, input/output copies). For a 3-bit
decoder the QuantX nodes (weight bytes) should dominate; what else shows up is graph cost.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile

import numpy as np

from ..llm import DecoderSession
from ..runtime import session_options
from .decode import prompt_ids, run_once

QUANTX_OPS = ("QxMatMul", "QxMultiMatMul", "QxGather")  # the com.quantx op types


@dataclasses.dataclass
class OpTime:
    op_type: str
    us_per_step: float
    nodes_per_step: float
    share: float  # of the summed kernel time


@dataclasses.dataclass
class DecodeProfile:
    model: str
    steps: int
    run_us_per_step: float  # whole model_run, ORT overhead included
    kernel_us_per_step: float  # sum of node kernel times
    ops: list[OpTime]

    @property
    def quantx_share(self) -> float:
        return sum(o.share for o in self.ops if o.op_type in QUANTX_OPS)


def decode_events(events: list[dict], steps: int) -> tuple[list[dict], list[dict]]:
    """The last `steps` model_run events and the node kernel events inside them."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) < steps:
        raise ValueError(f"profile holds {len(runs)} runs, expected at least {steps}")
    runs = runs[-steps:]
    start = runs[0]["ts"]
    nodes = [
        e
        for e in events
        if e.get("cat") == "Node"
        and e.get("name", "").endswith("_kernel_time")
        and e["ts"] >= start
    ]
    return runs, nodes


def summarize(model: str, events: list[dict], steps: int) -> DecodeProfile:
    runs, nodes = decode_events(events, steps)
    time_of: collections.Counter = collections.Counter()
    count_of: collections.Counter = collections.Counter()
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        time_of[op] += e["dur"]
        count_of[op] += 1
    total = sum(time_of.values()) or 1
    ops = [
        OpTime(op, us / steps, count_of[op] / steps, us / total) for op, us in time_of.most_common()
    ]
    return DecodeProfile(
        model=model,
        steps=steps,
        run_us_per_step=float(np.mean([r["dur"] for r in runs])),
        kernel_us_per_step=total / steps,
        ops=ops,
    )


def profile_decode(
    model: str, threads: int = 2, prompt_tokens: int = 128, steps: int = 32
) -> DecodeProfile:
    """Prefill `prompt_tokens`, then profile `steps` greedy decode steps."""
    with tempfile.TemporaryDirectory(prefix="quantx-profile-") as tmp:
        so = session_options(threads=threads)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        session = DecoderSession(model, options=so)
        run_once(session, prompt_ids(session.vocab, prompt_tokens), steps + 1)
        with open(session.session.end_profiling()) as f:
            events = json.load(f)
    return summarize(str(model), events, steps)


def format_profile(p: DecodeProfile, top: int = 15) -> list[str]:
    lines = [
        f"decode profile of {p.model}: {p.steps} steps, model_run {p.run_us_per_step:.0f} us/step,"
        f" node kernels {p.kernel_us_per_step:.0f} us/step (ORT overhead "
        f"{max(p.run_us_per_step - p.kernel_us_per_step, 0):.0f} us/step)",
        f"  QuantX nodes: {100 * p.quantx_share:.1f}% of kernel time",
        f"  {'op type':<28} {'us/step':>9} {'nodes':>6} {'share':>6}",
    ]
    for o in p.ops[:top]:
        lines.append(
            f"  {o.op_type:<28} {o.us_per_step:9.1f} {o.nodes_per_step:6.0f} {100 * o.share:5.1f}%"
        )
    if len(p.ops) > top:
        rest = p.ops[top:]
        label = f"({len(rest)} more op types)"
        us = sum(o.us_per_step for o in rest)
        lines.append(f"  {label:<28} {us:9.1f} {'':>6} {100 * sum(o.share for o in rest):5.1f}%")
    return lines
