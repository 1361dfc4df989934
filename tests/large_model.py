"""A large, Llama-1B-shaped model with random weights, written straight to external data so
that building it never holds the model in memory.

    python -m tests.large_model OUT_DIR [--layers 18 --hidden 2048 --inner 8192 --vocab 32000]

Each layer is the decoder's seven projections (q, k, v, o, gate, up, down) chained with
residual adds (no attention: only the weight shapes matter here); float16 weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def build(out_dir: Path, layers=18, hidden=2048, inner=8192, vocab=32000, seed=0) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    inits, nodes, offset = [], [], 0
    with open(out_dir / data_name, "wb") as data:

        def weight(name, shape):
            nonlocal offset
            arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            raw = arr.tobytes()
            data.write(raw)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            offset += len(raw)
            inits.append(t)
            return name

        nodes.append(
            helper.make_node(
                "Gather", [weight("embed", [vocab, hidden]), "ids"], ["h0"], name="embed"
            )
        )
        h = "h0"
        for i in range(layers):
            p = f"/model/layers.{i}"
            for proj, (k, n) in {
                "q": (hidden, hidden),
                "k": (hidden, hidden // 4),
                "v": (hidden, hidden // 4),
            }.items():
                nodes.append(
                    helper.make_node(
                        "MatMul",
                        [h, weight(f"{p}.{proj}", [k, n])],
                        [f"{p}/{proj}"],
                        name=f"{p}/{proj}_proj/MatMul",
                    )
                )
            nodes.append(
                helper.make_node(
                    "Concat", [f"{p}/q", f"{p}/k", f"{p}/v"], [f"{p}/qkv"], axis=-1, name=f"{p}/qkv"
                )
            )
            nodes.append(
                helper.make_node(
                    "Slice", [f"{p}/qkv", "zero", "hid", "last"], [f"{p}/att"], name=f"{p}/slice"
                )
            )
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"{p}/att", weight(f"{p}.o", [hidden, hidden])],
                    [f"{p}/o"],
                    name=f"{p}/o_proj/MatMul",
                )
            )
            nodes.append(helper.make_node("Add", [h, f"{p}/o"], [f"{p}/h1"], name=f"{p}/add1"))
            for proj in ("gate", "up"):
                nodes.append(
                    helper.make_node(
                        "MatMul",
                        [f"{p}/h1", weight(f"{p}.{proj}", [hidden, inner])],
                        [f"{p}/{proj}"],
                        name=f"{p}/{proj}_proj/MatMul",
                    )
                )
            nodes.append(helper.make_node("Sigmoid", [f"{p}/gate"], [f"{p}/sg"], name=f"{p}/sig"))
            nodes.append(
                helper.make_node("Mul", [f"{p}/sg", f"{p}/up"], [f"{p}/act"], name=f"{p}/mul")
            )
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"{p}/act", weight(f"{p}.down", [inner, hidden])],
                    [f"{p}/down"],
                    name=f"{p}/down_proj/MatMul",
                )
            )
            nodes.append(
                helper.make_node("Add", [f"{p}/h1", f"{p}/down"], [f"{p}/h2"], name=f"{p}/add2")
            )
            h = f"{p}/h2"
        nodes.append(helper.make_node("Transpose", ["embed"], ["embed_t"], name="tie"))
        nodes.append(helper.make_node("MatMul", [h, "embed_t"], ["logits"], name="lm_head/MatMul"))
    consts = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("hid", TensorProto.INT64, [1], [hidden]),
        helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
    ]
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", vocab])],
        consts + inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = out_dir / "model.onnx"
    onnx.save(model, str(path))
    return path


def parameters(layers=18, hidden=2048, inner=8192, vocab=32000) -> int:
    per_layer = hidden * hidden * 2 + 2 * hidden * (hidden // 4) + 3 * hidden * inner
    return layers * per_layer + vocab * hidden


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inner", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args(argv)
    path = build(Path(a.out), a.layers, a.hidden, a.inner, a.vocab)
    print(path, parameters(a.layers, a.hidden, a.inner, a.vocab))
    return 0


if __name__ == "__main__":
    sys.exit(main())
