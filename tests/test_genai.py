"""onnxruntime-genai as a target: `optimize` writes genai_config.json, a copy of the custom-op
library and a tokenizer genai reads; genai then generates what `quantx_onnx.generate` does."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantx_onnx import QuantConfig, library_path, optimize
from quantx_onnx.genai import CONFIG_NAME, decoder_io, genai_tokenizer
from quantx_onnx.generate import SamplingConfig, eos_ids, generate_ids
from quantx_onnx.llm import DecoderSession

from .cmake_build import in_ci
from .helpers import genai_greedy

# transformers' GGUF conversion writes this decoder over a byte-level BPE vocabulary
GGUF_STEPS = [
    {"type": "ByteFallback"},
    {"type": "Fuse"},
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
]
TEXTS = ["bam bel  cup\nfeo", " hilo dup, fen mas ", "cafe\u0301 \u65e5\u672c tab\tend"]


@pytest.fixture(scope="module")
def og():
    if importlib.util.find_spec("onnxruntime_genai") is None:
        if in_ci():
            pytest.fail("onnxruntime-genai must be installed in CI (the [test] extra has it)")
        pytest.skip("onnxruntime-genai not installed")
    import onnxruntime_genai

    return onnxruntime_genai


@pytest.fixture(scope="module")
def sharp_llama(tiny_with_tokenizer, tmp_path_factory):
    """The tiny Llama with its matrices scaled by 6 (random weights otherwise make greedy
    decoding repeat one token), a tokenizer_config.json as exports have, and the tokenizer's
    decoder as transformers' GGUF conversion writes it (the one genai misreads)."""
    folder = tmp_path_factory.mktemp("sharp") / "onnx"
    shutil.copytree(tiny_with_tokenizer, folder)
    model = onnx.load(str(folder / "model.onnx"))
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 2 and a.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array(a * 6, t.name))
    onnx.save(model, str(folder / "model.onnx"))
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["decoder"] = {"type": "Sequence", "decoders": [*GGUF_STEPS, tok["decoder"]]}
    tok["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return folder


@pytest.fixture(scope="module", params=["fused", "unfused"])
def genai_folder(request, sharp_llama, tmp_path_factory):
    fused = request.param == "fused"
    out = tmp_path_factory.mktemp(f"genai_{request.param}") / "q3"
    report = optimize(sharp_llama, out, QuantConfig(data_free=True, fuse_attention=fused))
    assert bool(report.attention.fused) == fused
    return out, report


def test_genai_config_matches_the_export(genai_folder, sharp_llama):
    out, report = genai_folder
    cfg = json.loads((sharp_llama / "config.json").read_text())
    genai = json.loads((out / CONFIG_NAME).read_text())
    model, decoder = genai["model"], genai["model"]["decoder"]
    assert report.genai.written and model["type"] == "llama"
    assert decoder["filename"] == "model.onnx"
    assert decoder["num_hidden_layers"] == cfg["num_hidden_layers"] == 2
    assert decoder["num_attention_heads"] == cfg["num_attention_heads"]
    assert decoder["num_key_value_heads"] == cfg["num_key_value_heads"]
    assert decoder["head_size"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert decoder["hidden_size"] == cfg["hidden_size"]
    assert model["context_length"] == cfg["max_position_embeddings"]
    assert model["vocab_size"] == cfg["vocab_size"]
    # tokenizer_config's eos_token joins config.json's eos id, as in quantx_onnx.generate
    assert model["eos_token_id"] == [cfg["eos_token_id"], 0]
    assert model["bos_token_id"] == cfg["bos_token_id"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    # the library lies inside the folder, named relatively (genai refuses paths outside it)
    lib = decoder["session_options"]["custom_ops_library"]
    assert lib == "libquantx_ops.so" and filecmp.cmp(out / lib, library_path(), shallow=False)
    # one KV buffer only when GroupQueryAttention reads the lengths from the mask
    assert genai["search"]["past_present_share_buffer"] == bool(report.attention.fused)
    assert not list(out.parent.glob(".*partial"))  # written through the staging folder


def test_genai_generates_like_quantx(og, genai_folder, tmp_path, monkeypatch):
    out, _ = genai_folder
    monkeypatch.chdir(tmp_path)  # the library resolves against the model folder, not the cwd
    session = DecoderSession(out)
    rng = np.random.default_rng(7)
    eos, distinct = set(eos_ids(out)), set()
    for _ in range(3):
        prompt = rng.integers(3, 320, size=int(rng.integers(1, 12))).tolist()
        ids, logits = genai_greedy(og, out, prompt, 16)
        ref = list(generate_ids(session, prompt, SamplingConfig(max_new_tokens=16), eos))
        assert ids == ref, (prompt, ids, ref)
        distinct |= set(ids)
        # each step's logits against a plain prefill of the same tokens
        want = session.logits(np.array([prompt + ids[:-1]], np.int64))[0, len(prompt) - 1 :]
        np.testing.assert_allclose(np.stack(logits), want, rtol=1e-3, atol=1e-3)
    assert len(distinct) > 8  # the comparison sees varied tokens, not one repeated


def test_genai_tokenizer_reads_the_gguf_style_tokenizer(og, genai_folder, sharp_llama):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out, report = genai_folder
    assert report.genai.tokenizer_fixed
    assert json.loads((out / "tokenizer.json").read_text())["decoder"]["type"] == "ByteLevel"
    original = Tokenizer.from_file(str(sharp_llama / "tokenizer.json"))
    tok = og.Tokenizer(og.Model(str(out)))
    for text in TEXTS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert [int(i) for i in tok.encode(text)] == ids, text
        assert tok.decode(ids) == original.decode(ids) == text
    # transformers decodes every id, and random id sequences, as it did before the rewrite
    before = AutoTokenizer.from_pretrained(sharp_llama)
    after = AutoTokenizer.from_pretrained(out)
    rng = np.random.default_rng(3)
    sequences = [[i] for i in range(320)] + [rng.integers(0, 320, 20).tolist() for _ in range(50)]
    for skip in (False, True):
        got = after.batch_decode(sequences, skip_special_tokens=skip)
        assert got == before.batch_decode(sequences, skip_special_tokens=skip)
    # genai agrees with it on text (random ids can be invalid UTF-8, which genai cuts off)
    letters = list("bcdfghlmnprstaeiou ,.\n\u00e9")
    for _ in range(20):
        text = "".join(rng.choice(letters, 40))
        ids = original.encode(text, add_special_tokens=False).ids
        assert [int(i) for i in tok.encode(text)] == ids, text
        assert tok.decode(ids) == after.decode(ids) == text


def _gguf_tokenizer(vocab: dict, added=()) -> dict:
    return {
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": [{"id": 100 + i, "content": c} for i, c in enumerate(added)],
        "decoder": {"type": "Sequence", "decoders": [*GGUF_STEPS, {"type": "ByteLevel"}]},
    }


def test_tokenizer_rewrite_only_where_decoding_stays_the_same():
    fixed = genai_tokenizer(_gguf_tokenizer({"a": 0, "\u0120b": 1}, ["<|im_end|>"]))
    assert fixed["decoder"] == {"type": "ByteLevel"}
    # a byte token ByteFallback would turn into a byte, a token holding the replaced pattern
    assert genai_tokenizer(_gguf_tokenizer({"a": 0, "<0x41>": 1})) is None
    assert genai_tokenizer(_gguf_tokenizer({"a": 0}, ["x\u2581y"])) is None
    other = _gguf_tokenizer({"a": 0})
    other["decoder"]["decoders"].insert(0, {"type": "Strip", "content": " ", "start": 1})
    assert genai_tokenizer(other) is None
    plain = _gguf_tokenizer({"a": 0})
    plain["decoder"] = {"type": "ByteLevel"}
    assert genai_tokenizer(plain) is None  # already what genai reads


def test_no_genai_config_for_a_model_file_or_a_non_decoder(tiny_llama, tmp_path):
    report = optimize(tiny_llama / "model.onnx", tmp_path / "m.onnx", QuantConfig(data_free=True))
    assert report.genai is None and not (tmp_path / CONFIG_NAME).exists()
    import onnx_ir as ir

    model = ir.load(str(tiny_llama / "model.onnx"))
    assert decoder_io(model)[2] == 2
    extra = ir.Value(name="use_cache_branch", type=ir.TensorType(ir.DataType.BOOL), shape=[1])
    model.graph.inputs.append(extra)
    assert "use_cache_branch" in decoder_io(model)


def test_write_genai_config_on_an_existing_folder(genai_folder, tmp_path):
    """The same config from the files alone (a folder optimized before this existed)."""
    from quantx_onnx.genai import write_genai_config

    out, _ = genai_folder
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    (folder / CONFIG_NAME).unlink()
    (folder / "libquantx_ops.so").unlink()
    report = write_genai_config(folder)
    assert report.written and report.library == "libquantx_ops.so"
    assert not report.tokenizer_fixed  # optimize fixed it already
    assert json.loads((folder / CONFIG_NAME).read_text()) == json.loads(
        (out / CONFIG_NAME).read_text()
    )
    assert filecmp.cmp(folder / "libquantx_ops.so", library_path(), shallow=False)
    (folder / "config.json").write_text("{not json")
    assert "not readable JSON" in write_genai_config(folder).reason
