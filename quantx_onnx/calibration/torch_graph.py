"""A calibration stage (an ONNX subgraph) run eagerly in torch, so that gradients reach its
weights: block-output reconstruction (:mod:`..quantize.learned`) tunes quantized weights
against the float stage's outputs, on the CPU or a CUDA device.

Only what calibration needs is here: the standard ops optimum exports for decoders and
encoders (shape arithmetic included, evaluated eagerly like everything else), the 2-D
convolutions, batch norms and resizes of vision heads (a ViT's patch embedding, a dense
decoder's upsampling), and
``com.microsoft`` GroupQueryAttention as :mod:`..passes.attention_rule` writes it (causal,
rotary with caches, grouped KV heads). A stage with any other op is refused with the op's name
(:class:`UnsupportedOp`); the caller then falls back to Hessian-only methods. Every op is
checked against ONNX Runtime on the same inputs by tests/test_torch_graph.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from ..format import DOMAIN
from ..passes.qx_attention_rule import MS_DOMAIN
from ..passes.qx_attention_rule import OP_ORT as OP_ORT_ATTENTION
from ..passes.qx_attention_rule import OP_QX as OP_QX_ATTENTION


class UnsupportedOp(ValueError):
    """The stage holds an op the torch executor does not implement."""


def _torch():
    import torch

    return torch


_DTYPES = {
    ir.DataType.FLOAT: "float32",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.DOUBLE: "float64",
    ir.DataType.INT64: "int64",
    ir.DataType.INT32: "int32",
    ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "uint8",
    ir.DataType.BOOL: "bool",
}


def torch_dtype(onnx_type: int):
    name = _DTYPES.get(ir.DataType(onnx_type))
    if name is None:
        raise UnsupportedOp(f"Cast to {ir.DataType(onnx_type).name}")
    return getattr(_torch(), name)


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axes(node_attrs, inputs, index, rank):
    """Axes from an input (opset >= 13/18) or the `axes` attribute; None when absent."""
    if len(inputs) > index and inputs[index] is not None:
        axes = _ints(inputs[index])
    elif "axes" in node_attrs:
        axes = list(node_attrs["axes"])
    else:
        return None
    return [a + rank if a < 0 else a for a in axes]


# --- ops: f(inputs, attrs) -> list of outputs ----------------------------------------------
def _binary(fn):
    return lambda x, a: [fn(x[0], x[1])]


def _div(x, a):
    torch = _torch()
    if x[0].is_floating_point():
        return [x[0] / x[1]]
    return [torch.div(x[0], x[1], rounding_mode="trunc")]


def _pow(x, a):
    torch = _torch()
    b = x[1]
    if b.numel() == 1 and float(b) == 2.0:
        return [x[0] * x[0]]
    return [torch.pow(x[0], b.to(x[0].dtype))]


def _matmul(x, a):
    return [_torch().matmul(x[0], x[1])]


def _gemm(x, a):
    A, B = x[0], x[1]
    if a.get("transA", 0):
        A = A.transpose(-1, -2)
    if a.get("transB", 0):
        B = B.transpose(-1, -2)
    y = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return [y]


def _reduce(name):
    def op(x, a):
        torch = _torch()
        data = x[0]
        axes = _axes(a, x, 1, data.dim())
        keep = bool(a.get("keepdims", 1))
        if axes is None or not axes:
            if a.get("noop_with_empty_axes", 0) and axes is not None:
                return [data]
            axes = list(range(data.dim()))
        fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum}[name]
        if name == "ReduceSum" and not data.is_floating_point():
            return [torch.sum(data, dim=axes, keepdim=keep)]
        return [fn(data, dim=axes, keepdim=keep)]

    return op


def _reduce_max(x, a):
    data = x[0]
    axes = _axes(a, x, 1, data.dim()) or list(range(data.dim()))
    keep = bool(a.get("keepdims", 1))
    out = data
    for ax in sorted(axes, reverse=True):
        out = out.amax(dim=ax, keepdim=keep)
    return [out]


def _cast(x, a):
    return [x[0].to(torch_dtype(a["to"]))]


def _shape(x, a):
    torch = _torch()
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=x[0].device)]


def _reshape(x, a):
    data, shape = x[0], _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [data.reshape(shape)]


def _unsqueeze(x, a):
    data = x[0]
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a["axes"])
    rank = data.dim() + len(axes)  # axes index the output
    out = data
    for ax in sorted(ax + rank if ax < 0 else ax for ax in axes):
        out = out.unsqueeze(ax)
    return [out]


def _squeeze(x, a):
    data = x[0]
    axes = _axes(a, x, 1, data.dim())
    if axes is None:
        return [data.squeeze()]
    out = data
    for ax in sorted(axes, reverse=True):
        out = out.squeeze(ax)
    return [out]


def _transpose(x, a):
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


def _concat(x, a):
    parts = [t for t in x if t is not None and (t.numel() or t.dim() > 1)]
    return [_torch().cat(parts or [x[0]], dim=a["axis"])]


def _gather(x, a):
    torch = _torch()
    data, idx = x[0], x[1]
    axis = a.get("axis", 0)
    axis = axis + data.dim() if axis < 0 else axis
    i = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    out = torch.index_select(data, axis, i.reshape(-1))
    shape = list(data.shape[:axis]) + list(i.shape) + list(data.shape[axis + 1 :])
    return [out.reshape(shape)]


def _slice(x, a):
    torch = _torch()
    out = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = ax + out.dim() if ax < 0 else ax
        dim = out.shape[ax]
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
            out = out[(slice(None),) * ax + (slice(s, max(s, e), st),)]
        else:  # ONNX clamps a negative-step range to [-1, dim - 1]
            s, e = min(max(s, -1), dim - 1), min(max(e, -1), dim - 1)
            idx = torch.arange(s, e, st, device=out.device)
            out = out.index_select(ax, idx)
    return [out]


def _expand(x, a):
    torch = _torch()
    shape = _ints(x[1])
    target = torch.broadcast_shapes(tuple(x[0].shape), tuple(shape))
    return [x[0].expand(target)]


def _constant_of_shape(x, a):
    torch = _torch()
    value = a.get("value")
    arr = np.zeros(1, np.float32) if value is None else value.numpy().reshape(-1)
    shape = _ints(x[0])
    t = torch.from_numpy(np.array(arr)).to(x[0].device)
    return [t.expand(shape).clone() if shape else t.reshape(()).clone()]


def _range(x, a):
    torch = _torch()
    s, lim, d = (v.item() for v in x[:3])
    return [torch.arange(s, lim, d, dtype=x[0].dtype, device=x[0].device)]


def _where(x, a):
    return [_torch().where(x[0], x[1], x[2])]


def _softmax(x, a):
    return [_torch().softmax(x[0], dim=a.get("axis", -1))]


def _unary(fn_name):
    def op(x, a):
        return [getattr(_torch(), fn_name)(x[0])]

    return op


def _flatten(x, a):
    axis = a.get("axis", 1)
    data = x[0]
    axis = axis + data.dim() if axis < 0 else axis
    lead = int(np.prod(data.shape[:axis])) if axis else 1
    return [data.reshape(lead, -1)]


def _identity(x, a):
    return [x[0]]


def _trilu(x, a):
    torch = _torch()
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(x[0], k) if a.get("upper", 1) else torch.tril(x[0], k)]


def _layer_norm(x, a):
    torch = _torch()
    data, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = a.get("axis", -1)
    axis = axis + data.dim() if axis < 0 else axis
    dims = list(range(axis, data.dim()))
    mean = data.mean(dim=dims, keepdim=True)
    var = ((data - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (data - mean) / torch.sqrt(var + a.get("epsilon", 1e-5)) * scale
    return [y + bias if bias is not None else y]


def _simplified_layer_norm(x, a):
    torch = _torch()
    data, scale = x[0], x[1]
    ms = (data.float() ** 2).mean(dim=-1, keepdim=True)
    return [(data / torch.sqrt(ms + a.get("epsilon", 1e-5))) * scale]


def _gelu(x, a):
    torch = _torch()
    return [torch.nn.functional.gelu(x[0], approximate=a.get("approximate", "none"))]


def _erf(x, a):
    return [_torch().erf(x[0])]


def _clip(x, a):
    lo = x[1] if len(x) > 1 and x[1] is not None else None
    hi = x[2] if len(x) > 2 and x[2] is not None else None
    return [_torch().clamp(x[0], lo, hi)]


def _max(x, a):
    out = x[0]
    for t in x[1:]:
        out = _torch().maximum(out, t)
    return [out]


def _min(x, a):
    out = x[0]
    for t in x[1:]:
        out = _torch().minimum(out, t)
    return [out]


# --- convolutional heads (a ViT's patch embedding, a dense-prediction decoder) --------------
def _conv_args(x, a, transposed: bool = False):
    """Padding, stride, dilation and groups of a 2-D Conv/ConvTranspose; symmetric explicit
    pads only (auto_pad other than NOTSET is refused)."""
    if x[0].dim() != 4:
        raise UnsupportedOp(f"{'ConvTranspose' if transposed else 'Conv'} of rank {x[0].dim()}")
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise UnsupportedOp(f"auto_pad {a['auto_pad']}")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise UnsupportedOp(f"asymmetric pads {pads}")
    return dict(
        stride=tuple(a.get("strides", [1, 1])),
        padding=tuple(pads[:2]),
        dilation=tuple(a.get("dilations", [1, 1])),
        groups=a.get("group", 1),
    )


def _conv(x, a):
    f = _torch().nn.functional
    bias = x[2] if len(x) > 2 else None
    return [f.conv2d(x[0], x[1], bias, **_conv_args(x, a))]


def _conv_transpose(x, a):
    f = _torch().nn.functional
    if "output_shape" in a:
        raise UnsupportedOp("ConvTranspose with output_shape")
    bias = x[2] if len(x) > 2 else None
    extra = tuple(a.get("output_padding", [0, 0]))
    return [f.conv_transpose2d(x[0], x[1], bias, output_padding=extra, **_conv_args(x, a, True))]


def _batch_norm(x, a):
    """Inference form (training_mode 0): the stored mean and variance."""
    if a.get("training_mode", 0):
        raise UnsupportedOp("BatchNormalization in training mode")
    f = _torch().nn.functional
    data, scale, bias, mean, var = x[:5]
    return [f.batch_norm(data, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))]


_RESIZE_MODES = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}


def _resize(x, a):
    """2-D Resize of an NCHW tensor to the ``sizes`` input (or by ``scales``), as torch's
    interpolate writes it: linear/cubic with half_pixel coordinates (cubic_coeff_a -0.75, no
    excluded outside), nearest with asymmetric coordinates and floor."""
    torch = _torch()
    data = x[0]
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    if data.dim() != 4 or mode not in _RESIZE_MODES:
        raise UnsupportedOp(f"Resize mode {mode} of rank {data.dim()}")
    if mode == "nearest":
        ok = coord == "asymmetric" and a.get("nearest_mode", "round_prefer_floor") == "floor"
    else:
        ok = coord in ("half_pixel", "pytorch_half_pixel") and not a.get("exclude_outside", 0)
        ok = ok and (mode != "cubic" or abs(a.get("cubic_coeff_a", -0.75) + 0.75) < 1e-6)
    if not ok or a.get("antialias", 0):
        raise UnsupportedOp(f"Resize {mode} with {coord} coordinates")
    sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    if sizes is not None:
        size = _ints(sizes)
        if size[:2] != list(data.shape[:2]):
            raise UnsupportedOp(f"Resize of batch or channel dimensions to {size}")
        if size[2:] == list(data.shape[2:]):
            return [data]
        kw = {"size": tuple(size[2:])}
    else:
        scales = x[2].reshape(-1).tolist() if len(x) > 2 and x[2] is not None else []
        if len(scales) != 4 or scales[:2] != [1.0, 1.0]:
            raise UnsupportedOp(f"Resize with scales {scales}")
        kw = {"scale_factor": tuple(scales[2:])}
    if mode != "nearest":
        kw["align_corners"] = False
    return [torch.nn.functional.interpolate(data, mode=_RESIZE_MODES[mode], **kw)]


def _group_query_attention(x, a):
    """GroupQueryAttention for the cases the attention rule writes: float q/k/v [B, S, *], KV
    cache [B, kv, P, D], rotate-half rotary from cos/sin caches [positions, D/2] at
    position_ids (or past + arange), causal over past + new tokens, plus attention_bias
    [B, 1, S, P + S] when given (a query with every key masked by it reads zeros, as in ORT).
    Rows whose seqlens_k or query_seqlens say they are padded are refused rather than computed
    differently from ORT."""
    torch = _torch()
    q, k, v, past_k, past_v, seqlens_k, total = x[:7]
    cos_cache = x[7] if len(x) > 7 else None
    sin_cache = x[8] if len(x) > 8 else None
    position_ids = x[9] if len(x) > 9 else None
    bias = x[10] if len(x) > 10 else None
    query_lengths = x[16] if len(x) > 16 else None
    if any(t is not None for t in x[11:16]):
        raise UnsupportedOp("GroupQueryAttention with head sinks, KV scales or QK norms")
    heads, kv_heads = a["num_heads"], a["kv_num_heads"]
    B, S, _ = q.shape
    D = q.shape[-1] // heads
    P = past_k.shape[2] if past_k is not None else 0
    lengths = seqlens_k.reshape(-1).long() + 1
    if bool((lengths != P + S).any()) or int(total.reshape(-1)[0]) != P + S:
        raise UnsupportedOp("GroupQueryAttention over padded rows")
    if query_lengths is not None and bool((query_lengths.reshape(-1) != S).any()):
        raise UnsupportedOp("GroupQueryAttention over right-padded query rows")
    q = q.reshape(B, S, heads, D).transpose(1, 2)
    k = k.reshape(B, S, kv_heads, D).transpose(1, 2)
    v = v.reshape(B, S, kv_heads, D).transpose(1, 2)
    if a.get("do_rotary", 0):
        if a.get("rotary_interleaved", 0):
            raise UnsupportedOp("GroupQueryAttention with interleaved rotary")
        if position_ids is None:
            pos = torch.arange(P, P + S, device=q.device)[None].expand(B, S)
        else:
            pos = position_ids.long()
        cos, sin = cos_cache[pos][:, None], sin_cache[pos][:, None]  # [B, 1, S, D/2]

        def rotate(t):
            half = t.shape[-1] // 2
            t1, t2 = t[..., :half], t[..., half:]
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

        q, k = rotate(q), rotate(k)
    if P:
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
    present_k, present_v = k, v
    rep = heads // kv_heads
    scale = a.get("scale", 0.0) or 1.0 / math.sqrt(D)
    kk = k.repeat_interleave(rep, dim=1)
    vv = v.repeat_interleave(rep, dim=1)
    if bias is not None and not bool(bias.any()):
        bias = None  # an all-ones mask (calibration): nothing to add
    if P == 0 and bias is None:  # prefill from an empty cache (calibration): the fused kernel
        out = torch.nn.functional.scaled_dot_product_attention(
            q, kk, vv, is_causal=True, scale=scale
        )
    else:
        scores = (q @ kk.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        causal = torch.ones(S, P + S, dtype=torch.bool, device=q.device).tril(P)
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ vv
        if bias is not None:  # ORT outputs zeros for a query whose every key is masked
            dead = scores.amax(dim=-1, keepdim=True) <= torch.finfo(scores.dtype).min
            out = out.masked_fill(dead, 0.0)
    return [out.transpose(1, 2).reshape(B, S, heads * D), present_k, present_v]


OPS: dict[tuple[str, str], Callable] = {
    ("", "Add"): _binary(lambda p, q: p + q),
    ("", "Sub"): _binary(lambda p, q: p - q),
    ("", "Mul"): _binary(lambda p, q: p * q),
    ("", "Div"): _div,
    ("", "Pow"): _pow,
    ("", "Equal"): _binary(lambda p, q: p == q),
    ("", "Less"): _binary(lambda p, q: p < q),
    ("", "LessOrEqual"): _binary(lambda p, q: p <= q),
    ("", "Greater"): _binary(lambda p, q: p > q),
    ("", "GreaterOrEqual"): _binary(lambda p, q: p >= q),
    ("", "And"): _binary(lambda p, q: p & q),
    ("", "Or"): _binary(lambda p, q: p | q),
    ("", "Not"): lambda x, a: [~x[0]],
    ("", "Neg"): lambda x, a: [-x[0]],
    ("", "Sqrt"): _unary("sqrt"),
    ("", "Reciprocal"): _unary("reciprocal"),
    ("", "Exp"): _unary("exp"),
    ("", "Log"): _unary("log"),
    ("", "Tanh"): _unary("tanh"),
    ("", "Sigmoid"): _unary("sigmoid"),
    ("", "Cos"): _unary("cos"),
    ("", "Sin"): _unary("sin"),
    ("", "Abs"): _unary("abs"),
    ("", "Relu"): _unary("relu"),
    ("", "IsNaN"): _unary("isnan"),
    ("", "Erf"): _erf,
    ("", "MatMul"): _matmul,
    ("", "Gemm"): _gemm,
    ("", "ReduceMean"): _reduce("ReduceMean"),
    ("", "ReduceSum"): _reduce("ReduceSum"),
    ("", "ReduceMax"): _reduce_max,
    ("", "Cast"): _cast,
    ("", "Shape"): _shape,
    ("", "Reshape"): _reshape,
    ("", "Unsqueeze"): _unsqueeze,
    ("", "Squeeze"): _squeeze,
    ("", "Transpose"): _transpose,
    ("", "Concat"): _concat,
    ("", "Gather"): _gather,
    ("", "Slice"): _slice,
    ("", "Expand"): _expand,
    ("", "ConstantOfShape"): _constant_of_shape,
    ("", "Range"): _range,
    ("", "Where"): _where,
    ("", "Softmax"): _softmax,
    ("", "Flatten"): _flatten,
    ("", "Identity"): _identity,
    ("", "Trilu"): _trilu,
    ("", "LayerNormalization"): _layer_norm,
    ("", "Clip"): _clip,
    ("", "Max"): _max,
    ("", "Min"): _min,
    ("", "Gelu"): _gelu,
    ("", "Dropout"): _identity,
    ("", "Conv"): _conv,
    ("", "ConvTranspose"): _conv_transpose,
    ("", "BatchNormalization"): _batch_norm,
    ("", "Resize"): _resize,
    (MS_DOMAIN, OP_ORT_ATTENTION): _group_query_attention,
    (DOMAIN, OP_QX_ATTENTION): _group_query_attention,  # the same contract
    (MS_DOMAIN, "SimplifiedLayerNormalization"): _simplified_layer_norm,
    ("", "SimplifiedLayerNormalization"): _simplified_layer_norm,
}


def _attributes(node: ir.Node) -> dict:
    out = {}
    for name, attr in node.attributes.items():
        value = attr.value
        if isinstance(value, ir.TensorProtocol):
            out[name] = value
        elif isinstance(value, (list, tuple)):
            out[name] = list(value)
        else:
            out[name] = value
    return out


def _constant_tensor(v: ir.Value):
    """The value of an initializer or a Constant node's output, as a numpy array."""
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant":
        attr = next(iter(p.attributes.values()))
        value = attr.value
        if isinstance(value, ir.TensorProtocol):
            return value.numpy()
        return np.array(value)
    return None


class TorchStage:
    """Nodes of one stage, executable on torch tensors. Constants (initializers, Constant
    nodes) are converted once and kept on ``device``; a call may substitute any of them by
    name (quantized, differentiable weights)."""

    def __init__(
        self,
        nodes: Iterable[ir.Node],
        inputs: list[ir.Value],
        outputs: list[ir.Value],
        device: str = "cpu",
    ):
        torch = _torch()
        self.device = torch.device(device)
        self.input_names = [v.name for v in inputs]
        self.output_names = [v.name for v in outputs]
        self.constants: dict[str, object] = {}
        self.program = []
        produced: set[str] = set(self.input_names)
        for node in nodes:
            if node.op_type == "Constant" and not node.inputs:
                continue
            key = (node.domain if node.domain not in ("ai.onnx",) else "", node.op_type)
            fn = OPS.get(key)
            if fn is None:
                domain = f"{node.domain}." if node.domain else ""
                raise UnsupportedOp(f"{node.name or '?'}: op {domain}{node.op_type}")
            names = []
            for v in node.inputs:
                if v is None:
                    names.append(None)
                    continue
                names.append(v.name)
                if v.name in produced or v.name in self.constants:
                    continue
                value = _constant_tensor(v)
                if value is None:
                    raise UnsupportedOp(f"{node.name or '?'}: input {v.name} has no producer")
                self.constants[v.name] = torch.from_numpy(np.array(value)).to(self.device)
            outs = [o.name for o in node.outputs]
            produced.update(outs)
            self.program.append((fn, names, outs, _attributes(node), node.name))

    def __call__(
        self, feeds: dict, substitutes: dict | None = None, keep=(), hook=None, wrap=None
    ) -> dict:
        """The stage outputs (and the intermediate values named in ``keep``) for ``feeds``.
        ``hook(name, tensor) -> tensor``, when given, sees every value named in ``keep`` as it
        is produced (e.g. to make it a leaf that requires grad, or to retain its grad).
        ``wrap`` maps a node's first output name to ``f(op, inputs, attrs) -> outputs``, run
        in place of the node's op (e.g. to scale what one node reads or writes)."""
        keep_set = set(keep)
        wrap = wrap or {}
        values = dict(self.constants)
        values.update(substitutes or {})
        values.update(feeds)
        for fn, names, outs, attrs, name in self.program:
            args = [values[n] if n is not None else None for n in names]
            try:
                around = wrap.get(outs[0]) if outs else None
                results = around(fn, args, attrs) if around else fn(args, attrs)
            except UnsupportedOp as e:  # a case of the op it does not implement: name the node
                raise UnsupportedOp(f"{name or '?'}: {e}") from e
            except Exception as e:  # a shape or type the op cannot take: name the node
                raise UnsupportedOp(f"{name or '?'}: {type(e).__name__}: {e}") from e
            for o, r in zip(outs, results):
                if o:
                    values[o] = hook(o, r) if hook is not None and o in keep_set else r
        return {n: values[n] for n in (*self.output_names, *keep)}
