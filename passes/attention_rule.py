"""Self-attention of an optimum decoder export (Llama family: rotary, grouped KV heads, KV
cache) -> one com.microsoft GroupQueryAttention node per layer.

optimum exports each layer's attention as ~80 small ops (reshapes of shapes, rotary
arithmetic, repeat-kv expands, masks, two MatMuls, softmax). ORT spends more time dispatching
them than the 3-bit projections take, so decode speed is bounded by the graph, not the
weights. GroupQueryAttention does rotary, cache append, causal softmax attention and GQA
head sharing in one kernel.

pattern: graph output ``present.i.key`` = Concat(``past_key_values.i.key``, K) and
``present.i.value`` = Concat(past value, V); K and V lead back to the k/v projections, the q
projection reads the same hidden state, and the o projection is the first projection
downstream of the value cache.
check: head counts divide, the rotary embedding is the non-interleaved rotate-half form, and
its cos/sin depend only on position_ids.
replace: GQA(q, k, v, past k, past v, seqlens_k, total_sequence_length, cos_cache,
sin_cache, position_ids, attention_bias, query_seqlens) feeding the o projection and the
present outputs. The lengths and the bias come from the attention mask as
:mod:`.attention_mask` describes, so any mask (left or right padding, holes, KV-cache steps
of one or more tokens) gives the export's own result.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .attention_mask import mask_nodes, runtime_problem
from .subgraph import (
    backward_slice,
    constant_value,
    consumers,
    evaluate,
    is_linear,
    producer,
    walk_back_to_linear,
)

MS_DOMAIN = "com.microsoft"
_THROUGH = {
    "Add",
    "Mul",
    "Neg",
    "Slice",
    "Concat",
    "Transpose",
    "Reshape",
    "Unsqueeze",
    "Cast",
    "Squeeze",
    "Identity",
}
_PRESENT = re.compile(r"present\.(\d+)\.key$")


@dataclasses.dataclass
class AttentionMatch:
    layer: int
    q_proj: ir.Node
    k_proj: ir.Node
    v_proj: ir.Node
    o_proj: ir.Node
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    k_rotated: ir.Value  # K after rotary, as concatenated into the cache
    cos: ir.Value | None = None
    sin: ir.Value | None = None
    scale: float | None = None


def _concat_with_past(value: ir.Value, past_prefix: str) -> tuple[ir.Value, ir.Value] | None:
    node = producer(value)
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return None
    past, new = node.inputs
    if past is None or not past.is_graph_input() or not (past.name or "").startswith(past_prefix):
        return None
    return past, new


def _rotary_sources(k_rotated: ir.Value):
    """(cos, sin) of the rotate-half rotary: K' = K*cos + cat(-K2, K1)*sin. The values are the
    un-unsqueezed [batch, seq, head_dim] tensors shared by every layer."""
    add = producer(k_rotated)
    if add is None or add.op_type != "Add":
        return None
    muls = [producer(v) for v in add.inputs]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    cos = sin = None
    for m in muls:
        a, b = m.inputs
        for this, other in ((a, b), (b, a)):
            p = producer(this)
            if (
                p is not None
                and p.op_type == "Concat"
                and any(producer(i) is not None and producer(i).op_type == "Neg" for i in p.inputs)
            ):
                sin = other
            elif p is not None and p.op_type == "Transpose":
                cos = other
    if cos is None or sin is None:
        return None

    def base(v: ir.Value) -> ir.Value:
        node = producer(v)
        while node is not None and node.op_type in ("Unsqueeze", "Cast"):
            v = node.inputs[0]
            node = producer(v)
        return v

    return base(cos), base(sin)


def _score_scale(q_proj: ir.Node) -> float | None:
    """The softmax scale: product of the constants multiplying Q and K^T before their MatMul."""
    for node in _downstream(q_proj.outputs[0], 14):
        if node.op_type == "Softmax":
            score = producer(node.inputs[0])
            while score is not None and score.op_type == "Add":
                score = next(
                    (
                        producer(i)
                        for i in score.inputs
                        if producer(i) is not None and producer(i).op_type == "MatMul"
                    ),
                    None,
                )
            if score is None or score.op_type != "MatMul":
                return None
            scale = 1.0
            for v in score.inputs:
                mul = producer(v)
                if mul is not None and mul.op_type == "Mul":
                    consts = [c for c in map(constant_value, mul.inputs) if c is not None]
                    if consts and consts[0].size == 1:
                        scale *= float(consts[0].reshape(()))
            return scale
    return None


def _downstream(value: ir.Value, depth: int):
    frontier, seen = [value], set()
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for node in consumers(v):
                if id(node) not in seen:
                    seen.add(id(node))
                    yield node
                    nxt.extend(node.outputs)
        frontier = nxt


def _o_projection(present_value: ir.Value) -> ir.Node | None:
    """The projection that reads the attention output: the first one downstream of V."""
    for node in _downstream(present_value, 16):
        if is_linear(node):
            return node
    return None


def pattern(graph: ir.Graph) -> list[AttentionMatch]:
    outputs = {v.name: v for v in graph.outputs}
    matches = []
    for name, present_key in outputs.items():
        m = _PRESENT.match(name or "")
        if not m:
            continue
        layer = int(m.group(1))
        present_value = outputs.get(f"present.{layer}.value")
        k_pair = _concat_with_past(present_key, "past_key_values.")
        v_pair = _concat_with_past(present_value, "past_key_values.") if present_value else None
        if k_pair is None or v_pair is None:
            continue
        k_proj = walk_back_to_linear(k_pair[1], _THROUGH)
        v_proj = walk_back_to_linear(v_pair[1], _THROUGH)
        if k_proj is None or v_proj is None or k_proj is v_proj:
            continue
        hidden = k_proj.inputs[0]
        if v_proj.inputs[0] is not hidden:
            continue
        q_candidates = [n for n in consumers(hidden) if is_linear(n) and n not in (k_proj, v_proj)]
        o_proj = _o_projection(present_value)
        if len(q_candidates) != 1 or o_proj is None:
            continue
        match = AttentionMatch(
            layer,
            q_candidates[0],
            k_proj,
            v_proj,
            o_proj,
            k_pair[0],
            v_pair[0],
            present_key,
            present_value,
            k_pair[1],
        )
        sources = _rotary_sources(k_pair[1])
        if sources:
            match.cos, match.sin = sources
        match.scale = _score_scale(match.q_proj)
        matches.append(match)
    return sorted(matches, key=lambda m: m.layer)


def _out_features(node: ir.Node) -> int | None:
    if node.op_type == "QxMatMul":
        return int(node.attributes["N"].as_int())
    w = node.inputs[1]
    trans_b = (
        node.op_type == "Gemm"
        and node.attributes.get("transB")
        and node.attributes["transB"].as_int()
    )
    shape = w.const_value.shape
    return int(shape[0] if trans_b else shape[1])


def check(m: AttentionMatch) -> str | None:
    if m.cos is None or m.sin is None:
        return "rotary embedding is not the rotate-half form"
    shape = m.past_key.shape
    if (
        shape is None
        or len(shape) != 4
        or not all(isinstance(d, int) for d in (shape[1], shape[3]))
    ):
        return "past key shape is not [batch, kv_heads, past, head_dim] with static heads"
    kv_heads, head_dim = int(shape[1]), int(shape[3])
    nq, nk, nv = (_out_features(p) for p in (m.q_proj, m.k_proj, m.v_proj))
    if nk != kv_heads * head_dim or nv != nk or nq is None or nq % head_dim:
        return f"projection widths {nq}/{nk}/{nv} do not match {kv_heads} heads of {head_dim}"
    if (nq // head_dim) % kv_heads:
        return "query heads are not a multiple of kv heads"
    return None


def _max_positions(folder: Path | None, default: int = 4096) -> int:
    if folder is not None and (folder / "config.json").is_file():
        try:
            cfg = json.loads((folder / "config.json").read_text())
            cfg = cfg.get("text_config", cfg)  # a VLM's (LLaVA) decoder settings
            return int(cfg.get("max_position_embeddings", default))
        except (ValueError, OSError):
            pass
    return default


@dataclasses.dataclass
class SharedInputs:
    seqlens_k: ir.Value
    total_length: ir.Value
    cos_cache: ir.Value
    sin_cache: ir.Value
    position_ids: ir.Value
    attention_bias: ir.Value
    query_seqlens: ir.Value


def _shared_inputs(graph: ir.Graph, m: AttentionMatch, opset: int, max_pos: int) -> SharedInputs:
    """Nodes and constants every GQA node reads: lengths and bias from the attention mask
    (:mod:`.attention_mask`), rotary caches computed by running the export's own rotary
    subgraph over all positions."""
    inputs = {v.name: v for v in graph.inputs}
    mask = inputs.get("attention_mask")
    position_ids = inputs.get("position_ids")
    if mask is None or position_ids is None:
        raise ValueError("the graph has no attention_mask/position_ids inputs")
    pos = np.arange(max_pos, dtype=np.int64)[None, :]
    cos, sin = evaluate([m.cos, m.sin], {position_ids: pos}, opset)
    half = cos.shape[-1] // 2
    cos2, sin2 = cos.reshape(max_pos, -1), sin.reshape(max_pos, -1)
    if not (
        np.allclose(cos2[:, :half], cos2[:, half:]) and np.allclose(sin2[:, :half], sin2[:, half:])
    ):
        raise ValueError("rotary cos/sin halves differ (not rotate-half)")
    dtype = m.present_key.dtype.numpy() if m.present_key.dtype else np.float32
    want = (
        np.ascontiguousarray(cos2[:, :half], dtype),
        np.ascontiguousarray(sin2[:, :half], dtype),
    )
    computed = _computed_caches(graph, m, position_ids, max_pos, half, dtype, opset, want)
    if computed is not None:
        cos_cache, sin_cache = computed
    else:  # the slice could not be replayed exactly: store the tables
        cos_cache = ir.Value(name="quantx.rotary.cos_cache", const_value=ir.tensor(want[0]))
        sin_cache = ir.Value(name="quantx.rotary.sin_cache", const_value=ir.tensor(want[1]))
        graph.register_initializer(cos_cache)
        graph.register_initializer(sin_cache)

    nodes, (seqlens_k, total, query_lengths, bias) = mask_nodes(graph, mask, position_ids, dtype)
    graph.insert_before(next(iter(graph)), nodes)
    return SharedInputs(seqlens_k, total, cos_cache, sin_cache, position_ids, bias, query_lengths)


def _computed_caches(graph, m, position_ids, max_pos, half, dtype, opset, want):
    """GQA's rotary caches [max_pos, head_dim / 2] as nodes: the export's own rotary slice
    replayed on positions Range(0, max_pos), which ONNX Runtime constant-folds when the session
    is created. The file then stores a few hundred bytes instead of two float tables (2 MB for
    SmolLM2's 8192 positions, 3% of its 3-bit file). None unless the replay reproduces the
    evaluated tables exactly."""
    slice_nodes = backward_slice([m.cos, m.sin])
    if any(n.domain not in ("", "ai.onnx") for n in slice_nodes):
        return None

    def const(name, array):
        v = ir.Value(name=name, const_value=ir.tensor(np.asarray(array)))
        graph.register_initializer(v)
        return v

    prefix = "quantx/rotary/"
    nodes = [
        ir.node(
            "Range",
            [
                const("quantx.rotary.start", np.array(0, np.int64)),
                const("quantx.rotary.limit", np.array(max_pos, np.int64)),
                const("quantx.rotary.delta", np.array(1, np.int64)),
            ],
            name=prefix + "positions",
        )
    ]
    axis0 = const("quantx.rotary.axis0", np.array([0], np.int64))
    nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], axis0], name=prefix + "batch"))
    mapping = {id(position_ids): nodes[-1].outputs[0]}
    for n in slice_nodes:
        clone = ir.Node(
            n.domain,
            n.op_type,
            [mapping.get(id(v), v) if v is not None else None for v in n.inputs],
            attributes=[ir.Attr(a.name, a.type, a.value) for a in n.attributes.values()],
            num_outputs=len(n.outputs),
            name=prefix + (n.name or n.op_type),
        )
        for old, new in zip(n.outputs, clone.outputs):
            mapping[id(old)] = new
        nodes.append(clone)
    shape = const("quantx.rotary.shape", np.array([max_pos, -1], np.int64))
    starts = const("quantx.rotary.starts", np.array([0], np.int64))
    ends = const("quantx.rotary.ends", np.array([half], np.int64))
    axis1 = const("quantx.rotary.axis1", np.array([1], np.int64))
    caches = []
    for which, source in (("cos", m.cos), ("sin", m.sin)):
        flat = ir.node("Reshape", [mapping[id(source)], shape], name=f"{prefix}{which}_flat")
        cut = ir.node("Slice", [flat.outputs[0], starts, ends, axis1], name=f"{prefix}{which}")
        cast = ir.node(
            "Cast",
            [cut.outputs[0]],
            attributes={"to": ir.DataType.from_numpy(np.dtype(dtype))},
            name=f"{prefix}{which}_cache",
        )
        cast.outputs[0].name = f"quantx.rotary.{which}_cache"
        nodes += [flat, cut, cast]
        caches.append(cast.outputs[0])
    for n in nodes:
        for i, v in enumerate(n.outputs):
            v.name = v.name or f"{n.name}_output_{i}"
    try:
        got = evaluate(caches, {}, opset)
    except Exception:  # noqa: BLE001 - any failure means: store the tables instead
        got = None
    if got is None or not all(np.array_equal(g, w) for g, w in zip(got, want)):
        for name in ("start", "limit", "delta", "axis0", "shape", "starts", "ends", "axis1"):
            graph.initializers.pop(f"quantx.rotary.{name}", None)
        return None
    graph.insert_before(next(iter(graph)), nodes)
    return caches[0], caches[1]


def replace(graph: ir.Graph, m: AttentionMatch, shared: SharedInputs) -> ir.Node:
    kv_heads, head_dim = int(m.past_key.shape[1]), int(m.past_key.shape[3])
    heads = _out_features(m.q_proj) // head_dim
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1, "rotary_interleaved": 0}
    if m.scale is not None:
        attrs["scale"] = float(m.scale)
    gqa = ir.node(
        "GroupQueryAttention",
        [
            m.q_proj.outputs[0],
            m.k_proj.outputs[0],
            m.v_proj.outputs[0],
            m.past_key,
            m.past_value,
            shared.seqlens_k,
            shared.total_length,
            shared.cos_cache,
            shared.sin_cache,
            shared.position_ids,
            shared.attention_bias,
            None,  # head_sink
            None,  # k_scale
            None,  # v_scale
            None,  # q_norm_weight
            None,  # k_norm_weight
            shared.query_seqlens,
        ],
        attributes=attrs,
        domain=MS_DOMAIN,
        num_outputs=3,
        name=f"/model/layers.{m.layer}/self_attn/GroupQueryAttention",
    )
    graph.insert_after(
        m.v_proj if _index(graph, m.v_proj) > _index(graph, m.q_proj) else m.q_proj, gqa
    )
    out, present_k, present_v = gqa.outputs
    m.o_proj.replace_input_with(0, out)
    for old, new in ((m.present_key, present_k), (m.present_value, present_v)):
        new.type, new.shape, name = old.type, old.shape, old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name = f"{name}.replaced"
        new.name = name
    return gqa


def _index(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    return -1


@dataclasses.dataclass
class AttentionReport:
    fused: list[int] = dataclasses.field(default_factory=list)
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)
    op: str = "GroupQueryAttention"  # QxGroupQueryAttention once saved for a native target


def fuse_attention(model: ir.Model, folder: Path | None = None) -> AttentionReport:
    """Rewrite every matched attention layer in place; the old subgraphs become dead and are
    removed by the caller's cleanup."""
    graph = model.graph
    report = AttentionReport()
    matches = []
    for m in pattern(graph):
        reason = check(m)
        if reason:
            report.skipped[m.layer] = reason
        else:
            matches.append(m)
    if not matches:
        return report
    if problem := runtime_problem():
        for m in matches:
            report.skipped[m.layer] = problem
        return report
    opset = model.opset_imports.get("", 18)
    try:
        shared = _shared_inputs(graph, matches[0], opset, _max_positions(folder))
    except (ValueError, RuntimeError) as e:
        for m in matches:
            report.skipped[m.layer] = f"rotary caches: {e}"
        return report
    for m in matches:
        if m.cos is not matches[0].cos or m.sin is not matches[0].sin:
            report.skipped[m.layer] = "layer uses its own rotary tensors"
            continue
        replace(graph, m, shared)
        report.fused.append(m.layer)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    import onnx_ir.passes.common as common_passes

    common_passes.RemoveUnusedNodesPass()(model)
    return report
