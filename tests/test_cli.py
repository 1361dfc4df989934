"""`python -m quantx_onnx optimize`: output, exit codes, and refusals without tracebacks."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "quantx_onnx", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture
def small_model(tmp_path, rng):
    w = rng.standard_normal((64, 32)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_prints_what_it_did(small_model, tmp_path):
    r = _cli(
        "optimize", small_model, "-o", tmp_path / "q.onnx", "--bits", "3", "--group-size", "32"
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rewritten: 1 nodes (1 MatMul) over 1 weights" in out
    assert "skipped: none" in out
    assert "bits/weight" in out and "size:" in out and "time:" in out
    assert (tmp_path / "q.onnx").is_file()


def _assert_one_line_error(r, code, text):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert text in lines[0]


def _qx_ops(path):
    return sum(n.domain == "com.quantx" for n in onnx.load(str(path)).graph.node)


def test_default_output_beside_a_file(small_model):
    before = _digest(small_model)
    r = _cli("optimize", small_model, "--bits", "4")
    assert r.returncode == 0, r.stderr
    out = small_model.with_name("m.quantx.onnx")
    assert f"wrote {out} (no -o given)" in r.stdout
    assert _qx_ops(out) == 1 and _digest(small_model) == before
    written = _digest(out)
    again = _cli("optimize", small_model)  # an earlier output is never replaced unasked
    _assert_one_line_error(again, 4, "the default output already exists")
    assert _digest(out) == written


def test_default_output_beside_a_folder(small_model, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    small_model.rename(folder / "model.onnx")
    (folder / "config.json").write_text("{}")
    r = _cli("optimize", folder, "--bits", "4")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "export-quantx"
    assert f"wrote {out} (no -o given)" in r.stdout
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.onnx"]
    assert _qx_ops(out / "model.onnx") == 1
    _assert_one_line_error(_cli("optimize", folder), 4, f"{out}: the default output already")


def test_nothing_to_quantize_names_the_reasons(tmp_path, rng):
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="batched")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
        [numpy_helper.from_array(rng.standard_normal((2, 8, 4)).astype(np.float32), "w")],
    )
    path = tmp_path / "m3d.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    r = _cli("optimize", path, "-o", tmp_path / "q.onnx")
    _assert_one_line_error(r, 3, "constant weight is 3-D (only 2-D weights are quantized)")
    assert "1 x (batched)" in r.stderr


def test_output_equal_to_input_is_refused(small_model):
    before = _digest(small_model)
    r = _cli("optimize", small_model, "-o", small_model)
    _assert_one_line_error(r, 4, "would overwrite the input")
    assert _digest(small_model) == before


@pytest.mark.parametrize(
    "content,text",
    [
        (b"", "file is empty"),
        (b"this is not a model", "not a readable ONNX model"),
    ],
)
def test_bad_input_files(tmp_path, content, text):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    r = _cli("optimize", bad, "-o", tmp_path / "q.onnx")
    _assert_one_line_error(r, 2, text)
    assert list(tmp_path.iterdir()) == [bad]


def test_truncated_model(small_model, tmp_path):
    data = small_model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    r = _cli("optimize", cut, "-o", tmp_path / "q.onnx")
    _assert_one_line_error(r, 2, "not a readable ONNX model")


def test_missing_input(tmp_path):
    r = _cli("optimize", tmp_path / "nope.onnx", "-o", tmp_path / "q.onnx")
    _assert_one_line_error(r, 2, "no such file")


@pytest.mark.parametrize(
    "flags,text",
    [
        (["--bits", "7"], "--bits 7"),
        (["--group-size", "24"], "--group-size 24"),
        (["--target", "riscv"], "--target 'riscv'"),
        (["--exclude", "("], "invalid regular expression"),
        (["--calib-text", "t.txt", "--calib-images", "d"], "one of --calib-text and --calib-"),
    ],
)
def test_invalid_flags(small_model, tmp_path, flags, text):
    r = _cli("optimize", small_model, "-o", tmp_path / "q.onnx", *flags)
    _assert_one_line_error(r, 2, text)


def test_nothing_to_quantize_exit_code(tmp_path):
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g), str(path))
    r = _cli("optimize", path, "-o", tmp_path / "q.onnx")
    _assert_one_line_error(r, 3, "no MatMul/Gemm/Gather")


def test_unwritable_output(small_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = _cli("optimize", small_model, "-o", blocker / "sub" / "q.onnx")
    _assert_one_line_error(r, 4, "cannot write output")
