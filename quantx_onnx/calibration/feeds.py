"""Calibration inputs: text (tokenized with the export's tokenizer.json), token ids in a .npy or
.npz file, or feeds given directly through the Python API."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import InputError


def sample_windows(tokens: np.ndarray, samples: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """`samples` windows of `seq_len` tokens at seeded random offsets of a token stream."""
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    if len(tokens) < seq_len + 1:
        raise InputError(
            f"calibration text has {len(tokens)} tokens; --calib-seq-len {seq_len} needs more"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=samples)
    return np.stack([tokens[s : s + seq_len] for s in starts])


def load_token_file(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy/.npz file ({e})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        key = "input_ids" if "input_ids" in data.files else (data.files[0] if data.files else None)
        if key is None:
            raise InputError(f"{path}: empty .npz")
        data = data[key]
    if not np.issubdtype(data.dtype, np.integer) or data.ndim not in (1, 2):
        raise InputError(f"{path}: expected integer token ids of shape [n] or [samples, length]")
    return data.astype(np.int64)


def token_windows(spec: str, folder: Path, samples: int, seq_len: int, seed: int = 0):
    """Token windows [samples, seq_len] from a text spec (file, gensim:*) or a token file."""
    path = Path(spec)
    if path.suffix in (".npy", ".npz") and path.is_file():
        ids = load_token_file(path)
        if ids.ndim == 2:
            if ids.shape[1] < 2:
                raise InputError(f"{path}: sequences must be at least 2 tokens long")
            return ids[:samples, :seq_len]
        return sample_windows(ids, samples, seq_len, seed)
    from ..data import load_text
    from ..tokenizer import Tokenizer

    tokens = np.array(Tokenizer(folder).encode(load_text(spec)), np.int64)
    return sample_windows(tokens, samples, seq_len, seed)


def decoder_feeds(
    input_names: Iterable[str],
    past_shapes: dict[str, tuple],
    ids: np.ndarray,
    past_dtype=np.float32,
) -> dict[str, np.ndarray]:
    """Feeds for a prefill of `ids` [batch, seq] from an empty KV cache."""
    names = set(input_names)
    batch, seq = ids.shape
    feeds = {"input_ids": ids.astype(np.int64)}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((batch, seq), np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
    for name, (heads, dim) in past_shapes.items():
        feeds[name] = np.zeros((batch, heads, 0, dim), past_dtype)
    return feeds


def batches(windows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
