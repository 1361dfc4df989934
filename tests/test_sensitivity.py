"""The Fisher estimate of a weight error's cost against the KL measured in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from quantx_onnx.passes.quantize_linear import DEFAULT_RULES, find_matches
from quantx_onnx.passes.rule import weight_array

from quantx_onnx.calibration.sensitivity import measure

from .helpers import llm_feeds, quantx_session

pytest.importorskip("torch")


def _log_probs(model: ir.Model, feeds):
    sess = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    out = []
    for f in feeds:
        z = sess.run(["logits"], f)[0].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        out.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    return out


def test_estimated_cost_is_the_measured_kl(tiny_llama, rng):
    model = ir.load(str(tiny_llama / "model.onnx"))
    matches = [m for _, m in find_matches(model.graph, DEFAULT_RULES, None)[0]]
    sess = quantx_session(tiny_llama / "model.onnx")
    feeds = [llm_feeds(sess, seq=32, batch=4, seed=s) for s in range(6)]
    sens = measure(model, matches, feeds)
    assert sens.tokens == 6 * 4 * 32
    base = _log_probs(model, feeds)
    ratios = {}
    for m in {m.key: m for m in matches}.values():
        w = weight_array(m.weight, m.key).astype(np.float32)
        d = rng.standard_normal(w.shape).astype(np.float32) * 0.3 * w.std()
        estimate = sens.loss_increase(m.key, w, w + d)
        original = m.weight.const_value
        noisy = w + d
        m.weight.const_value = ir.tensor(
            np.ascontiguousarray(noisy.T if m.key.transposed else noisy)
        )
        got = _log_probs(model, feeds)
        m.weight.const_value = original
        kl = np.mean([(np.exp(a) * (a - b)).sum(-1).mean() for a, b in zip(base, got)])
        ratios[m.key.initializer] = estimate / kl
    # second order with output channels averaged: close, never off by an order of magnitude;
    # the embedding table (lookup + tied lm_head terms) included
    assert all(0.3 < r < 1.6 for r in ratios.values()), ratios
    assert 0.8 < np.median(list(ratios.values())) < 1.2, ratios
    assert 0.8 < ratios["model.embed_tokens.weight"] < 1.25, ratios


def test_fisher_labels_follow_the_model_distribution():
    """The labels are drawn from each row's own distribution (zero-probability tokens never)."""
    import torch

    from quantx_onnx.calibration.sensitivity import _draw

    p = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.1, 0.0, 0.9]]).repeat(20000, 1)
    labels = _draw(torch, p, torch.Generator().manual_seed(0)).reshape(-1, 2)
    for row in range(2):
        share = np.bincount(labels[:, row].numpy(), minlength=4) / len(labels)
        np.testing.assert_allclose(share, p[row].numpy(), atol=0.01)


def test_a_rotating_candidate_is_priced_by_its_rotated_rounding(tiny_llama):
    """plan.estimate of a recipe that rotates: the clip search in the rotated basis (as
    quantize_with makes it, weighted by diag(Q^T F Q)), its error priced back in W's basis;
    where K has no Hadamard order (the MLP's 160) the price is the unrotated one."""
    import types

    from quantx_onnx.format import Layout, dequantize
    from quantx_onnx.plan import estimate
    from quantx_onnx.recipes import Recipe, quantize_with

    model = ir.load(str(tiny_llama / "model.onnx"))
    matches = [m for _, m in find_matches(model.graph, DEFAULT_RULES, None)[0]]
    sess = quantx_session(tiny_llama / "model.onnx")
    sens = measure(model, matches, [llm_feeds(sess, seq=32, batch=4, seed=s) for s in range(2)])
    plain, rotating = Recipe(3, 32, "gptq"), Recipe(3, 32, "gptq", rotate=True)
    checked = set()
    for m in {m.key: m for m in matches}.values():
        if m.key not in sens.fisher:
            continue
        w = weight_array(m.weight, m.key).astype(np.float32)
        got = estimate(rotating, m.key, w, sens, Layout.TILE16)
        unrotated = estimate(plain, m.key, w, sens, Layout.TILE16)
        if w.shape[0] != 64:
            assert got == unrotated
            continue
        stats = types.SimpleNamespace(hessian=sens.fisher[m.key], tokens=sens.tokens)
        q = quantize_with(Recipe(3, 32, "mse", rotate=True), w, Layout.TILE16, stats)
        assert q.fmt.rotate == 1
        want = sens.loss_increase(m.key, w, dequantize(q))
        assert got == pytest.approx(want, rel=1e-4), m.key
        assert got != pytest.approx(unrotated, rel=1e-3), m.key
        checked.add(m.key.initializer)
    assert len(checked) >= 12, checked
