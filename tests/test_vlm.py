"""Vision-language models (quantx_onnx.vlm): a tiny random LLaVA (CLIP vision tower + Llama)
exported to three graphs that match transformers, optimized per component into graphs that
mean what their numpy-dequantized references say, and generating from an image token for
token as transformers does."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.cli import main
from quantx_onnx.errors import InputError
from quantx_onnx.format import DOMAIN, OP_GATHER, OP_MATMUL
from quantx_onnx.generate import SamplingConfig, generate, generate_ids
from quantx_onnx.vlm import DECODER, EMBED, VISION
from quantx_onnx.vlm.generate import VlmSession, prepare
from quantx_onnx.vlm.image import pixel_values

from .helpers import assert_means_its_reference, quantx_session, write_tiny_llava

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("PIL")

PROMPT = "bal bel"


def _image(seed: int, shape=(40, 52, 3)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(HF folder, VLM export folder, what ``python -m quantx_onnx export`` printed)."""
    root = tmp_path_factory.mktemp("llava")
    hf = write_tiny_llava(root / "hf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(hf), "-o", str(root / "onnx")]) == 0
    return hf, root / "onnx", printed.getvalue()


@pytest.fixture(scope="module")
def hf_model(llava):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf = llava[0]
    model = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(hf)


def _hf_inputs(processor, image, prompt=PROMPT):
    return processor(images=image, text=f"<image>\n{prompt}", return_tensors="pt")


def test_export_writes_the_three_graphs_and_the_processor(llava):
    _, out, printed = llava
    names = {f.name for f in out.iterdir()}
    assert {VISION, EMBED, DECODER, "config.json", "tokenizer.json"} <= names
    assert {"preprocessor_config.json", "processor_config.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    lines = printed.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("exported ") and str(out) in lines[0]
    found = re.findall(
        r"(?:features|embeddings|logits) (?:match transformers )?to ([\d.e+-]+)", lines[1]
    )
    assert len(found) == 3 and max(map(float, found)) < 1e-4, lines[1]


def test_each_graph_matches_transformers(llava, hf_model):
    """fp32: image features, token embeddings, and the decoder's logits on a prompt with the
    image (a prefill, then a KV-cache step) against LlavaForConditionalGeneration."""
    _, out, _ = llava
    model, processor = hf_model
    inputs = _hf_inputs(processor, _image(0))
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixels)[0][None].numpy()
        table = model.get_input_embeddings()(ids).numpy()
        logits = model(input_ids=ids, pixel_values=pixels).logits.numpy()
    s = VlmSession(out)
    got_feats = s.image_features(pixels.numpy())
    np.testing.assert_allclose(got_feats, feats, atol=1e-5, rtol=1e-4)
    embeds = s.token_embeds(ids.numpy())
    np.testing.assert_array_equal(embeds, table)
    embeds = s.splice(ids.numpy(), embeds, got_feats)
    split = ids.shape[1] - 3
    first, cache = s.decoder.step_embeds(embeds[:, :split], s.empty_cache(), 0)
    rest, _ = s.decoder.step_embeds(embeds[:, split:], cache, split)
    got = np.concatenate([first, rest], axis=1)
    np.testing.assert_allclose(got, logits, atol=1e-4, rtol=1e-4)


def test_images_are_preprocessed_as_the_processor_does(llava, hf_model, tmp_path):
    from PIL import Image

    _, out, _ = llava
    _, processor = hf_model
    img = _image(3, (37, 61, 3))
    want = processor.image_processor(img, return_tensors="np")["pixel_values"]
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    for given in (img, Image.fromarray(img), path, str(path)):
        np.testing.assert_allclose(pixel_values(given, out), want, atol=1e-6)


def test_generate_from_an_image_matches_transformers_token_for_token(llava, hf_model):
    _, out, _ = llava
    model, processor = hf_model
    runs = {}
    for seed in (0, 1):
        img = _image(seed)
        inputs = _hf_inputs(processor, img)
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
        want = seq[0, inputs["input_ids"].shape[1] :].tolist()
        session, ids, _ = prepare(out, PROMPT, img, chat=False, threads=None)
        assert ids == inputs["input_ids"][0].tolist()  # <image> expanded as the processor does
        got = list(generate_ids(session, ids, SamplingConfig(max_new_tokens=10)))
        assert got == want
        runs[seed] = got
    assert runs[0] != runs[1]  # the image is read


def test_generate_with_an_image_path_and_without_an_image(llava, tmp_path, capsys):
    from PIL import Image

    _, out, _ = llava
    path = tmp_path / "a.png"
    Image.fromarray(_image(0)).save(path)
    with_image = generate(out, PROMPT, 6, image=str(path), chat=False)
    assert with_image == generate(out, PROMPT, 6, image=_image(0), chat=False)
    assert generate(out, PROMPT, 6, chat=False) != with_image  # text only: no image tokens
    argv = ["generate", str(out), "--prompt", PROMPT, "--no-chat", "--max-new-tokens", "6"]
    assert main([*argv, "--image", str(path)]) == 0
    assert capsys.readouterr().out == with_image + "\n"


@pytest.fixture(scope="module")
def optimized(llava, tmp_path_factory):
    _, out, _ = llava
    root = tmp_path_factory.mktemp("llava_q")
    q, report = root / "q", root / "report.json"
    argv = ["optimize", str(out), "-o", str(q), "--component", "vision=4,text=3"]
    argv += ["--accuracy-level", "0"]  # float activations: what the numpy reference computes
    assert main([*argv, "--report", str(report), "--quiet"]) == 0
    return q, json.loads(report.read_text())


def _bits(path) -> set[int]:
    import onnx

    model = onnx.load(str(path))
    return {
        b
        for n in model.graph.node
        if n.domain == DOMAIN
        for a in n.attribute
        if a.name == "bits"
        for b in (a.ints or [a.i])  # QxMultiMatMul lists its weights' bits
    }


def _quantx_ops(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node if n.domain == DOMAIN}


def _graph_feeds(folder, seed=0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    s = VlmSession(folder)
    ids = rng.integers(0, 300, (2, 9), dtype=np.int64)
    decoder = {i.name: i for i in s.decoder.session.get_inputs()}
    text = {
        "inputs_embeds": rng.standard_normal((2, 9, 64)).astype(np.float32) * 0.05,
        "attention_mask": np.ones((2, 9), np.int64),
        "position_ids": np.tile(np.arange(9, dtype=np.int64), (2, 1)),
    }
    for name, value in decoder.items():
        if name.startswith("past_key_values."):
            text[name] = np.zeros((2, value.shape[1], 0, value.shape[3]), np.float32)
    return {
        VISION: {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)},
        EMBED: {"input_ids": ids},
        DECODER: text,
    }


def test_optimize_quantizes_each_component_with_its_bits(optimized):
    q, report = optimized
    parts = report["components"]
    assert set(parts) == {"vision", "embed", "text"}
    assert _bits(q / VISION) == {4}
    # position embeddings stay float; q/k/v of one input run as one node
    assert _quantx_ops(q / VISION) == {OP_MATMUL, "QxMultiMatMul"}
    assert _quantx_ops(q / EMBED) == {OP_GATHER}
    assert 3 in _bits(q / DECODER)  # (the lm_head gets the embedding recipe: 4 bits)
    assert _bits(q / EMBED) == {4}  # an embedding table: max(bits, 4)
    for part in parts.values():
        assert part["quantized_parameters"] > 0 and part["bytes_after"] < part["bytes_before"]
    assert {"tokenizer.json", "preprocessor_config.json", "config.json"} <= set(report["copied"])


def test_each_quantized_graph_equals_its_dequantized_reference(optimized):
    q, _ = optimized
    for name, feeds in _graph_feeds(q).items():
        assert_means_its_reference(q / name, feeds)


def test_quantized_folder_generates_from_an_image(optimized, llava):
    q, _ = optimized
    a = generate(q, PROMPT, 8, image=_image(0), chat=False)
    b = generate(q, PROMPT, 8, image=_image(1), chat=False)
    assert a and a != b


def test_optimize_prints_a_summary_per_component(llava, tmp_path, capsys):
    _, out, _ = llava
    folder = tmp_path / "onnx"
    shutil.copytree(out, folder)
    assert main(["optimize", str(folder), "--component", "vision=float"]) == 0
    text = capsys.readouterr().out
    assert "[text] QuantX optimize" in text and "[embed] QuantX optimize" in text
    assert "[vision] kept in float" in text
    q = tmp_path / "onnx-quantx"  # the default output, beside the input
    assert text.strip().endswith(f"wrote {q} (no -o given)")
    assert _bits(q / VISION) == set() and _bits(q / DECODER)


@pytest.mark.parametrize("variant", ["llava", "llava_next"])
def test_calibrated_optimize_reads_images_and_text(variant, request, tmp_path):
    from PIL import Image

    _, out, _ = request.getfixturevalue(variant)
    images = tmp_path / "images"
    images.mkdir()
    for i, shape in enumerate([(40, 52, 3), (70, 30, 3), (33, 33, 3)]):  # NeXT: 3 lengths
        Image.fromarray(_image(10 + i, shape)).save(images / f"{i}.png")
    text = tmp_path / "calib.txt"
    words = [f"{a}{b}{c}" for a in "bcdfgh" for b in "aeiou" for c in "lmnprst"]
    text.write_text(" ".join(words * 2))
    cfg = QuantConfig(
        calib=str(text),
        calib_images=str(images),
        calib_samples=4,
        calib_seq_len=12,
        e2e_epochs=0,
        uniform=True,
        accuracy_level=0,
    )
    rep = optimize(out, tmp_path / "q", cfg)
    assert rep.components["vision"].calibration["batches"] >= 1
    assert rep.components["text"].calibration["source"] == str(text)
    assert rep.components["embed"].calibration is None  # a table: round-to-nearest
    for name, feeds in _graph_feeds(tmp_path / "q").items():
        assert_means_its_reference(tmp_path / "q" / name, feeds)


# --- LLaVA-NeXT: any-resolution crops, packed with image-newline rows ---------------------
@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    from quantx_onnx.export import export

    root = tmp_path_factory.mktemp("llava_next")
    hf = write_tiny_llava(root / "hf", anyres=True)
    return hf, root / "onnx", export(hf, root / "onnx").check


def test_llava_next_generates_token_for_token_as_transformers(llava_next):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf, out, check = llava_next
    assert check.max_abs_diff < 1e-4, check.summary()
    assert VlmSession(out).vision.get_outputs()[1].name == "image_newline"
    model = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf)
    runs = []
    for seed, shape in enumerate([(40, 52, 3), (70, 30, 3), (20, 20, 3)]):  # 5, 3, 5 crops
        img = _image(seed, shape)
        inputs = _hf_inputs(processor, img)
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        session, ids, _ = prepare(out, PROMPT, img, chat=False, threads=None)
        assert ids == inputs["input_ids"][0].tolist()  # as many image tokens as packed rows
        got = list(generate_ids(session, ids, SamplingConfig(max_new_tokens=8)))
        assert got == seq[0, len(ids) :].tolist()
        runs.append((len(ids), got))
    assert len({n for n, _ in runs}) == 3 and len({tuple(g) for _, g in runs}) == 3


def test_llava_next_quantized_graphs_equal_their_references(llava_next, tmp_path):
    _, out, _ = llava_next
    cfg = QuantConfig(components=("vision=4,text=3",), accuracy_level=0)
    rep = optimize(out, tmp_path / "q", cfg)
    assert rep.components["vision"].config.bits == 4 and _bits(tmp_path / "q" / VISION) == {4}
    for name, feeds in _graph_feeds(tmp_path / "q").items():
        assert_means_its_reference(tmp_path / "q" / name, feeds)
    assert generate(tmp_path / "q", PROMPT, 4, image=_image(0), chat=False)


# --- clear errors ---------------------------------------------------------------------------
def test_an_image_for_a_text_only_folder_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="not a vision-language export"):
        generate(tmp_path, PROMPT, image=_image(0))


def test_a_folder_missing_a_graph_is_named(llava, tmp_path):
    _, out, _ = llava
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / EMBED).unlink()
    with pytest.raises(InputError, match=EMBED):
        optimize(broken, tmp_path / "q")
    with pytest.raises(InputError, match=EMBED):
        generate(broken, PROMPT, image=_image(0))


def test_bad_component_specs_and_mismatched_images_are_refused(llava, tmp_path):
    _, out, _ = llava
    for spec in ("audio=4", "vision=7", "vision"):
        with pytest.raises(InputError, match="--component"):
            optimize(out, tmp_path / "q", QuantConfig(components=(spec,)))
    with pytest.raises(InputError, match="does not write its own calibration text"):
        optimize(out, tmp_path / "q", QuantConfig(calib="self"))
    with pytest.raises(InputError, match="nothing.png: not a readable image"):
        generate(out, PROMPT, image=tmp_path / "nothing.png")
    with pytest.raises(InputError, match="2 <image> for 1 images"):
        generate(out, "<image> <image> x", image=_image(0), chat=False)
    with pytest.raises(InputError, match="inputs_embeds"):
        s = VlmSession(out)
        s.decoder.step(np.zeros((1, 2), np.int64), s.empty_cache(), 0)


def test_component_flags_need_a_vlm_folder(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"\x08\x01")
    with pytest.raises(InputError, match="VLM export folder"):
        optimize(model, tmp_path / "q.onnx", QuantConfig(components=("text=3",)))


def test_unsupported_vision_language_models_are_named(llava, tmp_path):
    from quantx_onnx.export import export

    hf, _, _ = llava
    other = tmp_path / "onevision"
    shutil.copytree(hf, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llava_onevision"}))
    with pytest.raises(InputError, match="llava_onevision"):
        export(other, tmp_path / "out")
    (hf / "preprocessor_config.json").rename(other / "moved.json")
    try:
        with pytest.raises(InputError, match="preprocessor_config.json: missing"):
            export(hf, tmp_path / "out")
    finally:
        (other / "moved.json").rename(hf / "preprocessor_config.json")


def test_quantx_sessions_load_every_graph(optimized):
    q, _ = optimized
    for name in (VISION, EMBED, DECODER):
        assert quantx_session(q / name).get_inputs()


# llava-hf/llava-1.5's processor template (typed parts, transformers' generation tag)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_processor_chat_template_places_the_image(llava, hf_model, tmp_path):
    _, out, _ = llava
    _, processor = hf_model
    folder = tmp_path / "chat"
    shutil.copytree(out, folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_TEMPLATE}))
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
    ]
    text = processor.apply_chat_template(
        conversation, chat_template=LLAVA_TEMPLATE, add_generation_prompt=True
    )
    want = processor(images=_image(0), text=text)["input_ids"][0]
    _, ids, _ = prepare(folder, PROMPT, _image(0), chat=True, threads=None)
    assert ids == list(want)
