"""How much each weight matrix's quantization error costs the model: a Fisher-weighted
Hessian per matrix from one forward and backward pass of the float model over calibration
text, in torch (:mod:`.torch_graph`).

What quantization costs is the divergence of the model's next-token distribution from the
float one. Its second-order expansion is the Fisher information: with labels y_t drawn from
the float model's own distribution at every position, inputs x_t of a matrix and gradients
g_t of -log p(y_t) at its output,

    KL ~= 1/2 * sum_t sum_j g_tj^2 (dW^T x_t)_j^2  ~=  1/2 * tr(dW^T F dW),
    F = sum_t mean_j(g_tj^2) x_t x_t^T

(output channels averaged, as GuidedQuant does). Divided by the number of positions it is in
nats per token, the scale of a log-perplexity increase. An embedding table read by a Gather
adds the lookup's own term, 1/2 * sum_v r_v |dE_v|^2, with r_v the squared gradient (mean over
channels) summed over every lookup of row v.

The output projection (the matrix whose product is the logits) is the exception to channel
averaging: its output channels are the vocabulary, and the KL's curvature in logit v is the
model's probability p_tv, so an error on a token the model never predicts costs nothing. Its
term is 1/2 * sum_v pi_v dw_v^T Hbar dw_v, with pi_v = sum_t p_tv and Hbar the mean h_t h_t^T
of its inputs (p and h taken as independent). Averaging the channels there instead
overestimates a 4-bit tied SmolLM2 table's cost twentyfold. tests/test_sensitivity.py checks
the estimate against the KL measured in ONNX Runtime. :mod:`..allocate` compares estimates
across matrices and recipes.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from ..passes import LinearMatch, WeightKey
from ..passes.subgraph import backward_slice
from .torch_graph import TorchStage


@dataclasses.dataclass
class Sensitivity:
    fisher: dict[WeightKey, np.ndarray]  # F [K, K] per weight (float64), summed over tokens
    rows: dict[WeightKey, np.ndarray]  # r [N] for tables read by a Gather (rows of E = W^T)
    tokens: int
    seconds: float
    # the output projection: Hbar [K, K] (mean over tokens) and pi [N] (summed over tokens)
    output_hessian: dict[WeightKey, np.ndarray] = dataclasses.field(default_factory=dict)
    output_probs: dict[WeightKey, np.ndarray] = dataclasses.field(default_factory=dict)

    def loss_increase(self, key: WeightKey, w_kn: np.ndarray, w_hat_kn: np.ndarray) -> float:
        """Estimated increase of the mean next-token loss (nats) when W becomes W_hat."""
        d = np.asarray(w_hat_kn, np.float64) - np.asarray(w_kn, np.float64)
        cost = 0.0
        if key in self.fisher:
            cost += float(np.einsum("kn,kn->", d, self.fisher[key] @ d))
        if key in self.rows:
            cost += float(np.square(d).sum(axis=0) @ self.rows[key])
        if key in self.output_hessian:
            per_column = np.einsum("kn,kn->n", d, self.output_hessian[key] @ d)
            cost += float(per_column @ self.output_probs[key])
        return 0.5 * cost / max(self.tokens, 1)


def _draw(torch, probs, gen):
    """One label per row of ``probs`` [T, V], by inverting each row's cumulative sum (the
    same distribution as torch.multinomial, which is ten times slower at this size)."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(len(cdf), 1, generator=gen, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).reshape(-1).clamp_(max=probs.shape[-1] - 1)


def _logits(model: ir.Model) -> ir.Value:
    for v in model.graph.outputs:
        if v.name == "logits":
            return v
    raise ValueError("sensitivity needs a decoder with a 'logits' output")


def measure(
    model: ir.Model,
    matches: list[LinearMatch],
    feeds: list[dict[str, np.ndarray]],
    *,
    device: str = "cpu",
    seed: int = 0,
    progress=None,
) -> Sensitivity:
    """Fisher-weighted Hessians of every matched weight over ``feeds`` (decoder prefill feeds),
    with one label per position drawn from the float model's own next-token distribution."""
    import torch

    start = time.perf_counter()
    logits = _logits(model)
    graph = TorchStage(backward_slice([logits]), list(model.graph.inputs), [logits], device)
    dev = graph.device
    linear = [m for m in matches if m.rule != "gather"]
    gathers = [m for m in matches if m.rule == "gather"]
    outputs = {m.node.outputs[0].name for m in linear + gathers}
    leaves = {m.node.outputs[0].name for m in gathers}  # gradients start at the lookups
    keep = sorted(outputs | {m.node.inputs[0].name for m in linear})
    keep += sorted({m.node.inputs[1].name for m in gathers} - set(keep))

    def hook(name, t):
        if name in leaves and not t.requires_grad:
            return t.detach().requires_grad_(True)
        if name in outputs and t.requires_grad:
            t.retain_grad()
        return t

    head = [m for m in linear if m.node.outputs[0].name == logits.name]  # the output projection
    linear = [m for m in linear if m not in head]
    fisher: dict[WeightKey, torch.Tensor] = {}
    rows: dict[WeightKey, torch.Tensor] = {}
    out_h: dict[WeightKey, torch.Tensor] = {}
    out_p: dict[WeightKey, torch.Tensor] = {}
    tokens = 0
    gen = torch.Generator(device=dev).manual_seed(seed)
    for f in progress(feeds) if progress else feeds:
        feed = {n: torch.from_numpy(np.asarray(f[n])).to(dev) for n in graph.input_names}
        values = graph(feed, keep=keep, hook=hook)
        z = values[logits.name].float().reshape(-1, values[logits.name].shape[-1])
        with torch.no_grad():  # labels drawn from the model itself: the true Fisher
            probs = torch.softmax(z, dim=-1)
            labels = _draw(torch, probs, gen)
            for m in head:
                x = values[m.node.inputs[0].name].detach().float()
                x = x.reshape(-1, x.shape[-1])
                h, pi = (x.T @ x).double(), probs.double().sum(dim=0)
                out_h[m.key] = out_h[m.key] + h if m.key in out_h else h
                out_p[m.key] = out_p[m.key] + pi if m.key in out_p else pi
            del probs
        loss = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
        loss.backward()
        with torch.no_grad():
            for m in linear:
                x = values[m.node.inputs[0].name].detach()
                g = values[m.node.outputs[0].name].grad
                if g is None:  # not upstream of the loss
                    continue
                x = x.reshape(-1, x.shape[-1]).float()
                w = g.reshape(-1, g.shape[-1]).float().square().mean(dim=1)
                h = ((x * w[:, None]).T @ x).double()  # float32 per batch, float64 sums
                fisher[m.key] = fisher[m.key] + h if m.key in fisher else h
            for m in gathers:
                g = values[m.node.outputs[0].name].grad
                if g is None:
                    continue
                table = m.weight.const_value.shape[0]
                idx = values[m.node.inputs[1].name].reshape(-1).long() % table
                r = torch.zeros(table, dtype=torch.float64, device=dev)
                r.index_add_(0, idx, g.reshape(len(idx), -1).double().square().mean(dim=1))
                rows[m.key] = rows[m.key] + r if m.key in rows else r
        tokens += int(labels.numel())
    return Sensitivity(
        {k: v.cpu().numpy() for k, v in fisher.items()},
        {k: v.cpu().numpy() for k, v in rows.items()},
        tokens,
        time.perf_counter() - start,
        {k: v.cpu().numpy() / max(tokens, 1) for k, v in out_h.items()},
        {k: v.cpu().numpy() for k, v in out_p.items()},
    )
