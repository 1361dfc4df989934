"""`python -m quantx_onnx export` of a GGUF file: special-token metadata as the GGUF says, one
summary line instead of optimum's validation log, logits checked against transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from .helpers import write_tiny_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("optimum.exporters.onnx")


def _gguf_meta(path):
    r = gguf.GGUFReader(str(path))
    tokens = r.fields["tokenizer.ggml.tokens"]
    ids = {
        role: int(r.fields[f"tokenizer.ggml.{key}_token_id"].contents())
        for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }
    return (
        ids,
        {role: tokens.contents(i) for role, i in ids.items()},
        bool(r.fields["tokenizer.ggml.add_bos_token"].contents()),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    src = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    out = tmp_path_factory.mktemp("export") / "onnx"
    r = subprocess.run(
        [sys.executable, "-m", "quantx_onnx", "export", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return src, out, r


def test_special_tokens_follow_the_gguf_metadata(exported):
    src, out, _ = exported
    ids, tokens, add_bos = _gguf_meta(src)
    assert tokens["eos"] != tokens["bos"]  # the case transformers' conversion gets wrong
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    special = json.loads((out / "special_tokens_map.json").read_text())
    for role in ("bos", "eos", "pad", "unk"):
        assert tok_cfg[f"{role}_token"] == tokens[role], role
        assert special[f"{role}_token"]["content"] == tokens[role], role
        assert json.loads((out / "config.json").read_text())[f"{role}_token_id"] == ids[role]
    assert tok_cfg["add_bos_token"] is add_bos is False
    generation = json.loads((out / "generation_config.json").read_text())
    for role in ("bos", "eos", "pad"):
        assert generation[f"{role}_token_id"] == ids[role], role
    # tokenizer.json itself (what tokenizers, onnxruntime-genai and quantx generate read)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    plain = tok.encode("bal bel", add_special_tokens=False).ids
    assert tok.encode("bal bel").ids == plain  # no BOS added, as the GGUF says
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (
        ids["eos"],
        ids["pad"],
        ids["bos"],
    )
    assert hf("bal bel").input_ids == plain

    from quantx_onnx.tokenizer import Tokenizer as QxTokenizer

    assert QxTokenizer(out).eos_id == ids["eos"]


def test_export_prints_two_lines_with_the_logit_check(exported):
    _, _, r = exported
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("exported "), r.stdout
    assert "logits match transformers to" in lines[1]
    diff = float(lines[1].split("logits match transformers to ")[1].split()[0])
    assert diff < 1e-4
    assert r.stderr.strip() == "", r.stderr


def test_quiet_export_skips_optimums_validation_log(tmp_path, monkeypatch, capfd):
    """optimum logs an error line per output value beyond 1e-5 during its validation (40 for
    SmolLM2): a quiet export does not run it, a verbose one does."""
    import optimum.exporters.onnx.convert as convert

    from quantx_onnx.export import export

    calls = []
    monkeypatch.setattr(convert, "validate_models_outputs", lambda *a, **k: calls.append(1))
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    done = export(src, tmp_path / "quiet")
    assert calls == [] and done.check.max_abs_diff < 1e-4
    assert done.check.max_abs_logit > 0.1 and np.isfinite(done.check.max_abs_diff)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    export(src, tmp_path / "verbose", quiet=False)
    assert calls == [1]
