"""Block-output reconstruction: after a decoder layer's weights are quantized (GPTQ), tune them
on what the whole layer computes, as AutoRound and OmniQuant do.

Per stage (one decoder layer, :mod:`.stages`) the quantized layer runs in torch
(:mod:`.torch_graph`) on the inputs the quantized model gives it and is fitted to what the
float model's layer outputs on the float model's own inputs, so a layer also makes up for
the error of the layers before it. What is tuned per weight is what the file can store
unchanged: each code may move by one step (``clamp(q + round(v))``, sign gradient descent on
``v`` in [-1, 1], gradients straight through the rounding) and each output column's scale
(a multiplier, Adam). The loss is the squared error of each token's layer output relative to
that token's output norm: SmolLM2's first token carries activations a hundred times larger
than the rest (an attention sink), and a plain squared error would spend the whole fit on it
(the same reason ``--hessian norm`` weights GPTQ's tokens).

A layer keeps the tuned weights only if they lower its loss over all calibration batches.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..format import QuantizedWeight
from ..passes import LinearMatch, WeightKey
from .e2e import _node_wrapper, _Rounding, scale_columns, tuning_step
from .stages import Stage, _needed
from .torch_graph import TorchStage


@dataclasses.dataclass
class BlockReport:
    stage: int
    loss_before: float  # mean relative squared error of the layer output, all batches
    loss_after: float
    kept: bool
    seconds: float


def _float_outputs(stage: Stage, model_outputs, matches) -> list:
    """What the stage hands on; for the last stage, what its output projection reads (the
    logits themselves would cost vocabulary-wide targets)."""
    outs = list(stage.outputs)
    if not outs:
        ends = {id(v) for v in model_outputs}
        outs = [
            m.node.inputs[0]
            for ms in matches.values()
            for m in ms
            if m.rule != "gather" and any(id(o) in ends for o in m.node.outputs)
        ]
    return [v for v in outs if id(v) in stage.produced]


def _downstream(stage: Stage, nodes) -> set[int]:
    """ids of the stage's values computed from ``nodes``' outputs."""
    reached = {id(v) for n in nodes for v in n.outputs}
    for node in stage.nodes:  # stage nodes are in execution order
        if any(v is not None and id(v) in reached for v in node.inputs):
            reached.update(id(v) for v in node.outputs)
    return reached


def refine_stage(
    model,
    stage: Stage,
    matches: dict[WeightKey, list[LinearMatch]],
    weights: dict[WeightKey, QuantizedWeight],
    live: list[dict[str, np.ndarray]],
    targets: list[dict[str, np.ndarray]],
    *,
    steps: int = 64,
    lr: float = 5e-3,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[dict[WeightKey, QuantizedWeight], BlockReport | None]:
    """Tuned ``weights`` (those of this stage: every reader inside it) and a report, or the
    weights unchanged and None when the stage has nothing to tune. ``live``/``targets``:
    per batch, the stage's inputs on the quantized path / its float outputs."""
    import torch

    start = time.perf_counter()
    tunable = {
        k: q
        for k, q in weights.items()
        if q.codebook is None
        and not q.fmt.rotate  # learned rounding moves codes of W, not of a rotated W'
        and all(m.rule != "gather" for m in matches[k])
    }
    affected = _downstream(stage, [m.node for k in tunable for m in matches[k]])
    outputs = [
        v
        for v in _float_outputs(stage, list(model.graph.outputs), matches)
        if id(v) in affected and targets and np.issubdtype(targets[0][v.name].dtype, np.floating)
    ]
    if not outputs or not tunable or not live:
        return weights, None
    graph = TorchStage(_needed(stage, outputs), stage.inputs, outputs, device)
    dev = graph.device
    rounders = {k: _Rounding(torch, k, q, dev) for k, q in tunable.items()}
    columns = {k: torch.ones(q.fmt.N, device=dev, requires_grad=True) for k, q in tunable.items()}
    wrap = {
        m.node.outputs[0].name: _node_wrapper(m, columns[k], None)
        for k in tunable
        for m in matches[k]
    }
    opt = torch.optim.Adam(list(columns.values()), lr=lr)

    def batch(i):
        feed = {n: torch.from_numpy(np.asarray(live[i][n])).to(dev) for n in graph.input_names}
        want = [torch.from_numpy(np.asarray(targets[i][v.name])).to(dev) for v in outputs]
        return feed, want

    def loss_of(feed, want, subs):
        got = graph(feed, subs, wrap=wrap)
        total = 0.0
        for v, t in zip(outputs, want):
            y = got[v.name].float().reshape(-1, t.shape[-1])
            t = t.float().reshape(-1, t.shape[-1])
            err = (y - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)
            total = total + err.mean()
        return total

    def subs():
        return {k.initializer: r.weight() for k, r in rounders.items()}

    def full_loss() -> float:
        with torch.no_grad():
            s = subs()
            return float(np.mean([loss_of(*batch(i), s).item() for i in range(len(live))]))

    before = full_loss()
    rng = np.random.default_rng(seed + stage.index)
    multipliers, offsets = list(columns.values()), list(rounders.values())
    for step in range(steps):
        loss = loss_of(*batch(int(rng.integers(len(live)))), subs())
        tuning_step(torch, loss, opt, multipliers, offsets, lr, step, steps)
    after = full_loss()
    kept = after < before
    out = dict(weights)
    if kept:
        for k, r in rounders.items():
            out[k] = scale_columns(r.tuned(), columns[k].detach().cpu().numpy())
    report = BlockReport(stage.index, before, after, kept, time.perf_counter() - start)
    return out, report
