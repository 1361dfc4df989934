"""End-to-end tuning of what a quantized model can change without new codes, against the float
model.

After layer-by-layer quantization (GPTQ/AWQ, each layer judged on its own output) every
layer's small error is fixed in place; nothing has looked at the model's output. This step
runs the whole graph in torch (:mod:`.torch_graph`) with the quantized weights and fits, by
Adam on KL(float model || quantized model) over the calibration batches, for every quantized
weight ``W_hat[K, N]`` the rank-one correction ``diag(r) W_hat diag(c)``:

- ``c[N]``, one multiplier per output column, folded into that column's stored scales (the
  fp16 scales, or the super-scales of hierarchical formats); with ``span`` (a decoder's
  default, 256), ``c[N, B]``: one per column and block of ``span`` input channels, rounded up
  to whole top-level scales (one super-scale of the default groups of 32), so each still folds
  into stored scales;
- ``r[K]``, one multiplier per input channel, folded into the weight's ``input_scale``
  (docs/FORMAT.md; K fp16 values more per matrix, < 0.03 bits per weight), when
  ``input_channels`` is on;

and the 1-D float parameters the graph keeps (RMSNorm/LayerNorm weights, biases), written back
into their initializers. A decoder (a ``logits`` output) is fitted on the KL of its next-token
distributions; an encoder (no ``logits``: MiniLM's hidden states, a ViT's output maps) on the
relative squared error of its float outputs, padding positions left out. With ``rounding`` the
codes of uniform grids are tuned too: each code may move by one step, decided by sign gradient
descent on an offset ``v`` in [-1, 1] per weight (the code becomes ``clamp(q + round(v))``,
gradients passed straight through the rounding, as AutoRound does per block; here against the
model's output). Zero points stay as quantized, so the format and (but for ``input_scale``) the
size do not change.

Cost: whole-column multipliers act on each node's input and output (``y = ((x * r) @ W_hat) *
c``), so the backward pass needs no weight gradients (block multipliers scale ``W_hat`` itself
and do: 24-36% more time on SmolLM2 on a CPU); the float model's log-probabilities are computed
once per batch and kept (up to ``TEACHER_CACHE_BYTES``). One step is then about a forward and
an input-gradient pass of the model on one calibration batch. On a CPU with native bf16 dot
products (AVX512_BF16, AMX) the quantized model's forward runs under bf16 autocast (matrix
products, attention's included, in bf16; the residual stream, the norms and the loss in fp32,
as are the float model's targets): SmolLM2's tuning took 146 s instead of 184 s on 2 Zen 4
cores, at the same perplexity (docs/ACCURACY.md).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx_ir as ir

from .. import rotation
from ..format import QuantizedWeight, dequantize, hierarchical_scales, stored_weight
from ..passes import LinearMatch, WeightKey
from ..passes.subgraph import backward_slice
from ..quantize.grid import round_scales
from .device import native_bf16
from .torch_graph import TorchStage

MULTIPLIER_RANGE = (0.5, 2.0)  # a multiplier is a correction, never a sign flip
# bf16 autocast by default only from this many quantized weights: smaller products gain
# little, and bf16 was measured on SmolLM2 (135M) only
BF16_MIN_WEIGHTS = 10_000_000
TEACHER_CACHE_BYTES = 3e9  # float-model log-probs kept in memory (fp16) up to this size
# tuning batches the keep-or-revert check reads before and after the tuning (forward only)
CHECK_BATCHES = 8


@dataclasses.dataclass
class EndToEndReport:
    steps: int
    # mean loss over the first pass (one pass: its first half) and the last (its second half):
    # KL per token (nats) for a decoder, relative squared output error for an encoder
    kl_first: float
    kl_last: float
    float_parameters: int  # 1-D float parameters tuned
    columns: int  # scale multipliers tuned (one per column, or per column and block of span)
    input_channels: int  # input-channel multipliers tuned
    codes_moved: int  # codes moved by learned rounding (``rounding``), of ``codes_tuned``
    codes_tuned: int
    seconds: float
    device: str
    loss: str = "kl"  # "kl" (decoder logits) or "output error" (encoder outputs)
    span: int = 0  # input channels asked per scale multiplier (0: whole columns)
    precision: str = "float32"  # of the quantized model's matrix products: float32 or bfloat16
    # the loss on the first CHECK_BATCHES batches before and after; the tuning is kept only
    # when it lowered it (else the layer-wise result is returned unchanged)
    check_before: float = 0.0
    check_after: float = 0.0
    kept: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def scale_span(q: QuantizedWeight, span: int) -> int:
    """Input channels one multiplier of a column covers when ``span`` input channels are
    asked for (0: the whole column): a whole number of the format's top-level scales (the
    super-scales of hierarchical formats, else the group scales), so that every multiplier
    folds into stored scales, and at least ``span``."""
    f = q.fmt
    unit = f.group * (f.super_group if f.hierarchical else 1)
    if span <= 0 or span >= f.K:
        return f.K
    return min(f.K, unit * -(-span // unit))


def scale_columns(q: QuantizedWeight, c: np.ndarray, span: int | None = None) -> QuantizedWeight:
    """``q`` with column n's scales multiplied by ``c[n]``, rounded to the stored form; with
    ``c[N, B]`` and ``span`` (from :func:`scale_span`), the scales of input channels
    ``b * span .. (b + 1) * span - 1`` of column n by ``c[n, b]``."""
    c = np.asarray(c, np.float32)
    c = c[:, None] if c.ndim == 1 else c
    f = q.fmt
    if f.hierarchical:
        first_k = np.arange(f.n_super) * f.group * f.super_group
        sup = round_scales(q.super_scales * _per_block(c, first_k, span), q.scale_dtype)
        scales = hierarchical_scales(sup, q.sub_scales, f.super_group)
        return dataclasses.replace(q, super_scales=sup, scales=scales)
    first_k = np.arange(f.n_groups) * f.group
    scales = round_scales(q.scales * _per_block(c, first_k, span), q.scale_dtype)
    return dataclasses.replace(q, scales=scales)


def _per_block(c: np.ndarray, first_k: np.ndarray, span: int | None) -> np.ndarray:
    """The multiplier of each stored scale whose group starts at input channel ``first_k``."""
    if c.shape[1] == 1:
        return c
    return c[:, first_k // span]


def scale_inputs(q: QuantizedWeight, r: np.ndarray) -> QuantizedWeight:
    """``q`` with input channel k multiplied by ``r[k]`` (its input_scale, in the stored
    dtype)."""
    old = np.ones(q.fmt.K, np.float32) if q.input_scale is None else q.input_scale
    return dataclasses.replace(q, input_scale=round_scales(old * r, q.scale_dtype))


def tunable_floats(model: ir.Model, quantized: set[str]) -> list[ir.Value]:
    """1-D float initializers of two or more values (norm weights, biases) that are not
    quantized weights, nor a BatchNormalization's running statistics (a variance tuned
    below zero would break the graph; its scale and bias are tuned instead)."""
    statistics = {
        v.name
        for node in model.graph.all_nodes()
        if node.op_type == "BatchNormalization"
        for v in node.inputs[3:5]
        if v is not None
    }
    out = []
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if name in quantized or t is None or name.startswith("quantx.") or name in statistics:
            continue
        if len(t.shape) == 1 and t.shape[0] >= 2 and t.dtype == ir.DataType.FLOAT:
            out.append(v)
    return out


class _NextTokenKL:
    """A decoder's loss: KL(float || quantized) of the next-token distributions, per token.
    The float model's log-probs are kept in fp16 while they fit in TEACHER_CACHE_BYTES."""

    kind = "kl"

    def __init__(self, torch, logits: ir.Value):
        self.torch, self.names = torch, [logits.name]
        self.vocab = (
            int(logits.shape[-1]) if logits.shape and isinstance(logits.shape[-1], int) else 0
        )

    def fits_in_memory(self, feeds) -> bool:
        tokens = sum(int(np.asarray(f["input_ids"]).size) for f in feeds if "input_ids" in f)
        return bool(self.vocab) and 2 * self.vocab * tokens <= TEACHER_CACHE_BYTES

    def target(self, outs):
        return self.torch.log_softmax(outs[self.names[0]].float(), dim=-1)

    def compact(self, target):
        return target.half()

    def __call__(self, outs, target, feed):
        target = target.float()
        out = self.torch.log_softmax(outs[self.names[0]].float(), dim=-1)
        tokens = out.numel() // out.shape[-1]
        return (target.exp() * (target - out)).sum() / tokens


class _OutputError:
    """An encoder's loss: relative squared error of its outputs against the float model's,
    over the positions the attention mask keeps (all positions without one). The float
    outputs are small: always kept."""

    kind = "output error"

    def __init__(self, torch, names: list[str]):
        self.torch, self.names = torch, names

    def fits_in_memory(self, feeds) -> bool:
        return True

    def target(self, outs) -> list:
        return [outs[n].float().detach() for n in self.names]

    def compact(self, target):
        return target

    def __call__(self, outs, target, feed):
        torch = self.torch
        mask = feed.get("attention_mask")
        loss = 0.0
        for name, ref in zip(self.names, target):
            diff = (outs[name].float() - ref) ** 2
            if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
                keep = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - 2)))
                loss = loss + (diff * keep).sum() / torch.clamp((ref**2 * keep).sum(), min=1e-12)
            else:
                loss = loss + diff.sum() / torch.clamp((ref**2).sum(), min=1e-12)
        return loss


def _model_loss(torch, model: ir.Model):
    """The decoder's KL when the model has a ``logits`` output, else the encoder's error
    over its float outputs."""
    outs = {v.name: v for v in model.graph.outputs}
    if "logits" in outs:
        return _NextTokenKL(torch, outs["logits"])
    floats = [v.name for v in model.graph.outputs if v.dtype == ir.DataType.FLOAT]
    if not floats:
        raise ValueError("end-to-end tuning needs a 'logits' output or a float output")
    return _OutputError(torch, floats)


class _Rounding:
    """Tunable codes of one uniform-grid weight: ``clamp(q + round(v))`` with ``v`` in
    [-1, 1], the dequantized weight in the initializer's orientation."""

    def __init__(self, torch, key: WeightKey, q: QuantizedWeight, dev):
        f = q.fmt
        group_of_k = np.arange(f.K) // f.group
        self.key, self.q, self.torch = key, q, torch
        self.codes = torch.from_numpy(q.codes.astype(np.float32)).to(dev)
        self.scales = torch.from_numpy(q.scales[:, group_of_k].astype(np.float32)).to(dev)
        zp = q.effective_zero_points.astype(np.float32)[:, group_of_k]
        self.zero = torch.from_numpy(zp).to(dev)
        rows = 1.0 if q.input_scale is None else q.input_scale.astype(np.float32)[None, :]
        self.scales = self.scales * torch.as_tensor(rows, device=dev) / float(key.alpha)
        self.offset = torch.zeros_like(self.codes, requires_grad=True)
        self.qmax = float(f.code_levels - 1)

    def weight(self):
        v = self.offset
        step = (v.round() - v).detach() + v  # straight through the rounding
        w_nk = self.scales * ((self.codes + step).clamp(0.0, self.qmax) - self.zero)
        return w_nk if self.key.transposed else w_nk.T

    def tuned(self) -> QuantizedWeight:
        with self.torch.no_grad():
            codes = (self.codes + self.offset.round()).clamp(0.0, self.qmax)
        return dataclasses.replace(self.q, codes=codes.cpu().numpy().astype(np.uint8))


def tuning_step(torch, loss, opt, multipliers, rounders, lr, step, steps) -> None:
    """One step of the schedule end-to-end tuning and block reconstruction share: Adam on the
    multipliers (clamped to MULTIPLIER_RANGE) and sign gradient descent on the rounding offsets
    (clamped to [-1, 1]), both learning rates decaying linearly to zero over ``steps``. A code
    moves only where the gradient's sign mostly agrees (offset step 1.5 / steps)."""
    opt.zero_grad()
    for r in rounders:
        r.offset.grad = None
    loss.backward()
    decay = 1.0 - step / steps
    for group in opt.param_groups:
        group["lr"] = lr * decay
    opt.step()
    with torch.no_grad():
        for p in multipliers:
            p.clamp_(*MULTIPLIER_RANGE)
        for r in rounders:
            if r.offset.grad is not None:
                r.offset.sub_(1.5 / steps * decay * r.offset.grad.sign()).clamp_(-1.0, 1.0)


def _node_wrapper(m: LinearMatch, c, r, k_block=None, rotated=None):
    """The function run in place of ``m``'s node: its weight read as diag(r) W diag(c); with
    block multipliers (``c[N, B]``, ``k_block[k]`` the block of input channel k) W[k, n] is
    multiplied by ``c[n, k_block[k]]`` instead. ``rotated``: (torch, input scale or None) of a
    rotated weight, whose graph weight is then the stored W' (as the kernels: the input
    scaled and rotated, then W'; the blocks are of rotated channels, as its stored scales)."""
    if m.rule == "gather":  # rows of E = W^T: row n scaled by c[n], channel k by r[k]

        def gather(op, args, attrs):
            rows = op(args, attrs)[0]
            idx = args[1].long() % c.shape[0]
            rows = rows * (c[idx][..., None] if k_block is None else c[idx][..., k_block])
            if rotated is not None:  # stored rows of W': back to the table's basis, as QxGather
                torch, in_scale = rotated
                rows = rotation.torch_rotate_rows(torch, rows, rows.shape[-1], inverse=True)
                rows = rows * in_scale if in_scale is not None else rows
            return [rows * r if r is not None else rows]

        return gather

    def linear(op, args, attrs):
        x = args[0] * r if r is not None else args[0]
        if rotated is not None:
            torch, in_scale = rotated
            x = x * in_scale if in_scale is not None else x
            x = rotation.torch_rotate_rows(torch, x, x.shape[-1])
        if k_block is None:
            y = op([x, args[1]], attrs)[0] * c  # Gemm: alpha * A @ B; its bias is added after
        else:  # the weight input itself scaled: [K, N] (MatMul, Gemm), [N, K] (Gemm transB)
            per_nk = c[:, k_block]
            y = op([x, args[1] * (per_nk if attrs.get("transB", 0) else per_nk.T)], attrs)[0]
        if len(args) > 2 and args[2] is not None:
            y = y + attrs.get("beta", 1.0) * args[2]
        return [y]

    return linear


def tune_end_to_end(
    model: ir.Model,
    weights: dict[WeightKey, QuantizedWeight],
    matches: list[LinearMatch],
    feeds: list[dict[str, np.ndarray]],
    *,
    epochs: int = 2,
    lr: float = 2e-3,
    input_channels: bool = True,
    rounding: bool = False,
    span: int = 0,
    device: str = "cpu",
    bf16: bool | None = None,
    seed: int = 0,
    progress=None,
) -> tuple[dict[WeightKey, QuantizedWeight], dict[str, np.ndarray], EndToEndReport]:
    """Tuned weights (scales and input scales changed), new values of the tuned float
    initializers, report; the weights unchanged and no new values when the tuning did not
    lower the loss on the first CHECK_BATCHES batches (``report.kept`` False). ``matches``:
    every node reading a quantized weight. ``bf16``: the quantized model's forward under
    bf16 autocast (None: on a CPU with native bf16, for models of at least BF16_MIN_WEIGHTS
    quantized weights)."""
    import contextlib

    import torch

    start = time.perf_counter()
    model_loss = _model_loss(torch, model)
    fitted = [v for v in model.graph.outputs if v.name in model_loss.names]
    graph = TorchStage(backward_slice(fitted), list(model.graph.inputs), fitted, device)
    dev = graph.device
    inits = model.graph.initializers
    if bf16 is None:
        size = sum(q.fmt.K * q.fmt.N for q in weights.values())
        bf16 = dev.type == "cpu" and size >= BF16_MIN_WEIGHTS and native_bf16()

    def student_precision():  # the student's forward only: the teacher's targets stay fp32
        if bf16:
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # quantized weights as seen by the graph: dequantized, in the initializer's orientation
    frozen = {}
    columns, rows, spans, k_blocks = {}, {}, {}, {}
    rotations = {}
    for key, q in weights.items():
        if q.fmt.rotate:  # the graph reads W' and the wrapper rotates (_node_wrapper)
            ins = None if q.input_scale is None else torch.from_numpy(q.input_scale).to(dev)
            rotations[key] = (torch, ins)
            w = stored_weight(q) / np.float32(key.alpha)
        else:
            w = dequantize(q) / np.float32(key.alpha)
        frozen[key.initializer] = torch.from_numpy(
            np.ascontiguousarray(w.T if key.transposed else w)
        ).to(dev)
        spans[key] = scale_span(q, span)
        blocks = -(-q.fmt.K // spans[key])
        shape = (q.fmt.N,) if blocks == 1 else (q.fmt.N, blocks)
        columns[key] = torch.ones(shape, device=dev, requires_grad=True)
        if blocks > 1:
            k_blocks[key] = torch.arange(q.fmt.K, device=dev) // spans[key]
        if input_channels:
            rows[key] = torch.ones(q.fmt.K, device=dev, requires_grad=True)
    wrap = {
        m.node.outputs[0].name: _node_wrapper(
            m, columns[m.key], rows.get(m.key), k_blocks.get(m.key), rotations.get(m.key)
        )
        for m in matches
        if m.key in weights
    }
    floats = tunable_floats(model, {k.initializer for k in weights})
    float_params = {
        v.name: torch.tensor(v.const_value.numpy(), device=dev, requires_grad=True)
        for v in floats
        if v.name in graph.constants
    }
    multipliers = [*columns.values(), *rows.values()]
    opt = torch.optim.Adam([*multipliers, *float_params.values()], lr=lr)
    rounders = {}
    if rounding:
        rounders = {
            k.initializer: _Rounding(torch, k, q, dev)
            for k, q in weights.items()
            if q.codebook is None and not q.fmt.rotate  # codes of W', not of the graph's W
        }

    def tensors(f):
        return {n: torch.from_numpy(np.asarray(f[n])).to(dev) for n in graph.input_names}

    def teacher(f):
        with torch.no_grad():
            return model_loss.target(graph(tensors(f)))

    # the float model's outputs, once per batch when they fit in memory
    cache = None
    if model_loss.fits_in_memory(feeds):
        cache = [model_loss.compact(teacher(f)) for f in feeds]

    check = range(min(CHECK_BATCHES, len(feeds)))

    def check_loss() -> float:  # forward only, as the tuning sees the model
        total = 0.0
        with torch.no_grad():
            for j in check:
                feed = tensors(feeds[j])
                target = cache[j] if cache is not None else teacher(feeds[j])
                with student_precision():
                    total += float(model_loss(graph(feed, subs, wrap=wrap), target, feed))
        return total / len(check)

    steps = max(1, epochs) * len(feeds)
    rng = np.random.default_rng(seed)
    order = [int(j) for _ in range(max(1, epochs)) for j in rng.permutation(len(feeds))]
    kls: list[float] = []
    subs = {**frozen, **float_params}
    if rounders:
        subs.update({name: r.weight() for name, r in rounders.items()})
    loss_before = check_loss()
    for step in progress(range(steps)) if progress else range(steps):
        f = feeds[order[step]]
        if rounders:
            subs.update({name: r.weight() for name, r in rounders.items()})
        target = cache[order[step]] if cache is not None else teacher(f)
        feed = tensors(f)
        with student_precision():
            outs = graph(feed, subs, wrap=wrap)
        loss = model_loss(outs, target, feed)
        tuning_step(torch, loss, opt, multipliers, list(rounders.values()), lr, step, steps)
        kls.append(loss.item())

    if rounders:
        subs.update({name: r.weight() for name, r in rounders.items()})
    loss_after = check_loss()
    # a tuning that made the model worse where it was fitted (a step too large for a
    # sensitive model: a ViT at lr 2e-3 went 0.0026 -> 0.022, docs/ACCURACY.md) is not kept
    kept = loss_after < loss_before
    tuned, new_floats, moved = dict(weights), {}, 0
    if kept:
        for key, q in weights.items():
            if key.initializer in rounders:
                codes = q.codes
                q = rounders[key.initializer].tuned()
                moved += int(np.count_nonzero(q.codes != codes))
            q = scale_columns(q, columns[key].detach().cpu().numpy(), spans[key])
            if key in rows:
                q = scale_inputs(q, rows[key].detach().cpu().numpy())
            tuned[key] = q
        new_floats = {
            name: p.detach().cpu().numpy().astype(inits[name].const_value.dtype.numpy())
            for name, p in float_params.items()
        }
    n = len(feeds) if epochs > 1 else max(1, steps // 2)  # per pass, or halves of one pass
    report = EndToEndReport(
        steps=steps,
        kl_first=float(np.mean(kls[:n])),
        kl_last=float(np.mean(kls[-n:])),
        float_parameters=int(sum(p.numel() for p in float_params.values())),
        columns=int(sum(c.numel() for c in columns.values())),
        input_channels=int(sum(r.numel() for r in rows.values())),
        codes_moved=moved,
        codes_tuned=int(sum(r.codes.numel() for r in rounders.values())),
        seconds=time.perf_counter() - start,
        device=str(dev),
        loss=model_loss.kind,
        span=span,
        precision="bfloat16" if bf16 else "float32",
        check_before=loss_before,
        check_after=loss_after,
        kept=kept,
    )
    return tuned, new_floats, report
