"""Test helpers: single-node QuantX models, ORT sessions, tiny exported models."""

from __future__ import annotations

import json
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


def projection_names(model: onnx.ModelProto) -> list[str]:
    """Names of the model's QxMatMul projections, those fused into QxMultiMatMul nodes
    included (their members' names)."""
    from quantx_onnx.passes.multi_matmul_rule import MEMBERS, OP_MULTI

    names = []
    for n in model.graph.node:
        if n.domain != DOMAIN:
            continue
        if n.op_type == OP_MATMUL:
            names.append(n.name)
        elif n.op_type == OP_MULTI:
            meta = {p.key: p.value for p in n.metadata_props}
            names += json.loads(meta[MEMBERS])
    return names


def random_quantized(rng, K, N, bits, group, layout, symmetric=False, **fmt_kw):
    fmt = WeightFormat(K, N, bits, group, layout, **fmt_kw)
    w = rng.standard_normal((K, N)).astype(np.float32)
    return quantize_rtn(w, fmt, symmetric=symmetric), w


def tiny_llama_config(vocab: int = 320, layers: int = 2, tie: bool = True, **extra):
    """The tiny Llama of the tests: hidden 64, 4 heads over 2 KV heads, MLP 160."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **extra,
    )


def export_tiny_llama(folder: Path, layers: int = 2, tie: bool = True) -> Path:
    """Random tiny Llama -> optimum ONNX export (text-generation-with-past)."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(layers=layers, tie=tie)).eval()
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


def assert_means_its_reference(path, feeds) -> None:
    """The QuantX file's outputs equal its numpy-dequantized float reference's (ORT, fp32)."""
    import onnx_ir as ir

    from quantx_onnx import reference

    ref = reference.dequantized_model(ir.load(str(path)))
    ref_sess = ort.InferenceSession(
        ir.to_proto(ref).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for g, w in zip(quantx_session(path).run(None, feeds), ref_sess.run(None, feeds)):
        assert np.linalg.norm(g - w) <= 1e-4 * np.linalg.norm(w)


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def tiny_bpe(vocab: int = 320, specials=("<|endoftext|>", "<|im_start|>")):
    """A byte-level BPE ``tokenizers.Tokenizer`` of exactly ``vocab`` ids, ``specials`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = [f"{a}{b}{c}" for a in "bcdfgh" for b in "aeiou" for c in "lmnprst"]
    text = [" ".join(words[i::7]) for i in range(7)] * 3
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    return tok


def write_tiny_tokenizer(folder: Path, vocab: int = 320) -> None:
    """A byte-level BPE tokenizer.json of exactly ``vocab`` ids (two of them special), so a
    tiny random decoder export looks like a real one to tokenizer-driven code."""
    tiny_bpe(vocab).save(str(folder / "tokenizer.json"))


GGUF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_tiny_gguf(path: Path, vocab: int = 320) -> Path:
    """A random 2-layer Llama as a float32 GGUF file with SmolLM2's special-token metadata:
    unk 0 (<|endoftext|>), bos 1 (<|im_start|>), eos = padding 2 (<|im_end|>), no BOS added."""
    import json

    import gguf
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    cfg = tiny_llama_config(vocab)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(vocab)
    tok = json.loads(tiny_bpe(vocab, GGUF_SPECIALS).to_str())
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in GGUF_SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def permute(t, heads):  # llama.cpp's q/k row order (transformers undoes it on load)
        return (
            t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
            .swapaxes(1, 2)
            .reshape(t.shape)
        )

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, t in model.state_dict().items():
        t = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        elif name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            if module == "self_attn.q_proj":
                t = permute(t, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{names[module]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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


LLAVA_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<image>")


def write_tiny_llava(folder: Path, vocab: int = 320, anyres: bool = False) -> Path:
    """A random tiny LLaVA (CLIP vision tower 32x32 px in 8x8 patches -> 16 image tokens,
    2-layer Llama) saved with ``save_pretrained`` plus a LlavaProcessor (byte-level BPE
    tokenizer with an ``<image>`` token, CLIPImageProcessor), built offline. ``anyres``: the
    LLaVA-NeXT variant (crops at 32x64, 64x32 or 64x64 px and an image-newline vector)."""
    import torch
    import transformers as tf

    torch.manual_seed(2)
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=tiny_bpe(vocab, LLAVA_SPECIALS),
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )
    vision = tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = tiny_llama_config(
        vocab, tie=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": tok.convert_tokens_to_ids("<image>"),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    }
    images = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    if anyres:
        model = tf.LlavaNextForConditionalGeneration(
            tf.LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        )
        image_processor = tf.LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, **images)
        make_processor = tf.LlavaNextProcessor
    else:
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**common))
        image_processor = tf.CLIPImageProcessor(**images)
        make_processor = tf.LlavaProcessor
    model.eval()
    with torch.no_grad():  # a random model's logits are flat: sharpen them so greedy is stable
        model.lm_head.weight.mul_(8.0)
    processor = make_processor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
