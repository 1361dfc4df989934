"""End-to-end tuning of what a quantized model keeps in float, against the float model.

After layer-by-layer quantization (GPTQ/AWQ, each layer judged on its own output) every
layer's small error is fixed in place; nothing has looked at the model's output. This step
runs the whole graph in torch (:mod:`.torch_graph`) with the quantized weights and fits, by
Adam on KL(float model || quantized model) over the calibration batches:

- one multiplier per output column of every quantized weight. It is folded into that
  column's stored scales (the fp16 scales, or the super-scales of hierarchical formats), so
  the file format and its size do not change;
- the 1-D float parameters the graph keeps (RMSNorm/LayerNorm weights, biases), written back
  into their initializers.

Codes and zero points stay as quantized. Measured on SmolLM2 (docs/ACCURACY.md) this recovers
a large part of the loss that layer-wise methods leave; it costs a forward and backward pass
of the model per calibration batch and step (``--device cuda`` runs it on a GPU).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from ..format import QuantizedWeight, dequantize, hierarchical_scales
from ..passes import WeightKey
from ..passes.subgraph import backward_slice
from ..quantize.grid import round_scales
from .torch_graph import TorchStage

COLUMN_RANGE = (0.5, 2.0)  # a column multiplier is a correction, never a sign flip


@dataclasses.dataclass
class EndToEndReport:
    steps: int
    kl_first: float  # mean KL per token over the first pass through the batches
    kl_last: float  # ... and over the last pass
    float_parameters: int  # 1-D float parameters tuned
    columns: int  # column multipliers tuned
    seconds: float
    device: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def scale_columns(q: QuantizedWeight, c: np.ndarray) -> QuantizedWeight:
    """``q`` with column n's scales multiplied by ``c[n]``, rounded to the stored form."""
    c = np.asarray(c, np.float32)[:, None]
    if q.fmt.hierarchical:
        sup = round_scales(q.super_scales * c, q.scale_dtype)
        scales = hierarchical_scales(sup, q.sub_scales, q.fmt.super_group)
        return dataclasses.replace(q, super_scales=sup, scales=scales)
    return dataclasses.replace(q, scales=round_scales(q.scales * c, q.scale_dtype))


def tunable_floats(model: ir.Model, quantized: set[str]) -> list[ir.Value]:
    """1-D float initializers of two or more values (norm weights, biases) that are not
    quantized weights."""
    out = []
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if name in quantized or t is None or name.startswith("quantx."):
            continue
        if len(t.shape) == 1 and t.shape[0] >= 2 and t.dtype == ir.DataType.FLOAT:
            out.append(v)
    return out


def _logits_value(model: ir.Model) -> ir.Value:
    outs = {v.name: v for v in model.graph.outputs}
    if "logits" in outs:
        return outs["logits"]
    raise ValueError("end-to-end tuning needs a model with a 'logits' output")


def tune_end_to_end(
    model: ir.Model,
    weights: dict[WeightKey, QuantizedWeight],
    feeds: list[dict[str, np.ndarray]],
    *,
    epochs: int = 6,
    lr: float = 2e-3,
    device: str = "cpu",
    seed: int = 0,
    progress=None,
) -> tuple[dict[WeightKey, QuantizedWeight], dict[str, np.ndarray], EndToEndReport]:
    """Tuned weights (scales changed), new values of the tuned float initializers, report."""
    import torch

    start = time.perf_counter()
    logits = _logits_value(model)
    nodes = backward_slice([logits])
    graph = TorchStage(nodes, list(model.graph.inputs), [logits], device=device)
    dev = graph.device
    inits = model.graph.initializers

    # quantized weights as seen by the graph: dequantized, in the initializer's orientation
    columns, frozen = {}, {}
    for key, q in weights.items():
        w = dequantize(q) / np.float32(key.alpha)
        frozen[key] = torch.from_numpy(np.ascontiguousarray(w.T if key.transposed else w)).to(dev)
        columns[key] = torch.ones(q.fmt.N, device=dev, requires_grad=True)
    floats = tunable_floats(model, {k.initializer for k in weights})
    float_params = {
        v.name: torch.tensor(v.const_value.numpy(), device=dev, requires_grad=True)
        for v in floats
        if v.name in graph.constants
    }
    params = [*columns.values(), *float_params.values()]
    opt = torch.optim.Adam(params, lr=lr)

    def substituted() -> dict:
        subs = dict(float_params)
        for key, w in frozen.items():
            c = columns[key]
            subs[key.initializer] = w * (c[:, None] if key.transposed else c[None, :])
        return subs

    def tensors(f):
        return {n: torch.from_numpy(np.asarray(f[n])).to(dev) for n in graph.input_names}

    steps = max(1, epochs) * len(feeds)
    rng = np.random.default_rng(seed)
    order = [int(j) for _ in range(max(1, epochs)) for j in rng.permutation(len(feeds))]
    kls: list[float] = []
    for step in progress(range(steps)) if progress else range(steps):
        f = tensors(feeds[order[step]])
        with torch.no_grad():
            target = torch.log_softmax(graph(f)[logits.name].float(), dim=-1)
        out = torch.log_softmax(graph(f, substituted())[logits.name].float(), dim=-1)
        tokens = out.numel() // out.shape[-1]
        loss = (target.exp() * (target - out)).sum() / tokens
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - step / steps)
        opt.step()
        with torch.no_grad():
            for c in columns.values():
                c.clamp_(*COLUMN_RANGE)
        kls.append(loss.item())

    tuned = {k: scale_columns(q, columns[k].detach().cpu().numpy()) for k, q in weights.items()}
    new_floats = {
        name: p.detach().cpu().numpy().astype(inits[name].const_value.dtype.numpy())
        for name, p in float_params.items()
    }
    n = len(feeds)
    report = EndToEndReport(
        steps=steps,
        kl_first=float(np.mean(kls[:n])),
        kl_last=float(np.mean(kls[-n:])),
        float_parameters=int(sum(p.numel() for p in float_params.values())),
        columns=int(sum(c.numel() for c in columns.values())),
        seconds=time.perf_counter() - start,
        device=str(dev),
    )
    return tuned, new_floats, report
