"""com.microsoft GroupQueryAttention -> com.quantx QxGroupQueryAttention, for native targets.

QxGroupQueryAttention takes GroupQueryAttention's inputs, outputs and attributes
(docs/FORMAT.md). A one-token step whose KV cache is shared between past and present (how
``llm.KVCache`` and onnxruntime-genai decode) runs QuantX's decode kernel; every other call is
handed to ONNX Runtime's GroupQueryAttention inside the op, so prompts and copied caches give
ONNX Runtime's results exactly. On SmolLM2 the kernel takes a third off attention's share of a
decode step at depth 160 and a quarter at depth 1000 (docs/PERF.md).

pattern: a com.microsoft GroupQueryAttention node (as :mod:`.attention_rule` writes them).
check: float32 caches, separate key and value, past caches wired, at most the three outputs
    the op has, and only the attributes it forwards (:data:`FORWARDED`): any other option would
    be lost on the way to ONNX Runtime's op.
replace: the same node, inputs, outputs and attributes, as com.quantx QxGroupQueryAttention.
:func:`restore_attention` is the inverse, for consumers that run without the QuantX library or
read the standard op (the numpy reference model, the portable form).
"""

from __future__ import annotations

import onnx_ir as ir

from quantx_onnx.format import DOMAIN

from .attention_rule import MS_DOMAIN

OP_ORT = "GroupQueryAttention"
OP_QX = "QxGroupQueryAttention"
# The attributes QxGroupQueryAttention forwards to ONNX Runtime's op (attention_op.cc).
FORWARDED = frozenset(
    {
        "num_heads",
        "kv_num_heads",
        "scale",
        "softcap",
        "local_window_size",
        "do_rotary",
        "rotary_interleaved",
        "smooth_softmax",
    }
)
_PAST_KEY, _PAST_VALUE = 3, 4
_SET_NEVER = range(11, 16)  # head_sink, k_scale, v_scale, q_norm_weight, k_norm_weight


def check(node: ir.Node) -> str | None:
    """Why ``node`` cannot become a QxGroupQueryAttention, or None."""
    extra = sorted(set(node.attributes) - FORWARDED)
    if extra:
        return f"attributes {', '.join(extra)}"
    inputs = list(node.inputs)
    if len(inputs) > 17 or len(node.outputs) > 3:
        return "more inputs or outputs than QxGroupQueryAttention has"
    wired = [i < len(inputs) and inputs[i] is not None for i in range(7)]
    if not all(wired):
        return "packed QKV or no past cache"
    if any(i < len(inputs) and inputs[i] is not None for i in _SET_NEVER):
        return "head sinks, KV scales or QK norms"
    if inputs[_PAST_KEY].dtype != ir.DataType.FLOAT:
        return "a cache that is not float32"
    return None


def use_qx_attention(model: ir.Model) -> int:
    """Rewrite every eligible GroupQueryAttention node in place; returns how many."""
    n = 0
    for node in model.graph:
        if node.op_type == OP_ORT and node.domain == MS_DOMAIN and check(node) is None:
            node.op_type, node.domain = OP_QX, DOMAIN
            n += 1
    if n:
        model.opset_imports.setdefault(DOMAIN, 1)
    return n


def restore_attention(model: ir.Model) -> int:
    """Every QxGroupQueryAttention node back to com.microsoft GroupQueryAttention (in place);
    returns how many."""
    n = 0
    for node in model.graph:
        if node.op_type == OP_QX and node.domain == DOMAIN:
            node.op_type, node.domain = OP_ORT, MS_DOMAIN
            n += 1
    if n:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return n
