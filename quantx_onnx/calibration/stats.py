"""Per-input statistics reduced on the fly from captured activations X[tokens, K]."""

from __future__ import annotations

import dataclasses

import numpy as np

# Token weightings of the Hessian H = sum_t w_t x_t x_t^T:
#   plain: w_t = 1. A few "massive activation" tokens (attention sinks) then dominate H, so
#          GPTQ spends its error budget on them alone.
#   norm:  w_t = 1 / mean(x_t^2): every token carries equal weight.
HESSIAN_MODES = ("plain", "norm")


@dataclasses.dataclass
class InputStats:
    K: int
    mode: str = "norm"
    sample_rows: int = 2048
    seed: int = 0
    H: np.ndarray = None  # [K, K] float64
    abs_mean: np.ndarray = None  # [K] mean |x| per channel (AWQ saliency)
    tokens: int = 0
    samples: np.ndarray = None  # [<= sample_rows, K] float32 rows for output-error checks
    sample_weights: np.ndarray = None  # the Hessian token weights of those rows
    _seen: int = 0

    def __post_init__(self):
        self.H = np.zeros((self.K, self.K), np.float64)
        self.abs_mean = np.zeros(self.K, np.float64)
        self._rng = np.random.default_rng(self.seed)

    def token_weights(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "plain":
            return np.ones(len(x), np.float32)
        ms = np.mean(np.square(x, dtype=np.float64), axis=1)
        return (1.0 / np.maximum(ms, 1e-12)).astype(np.float32)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1, self.K)
        if not len(x):
            return
        w = self.token_weights(x)
        xw = x * np.sqrt(w)[:, None]
        self.H += xw.T.astype(np.float64) @ xw.astype(np.float64)
        self.tokens += len(x)
        self.abs_mean += np.abs(x).sum(axis=0, dtype=np.float64)
        self._reservoir(x, w)

    def _reservoir(self, x: np.ndarray, w: np.ndarray) -> None:
        """Uniform sample of rows without keeping them all (reservoir sampling)."""
        if self.samples is None:
            self.samples = np.zeros((0, self.K), np.float32)
            self.sample_weights = np.zeros(0, np.float32)
        room = self.sample_rows - len(self.samples)
        if room > 0:
            take = min(room, len(x))
            self.samples = np.concatenate([self.samples, x[:take]])
            self.sample_weights = np.concatenate([self.sample_weights, w[:take]])
            x, w = x[take:], w[take:]
            self._seen += take
        if not len(x):
            return
        seen = self._seen + 1 + np.arange(len(x))
        j = (self._rng.random(len(x)) * seen).astype(np.int64)
        keep = j < self.sample_rows
        # in-order assignment: a later row replacing an earlier one wins, as in the serial form
        self.samples[j[keep]] = x[keep]
        self.sample_weights[j[keep]] = w[keep]
        self._seen += len(x)

    @property
    def hessian(self) -> np.ndarray:
        """H normalised by the number of tokens."""
        return self.H / max(self.tokens, 1)

    @property
    def channel_abs_mean(self) -> np.ndarray:
        return self.abs_mean / max(self.tokens, 1)
