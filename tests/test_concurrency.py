"""One session run from 8 threads at once, and several sessions in one process, give results
identical (bit for bit) to serial runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from quantx_onnx import QuantConfig, optimize
from quantx_onnx.format import Layout

from .helpers import llm_feeds, quantx_session, qx_matmul_model, random_quantized


def _hammer(session, feeds_list, rounds=6):
    """Run every feed from 8 threads, `rounds` times each; returns results per (thread, feed)."""
    results: dict[tuple[int, int], list[np.ndarray]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(t):
        try:
            start.wait()
            for _ in range(rounds):
                for i, feeds in enumerate(feeds_list):
                    results.setdefault((t, i), []).append(session.run(None, feeds)[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("level", [0, 4])
def test_one_session_from_eight_threads(level, rng):
    q, _ = random_quantized(rng, 320, 200, 3, 64, Layout.TILE16)
    from quantx_onnx.format import pack

    sess = quantx_session(qx_matmul_model(pack(q), q.fmt, ("m", 320), accuracy_level=level))
    feeds_list = [{"A": rng.standard_normal((m, 320)).astype(np.float32)} for m in (1, 7, 130)]
    serial = [sess.run(None, f)[0] for f in feeds_list]
    for (_, i), outs in _hammer(sess, feeds_list).items():
        for out in outs:
            assert np.array_equal(out, serial[i])


def test_several_sessions_in_one_process(tiny_llama, tmp_path):
    paths = []
    for bits in (3, 4):
        out = tmp_path / f"q{bits}"
        optimize(tiny_llama, out, QuantConfig(bits=bits, group_size=32))
        paths.append(out / "model.onnx")
    sessions = [quantx_session(p) for p in paths] + [quantx_session(paths[0], threads=1)]
    feeds = [llm_feeds(sessions[0], seq=s, seed=s) for s in (3, 11)]
    serial = [[s.run(["logits"], f)[0] for f in feeds] for s in sessions]
    # the same model in two sessions with different thread counts agrees exactly
    assert all(np.array_equal(a, b) for a, b in zip(serial[0], serial[2]))
    results: dict[int, list] = {}
    errors = []

    def work(k):
        try:
            for _ in range(5):
                for i, f in enumerate(feeds):
                    out = sessions[k % 3].run(["logits"], f)[0]
                    results.setdefault(k, []).append((i, out))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for k, outs in results.items():
        for i, out in outs:
            assert np.array_equal(out, serial[k % 3][i])
