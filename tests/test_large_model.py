"""A 1B-parameter-shaped model (random float16 weights, > 2 GB of external data) optimizes
with memory bounded by one weight, not by the model, and the result runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from .helpers import quantx_session
from .large_model import build, parameters

# runs the CLI in a child that reports its own peak memory when done
_CHILD = (
    "import sys; from quantx_onnx.cli import main; "
    "from quantx_onnx.bench.decode import peak_rss_self; "
    "rc = main(sys.argv[1:]); print('PEAK', peak_rss_self()); sys.exit(rc)"
)


@pytest.mark.slow
def test_one_billion_parameter_model(tmp_path):
    src = build(tmp_path / "src")  # 18 layers, hidden 2048, inner 8192, vocab 32000
    data_bytes = (tmp_path / "src" / "model.onnx.data").stat().st_size
    assert parameters() > 1.0e9 and data_bytes > 2**31
    out = tmp_path / "out" / "model.onnx"
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, "optimize", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split("PEAK")[-1])
    # the float16 model is 2.3 GB; one weight (the 131 MB embedding table) and its temporaries,
    # plus the interpreter and libraries, is what optimize may hold
    assert peak < 0.3 * data_bytes, f"peak RSS {peak / 1e6:.0f} MB"
    assert "rewritten: 128 nodes" in r.stdout
    assert not list((tmp_path / "out").glob(".*"))  # no staging or spill files left
    sess = quantx_session(out)
    logits = sess.run(None, {"ids": np.array([[1, 7, 31999]], np.int64)})[0]
    assert logits.shape == (1, 3, 32000) and np.all(np.isfinite(logits.astype(np.float32)))
