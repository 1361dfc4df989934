"""Text generation with the KV cache: greedy or sampled, chat template, streaming."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import InputError
from .llm import DecoderSession, load_generation_config
from .tokenizer import Tokenizer


@dataclasses.dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None

    def validate(self):
        if self.max_new_tokens < 0:
            raise InputError("max_new_tokens must be >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise InputError("temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")


def choose_token(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Next token from one row of logits."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < cfg.top_p
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first new token comes from the prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def generate_ids(
    session: DecoderSession,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    eos_ids: set[int] = frozenset(),
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yields new token ids one at a time (prefill once, then one decode step per token)."""
    cfg.validate()
    if not prompt_ids:
        raise InputError("the prompt is empty")
    rng = np.random.default_rng(cfg.seed)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    if cfg.max_new_tokens == 0:
        return
    t0 = time.perf_counter()
    logits, cache = session.step(
        np.array([prompt_ids], np.int64), session.empty_cache(), 0, last_only=True
    )
    stats.prefill_s = time.perf_counter() - t0
    pos = len(prompt_ids)
    t0 = time.perf_counter()
    for i in range(cfg.max_new_tokens):
        token = choose_token(logits[0, -1], cfg, rng)
        stats.new_tokens += 1
        stats.decode_s = time.perf_counter() - t0
        yield token
        if token in eos_ids or i + 1 == cfg.max_new_tokens:
            break
        logits, cache = session.step(np.array([[token]], np.int64), cache, pos)
        pos += 1
    stats.decode_s = time.perf_counter() - t0


def eos_ids(folder: Path, tok: Tokenizer | None = None) -> list[int]:
    """The ids generation stops at: generation_config.json's (else config.json's)
    eos_token_id, then the tokenizer's eos_token."""
    value = load_generation_config(Path(folder)).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    ids = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    if tok is None and (Path(folder) / "tokenizer.json").is_file():
        tok = Tokenizer(folder)
    eos = tok.eos_id if tok is not None else None
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids


def generate(
    model_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
    session: DecoderSession | None = None,
    stats: GenerationStats | None = None,
    image=None,
) -> str:
    """Generate a continuation of ``prompt`` with an exported decoder (fp32, ORT 4-bit or
    QuantX); with ``chat`` the model's chat template wraps the prompt when it has one.
    ``on_text`` receives the new text as it is produced (streaming). ``image`` (a path, PIL
    image or array, or a list of them) needs a VLM export folder (:mod:`.vlm`)."""
    from . import vlm

    if image is not None or vlm.is_vlm_folder(model_dir):
        from .vlm.generate import prepare

        session, ids, tok = prepare(model_dir, prompt, image, chat, threads, session)
    else:
        session = session or DecoderSession(model_dir, threads=threads)
        tok = Tokenizer(session.folder)
        ids = tok.encode(tok.chat_prompt(prompt) if chat else prompt)
    eos = set(eos_ids(session.folder, tok))
    cfg = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    out: list[int] = []
    shown = ""
    for token in generate_ids(session, ids, cfg, eos, stats):
        if token in eos:
            break
        out.append(token)
        if on_text:
            full = tok.decode(out)
            if not full.endswith("\ufffd"):  # wait for complete UTF-8 characters
                on_text(full[len(shown) :])
                shown = full
    full = tok.decode(out)
    if on_text and len(full) > len(shown):
        on_text(full[len(shown) :])
    return full
