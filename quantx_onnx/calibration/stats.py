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
    # sum_t w_t x_t (x_ref_t - x_t)^T [K, K] float64, where x_ref is what the float model feeds
    # the same matmul: the error the quantized layers before this one left in its input
    drift: np.ndarray | None = None
    square_sum: np.ndarray = None  # [K] sum of x^2 per channel, every token alike
    _seen: int = 0

    def __post_init__(self):
        self.H = np.zeros((self.K, self.K), np.float64)
        self.abs_mean = np.zeros(self.K, np.float64)
        self.square_sum = np.zeros(self.K, np.float64)
        self._rng = np.random.default_rng(self.seed)

    def token_weights(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "plain":
            return np.ones(len(x), np.float32)
        ms = np.mean(np.square(x, dtype=np.float64), axis=1)
        return (1.0 / np.maximum(ms, 1e-12)).astype(np.float32)

    def update(self, x: np.ndarray, x_ref: np.ndarray | None = None) -> None:
        """Add the tokens ``x`` (the quantized model's inputs); ``x_ref``, the float model's
        inputs for the same tokens, also accumulates :attr:`drift`."""
        x = np.asarray(x, np.float32).reshape(-1, self.K)
        if not len(x):
            return
        w = self.token_weights(x)
        root_w = np.sqrt(w)[:, None]
        xw = x * root_w
        # float32 products per batch (a batch's sum of ~1e3 tokens loses nothing that
        # matters), summed across batches in float64: float64 products took 51 s of a 458 s
        # SmolLM2 run
        self.H += xw.T @ xw
        if x_ref is not None:
            d = (np.asarray(x_ref, np.float32).reshape(-1, self.K) - x) * root_w
            if self.drift is None:
                self.drift = np.zeros((self.K, self.K), np.float64)
            self.drift += xw.T @ d  # float32 products (half the time of H's float64 ones)
        self.tokens += len(x)
        self.abs_mean += np.abs(x).sum(axis=0, dtype=np.float64)
        self.square_sum += np.square(x, dtype=np.float64).sum(axis=0)
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

    def propagated(self, w_kn: np.ndarray, alpha: float, damp: float = 1.0) -> np.ndarray:
        """The weight whose output on the quantized model's inputs best matches the float
        layer's output on the float inputs (error propagation, as in QEP and GPTAQ):
        V = argmin sum_t w_t |x_t V - x_ref_t W|^2 + sum_k r_k |V_k - W_k|^2
          = W + (H + diag r)^-1 drift W,
        taken a fraction ``alpha`` of the way from W (on SmolLM2 0.25 measured best; 1, the
        whole correction, worse than none). The ridge r_k = damp * mean(diag H) * (channel
        k's unweighted energy over the mean) keeps the rows of the few massive-activation
        channels (an attention sink's; they carry little weight in the token-normalised H)
        near W."""
        if self.drift is None or alpha == 0:
            return w_kn
        H = self.H.copy()
        diag = np.diag(H)
        scale = np.mean(diag[diag > 0]) if (diag > 0).any() else 1.0
        energy = self.square_sum / max(np.mean(self.square_sum), 1e-30)
        H[np.diag_indices_from(H)] += damp * scale * np.maximum(energy, 1e-3)
        w64 = np.asarray(w_kn, np.float64)
        correction = np.linalg.solve(H, self.drift @ w64)
        return (w64 + alpha * correction).astype(np.float32)

    @property
    def channel_abs_mean(self) -> np.ndarray:
        return self.abs_mean / max(self.tokens, 1)
