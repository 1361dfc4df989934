"""Test helpers: single-node QuantX models, ORT sessions, tiny exported models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import quantx_onnx
from quantx_onnx.format import DOMAIN, OP_MATMUL, TENSOR_ORDER, WeightFormat
from quantx_onnx.quantize.rtn import quantize_rtn


def quantx_session(model: onnx.ModelProto | str | Path, threads: int = 2):
    so = quantx_onnx.session_options(threads=threads)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def qx_matmul_model(
    packed: dict[str, np.ndarray],
    fmt: WeightFormat,
    a_shape,
    *,
    accuracy_level: int = 0,
    bias: np.ndarray | None = None,
    a_dtype=np.float32,
    extra_attrs: dict | None = None,
) -> onnx.ModelProto:
    """A model with one QxMatMul node over constant packed inputs."""
    inits = [numpy_helper.from_array(packed[n], n) for n in TENSOR_ORDER if n in packed]
    inputs = ["A"] + [n if n in packed else "" for n in TENSOR_ORDER]
    if bias is not None:
        inputs.append("bias")
        inits.append(numpy_helper.from_array(bias, "bias"))
    while inputs[-1] == "":
        inputs.pop()
    attrs = {**fmt.attributes(), "accuracy_level": accuracy_level, **(extra_attrs or {})}
    node = helper.make_node(OP_MATMUL, inputs, ["Y"], domain=DOMAIN, name="qx", **attrs)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(a_dtype))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", et, list(a_shape))],
        [helper.make_tensor_value_info("Y", et, None)],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    )


def random_quantized(rng, K, N, bits, group, layout, symmetric=False, **fmt_kw):
    fmt = WeightFormat(K, N, bits, group, layout, **fmt_kw)
    w = rng.standard_normal((K, N)).astype(np.float32)
    return quantize_rtn(w, fmt, symmetric=symmetric), w


def export_tiny_llama(folder: Path, layers: int = 2, tie: bool = True) -> Path:
    """Random tiny Llama -> optimum ONNX export (text-generation-with-past)."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    hf = folder / "hf"
    model.save_pretrained(hf)
    out = folder / "onnx"
    main_export(str(hf), output=str(out), task="text-generation-with-past")
    return out


def llm_feeds(session, seq: int = 7, batch: int = 1, seed: int = 0, vocab: int = 320):
    """Prefill feeds for an optimum decoder export (empty past)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
    }
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            heads, dim = i.shape[1], i.shape[3]
            feeds[i.name] = np.zeros((batch, heads, 0, dim), np.float32)
    return {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def write_tiny_tokenizer(folder: Path, vocab: int = 320) -> None:
    """A byte-level BPE tokenizer.json of exactly ``vocab`` ids (two of them special), so a
    tiny random decoder export looks like a real one to tokenizer-driven code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = [f"{a}{b}{c}" for a in "bcdfgh" for b in "aeiou" for c in "lmnprst"]
    text = [" ".join(words[i::7]) for i in range(7)] * 3
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    tok.save(str(folder / "tokenizer.json"))


def genai_greedy(og, folder, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy ids from onnxruntime-genai and the logits of each step."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    ids, logits = [], []
    while not gen.is_done() and len(ids) < n:
        logits.append(np.array(gen.get_logits()).reshape(-1))  # what the next token reads
        gen.generate_next_token()
        ids.append(int(gen.get_next_tokens()[0]))
    return ids, logits
