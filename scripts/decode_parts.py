"""Where one decode step of a QuantX decoder goes, part by part, without ONNX Runtime's
profiler (which adds its own cost to every node: `bench profile` reports ~2x the step).

    python scripts/decode_parts.py MODEL_DIR --threads 2 --depth 160

Three timings, each the median of alternating rounds in one process:

- step: the whole model, one greedy token after `depth` cached positions (DecoderSession,
  shared KV buffers, as `bench decode` and generation run it);
- quantx: a graph of the model's own QxMatMul / QxMultiMatMul nodes alone (the same weights,
  in the same order, each fed a random row of its width): the matmuls of one token;
- attention: a graph of its attention nodes alone (GroupQueryAttention or QuantX's
  QxGroupQueryAttention, as the model has them: the same attributes and input wiring; q, k, v
  and the rotary caches random; each layer's past and present bound to one shared buffer
  holding `depth` positions).

What is left (step - quantx - attention) is the element-wise nodes (norms, adds, gating), ONNX
Runtime's executor and the Python around the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from quantx_onnx.bench.decode import prompt_ids
from quantx_onnx.bench.profile import QUANTX_OPS
from quantx_onnx.llm import DecoderSession
from quantx_onnx.runtime import session_options

MATMUL_OPS = tuple(op for op in QUANTX_OPS if op != "QxGather")
# GroupQueryAttention inputs by position (com.microsoft spec) besides q/k/v (0-2) and the
# cache (3-4); the last is the query lengths input of newer onnxruntime versions
GQA_SEQLENS_K, GQA_TOTAL, GQA_COS, GQA_SIN, GQA_POSITIONS, GQA_BIAS = 5, 6, 7, 8, 9, 10
GQA_QUERY_LENS = 16
ATTENTION_OPS = ("GroupQueryAttention", "QxGroupQueryAttention")


def _attr(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _subgraph(model, nodes, inputs, outputs):
    """A model of `nodes` with the initializers they read copied from `model`."""
    inits = {i.name: i for i in model.graph.initializer}
    used = dict.fromkeys(x for n in nodes for x in n.input if x in inits)
    graph = helper.make_graph(nodes, "parts", inputs, outputs, [inits[u] for u in used])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def matmul_graph(model):
    """The model's QuantX matmul nodes, each fed graph input x<K>; every output kept."""
    nodes, outputs, widths = [], [], set()
    for i, n in enumerate(model.graph.node):
        if n.domain != "com.quantx" or n.op_type not in MATMUL_OPS:
            continue
        k = _attr(n, "K")
        widths.add(k)
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[0] = f"x{k}"
        for j, o in enumerate(c.output):
            if o:
                c.output[j] = f"y{i}_{j}"
                outputs.append(helper.make_tensor_value_info(c.output[j], TensorProto.FLOAT, None))
        nodes.append(c)
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, 1, k]) for k in widths]
    rng = np.random.default_rng(0)
    feeds = {f"x{k}": rng.standard_normal((1, 1, k), np.float32) for k in sorted(widths)}
    return _subgraph(model, nodes, inputs, outputs), feeds, len(nodes)


def attention_graph(model, head_dim: int, depth: int, capacity: int):
    """The model's attention nodes with one token's inputs after `depth` positions. Returns
    (model, feeds, {past input: (buffer, present output)}, node count, op type): each layer's
    past and present are to be bound to that one buffer."""
    nodes, outputs, presents = [], [], {}  # presents: past input -> its present output
    gqa = [n for n in model.graph.node if n.op_type in ATTENTION_OPS]
    if not gqa:
        raise SystemExit("no GroupQueryAttention nodes: optimize fuses attention by default")
    heads, kv_heads = _attr(gqa[0], "num_heads"), _attr(gqa[0], "kv_num_heads")
    inits = {i.name for i in model.graph.initializer}
    for i, n in enumerate(gqa):
        c = onnx.NodeProto()
        c.CopyFrom(n)
        for j, name in enumerate(n.input):
            if not name or name in inits:
                continue
            if j in (0, 1, 2):
                c.input[j] = "qkv"[j]
            elif j in (3, 4):
                c.input[j] = f"past{i}_{j}"
                presents[c.input[j]] = c.output[j - 2] = f"present{i}_{j}"
            else:
                c.input[j] = f"in{j}"
        c.output[0] = f"out{i}"
        for o in c.output:
            if o:
                outputs.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
        nodes.append(c)
    rng = np.random.default_rng(0)
    total = depth + 1
    values = {
        "q": rng.standard_normal((1, 1, heads * head_dim), np.float32),
        "k": rng.standard_normal((1, 1, kv_heads * head_dim), np.float32),
        "v": rng.standard_normal((1, 1, kv_heads * head_dim), np.float32),
        f"in{GQA_SEQLENS_K}": np.array([depth], np.int32),
        f"in{GQA_TOTAL}": np.array(total, np.int32),
        f"in{GQA_POSITIONS}": np.array([[depth]], np.int64),
        f"in{GQA_BIAS}": np.zeros((1, 1, 1, total), np.float32),
        f"in{GQA_COS}": rng.uniform(-1, 1, (capacity, head_dim // 2)).astype(np.float32),
        f"in{GQA_SIN}": rng.uniform(-1, 1, (capacity, head_dim // 2)).astype(np.float32),
        f"in{GQA_QUERY_LENS}": np.array([1], np.int32),
    }
    inputs, feeds, pairs = [], {}, {}
    for name in dict.fromkeys(x for c in nodes for x in c.input if x and x not in inits):
        if name in presents:
            value = np.zeros((1, kv_heads, capacity, head_dim), np.float32)
            pairs[name] = (value, presents[name])
            shape = [1, kv_heads, "c", head_dim]
        elif name in values:
            value = feeds[name] = values[name]
            shape = list(value.shape)
        else:
            raise SystemExit(f"GroupQueryAttention input {name!r}: not wired by this script")
        dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
        inputs.append(helper.make_tensor_value_info(name, dtype, shape))
    return _subgraph(model, nodes, inputs, outputs), feeds, pairs, len(nodes), gqa[0].op_type


def ms_per_call(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=160, help="cached positions before the step")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=50, help="steps per round")
    args = ap.parse_args(argv)
    path = args.model / "model.onnx" if args.model.is_dir() else args.model
    model = onnx.load(path)
    so = session_options(threads=args.threads)
    cpu = ["CPUExecutionProvider"]

    mm_model, mm_feeds, n_mm = matmul_graph(model)
    mm = ort.InferenceSession(mm_model.SerializeToString(), so, providers=cpu)

    config = json.loads((path.parent / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    att_model, att_feeds, pairs, n_att, att_op = attention_graph(
        model, head_dim, args.depth, 2 * args.depth + 64
    )
    att = ort.InferenceSession(att_model.SerializeToString(), so, providers=cpu)
    binding = att.io_binding()
    for past, (buffer, present) in pairs.items():
        value = ort.OrtValue.ortvalue_from_numpy(buffer)
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    for name, value in att_feeds.items():
        binding.bind_cpu_input(name, value)
    for o in att.get_outputs():
        if o.name.startswith("out"):
            binding.bind_output(o.name)

    dec = DecoderSession(path, threads=args.threads)
    ids = prompt_ids(dec.vocab if isinstance(dec.vocab, int) else 32000, args.depth)
    logits, cache = dec.step(ids, dec.empty_cache(), 0, last_only=True)
    token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
    snapshot = cache.length

    def step():  # one token at the same depth each time: the cache is rewound
        cache.length = snapshot
        dec.step(token, cache, snapshot)

    parts = {
        "step": step,
        "quantx": lambda: mm.run(None, mm_feeds),
        "attention": lambda: att.run_with_iobinding(binding),
    }
    for fn in parts.values():  # warm-up
        for _ in range(10):
            fn()
    times = {name: [] for name in parts}
    for _ in range(args.rounds):  # alternating, so drift hits every part alike
        for name, fn in parts.items():
            times[name].append(ms_per_call(fn, args.reps))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{path} at depth {args.depth}, {args.threads} threads, median of {args.rounds} "
        f"rounds of {args.reps} (ms per token):"
    )
    rows = [
        ("whole step", "step", ""),
        ("QuantX matmul nodes", "quantx", f"{n_mm} nodes"),
        (f"{att_op} nodes", "attention", f"{n_att} nodes"),
    ]
    for label, key, note in rows:
        ms, lo, hi = med[key], min(times[key]), max(times[key])
        share = 100 * ms / med["step"]
        print(f"  {label:28s} {ms:7.3f} {share:5.1f}%  ({lo:.3f}-{hi:.3f})  {note}")
    rest = med["step"] - med["quantx"] - med["attention"]
    share = 100 * rest / med["step"]
    print(f"  {'the rest':28s} {rest:7.3f} {share:5.1f}%  element-wise nodes, executor, Python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
