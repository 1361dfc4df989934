"""The check an export ends with: the ONNX model's logits against the transformers model it
came from, on a fixed token sequence run as a prefill and a step through the KV cache. One
number (the largest absolute difference) instead of optimum's per-output validation log."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class LogitCheck:
    max_abs_diff: float
    max_abs_logit: float
    tokens: int

    def summary(self) -> str:
        return (
            f"logits match transformers to {self.max_abs_diff:.2g} (largest logit "
            f"{self.max_abs_logit:.3g}; {self.tokens} tokens, prefill + a KV-cache step)"
        )


def compare_logits(hf_folder: Path, onnx_folder: Path, tokens: int = 16, seed: int = 0):
    """Largest |logit difference| between the transformers model in ``hf_folder`` and the
    export in ``onnx_folder``: the first 3/4 of the tokens as a prefill, the rest as one step
    through the KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from .llm import DecoderSession

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    vocab = int(model.config.vocab_size)
    ids = np.random.default_rng(seed).integers(0, vocab, (1, tokens), dtype=np.int64)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.float().numpy()
    session = DecoderSession(onnx_folder, threads=None)
    split = max(1, tokens * 3 // 4)
    first, cache = session.step(ids[:, :split], session.empty_cache(), 0)
    rest, _ = session.step(ids[:, split:], cache, split)
    got = np.concatenate([first, rest], axis=1)
    return LogitCheck(float(np.abs(got - want).max()), float(np.abs(want).max()), tokens)
