"""`python -m quantx_onnx bench decode MODEL [--baseline DIR ...]`: whole-model speed.

Every model runs the same workload in one process, alternating round by round: a prefill of
`prompt_tokens` fixed token ids from an empty KV cache, then `new_tokens` greedy decode steps.
Peak memory is measured per model in a child process that loads only that model and runs the
same workload once (ru_maxrss: the whole process, interpreter and ONNX Runtime included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from ..llm import DecoderSession, uses_quantx_ops
from ..model_io import resolve_input


@dataclasses.dataclass
class DecodeResult:
    model: str
    file_bytes: int
    prefill_ms: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    peak_rss_bytes: int | None = None


def model_bytes(path) -> int:
    src = resolve_input(path)
    folder = src.model_path.parent
    return sum(
        f.stat().st_size
        for f in folder.iterdir()
        if f.is_file() and f.name.startswith(src.model_path.name)
    )


def prompt_ids(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, min(vocab, 30000), (1, n), dtype=np.int64)


def run_once(session: DecoderSession, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps)."""
    t0 = time.perf_counter()
    logits, cache = session.step(ids, session.empty_cache(), 0, last_only=True)
    t1 = time.perf_counter()
    pos = ids.shape[1]
    for _ in range(new_tokens - 1):
        token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
        logits, cache = session.step(token, cache, pos)
        pos += 1
    return t1 - t0, time.perf_counter() - t1


def peak_rss(
    model: str, threads: int, prompt_tokens: int, new_tokens: int, quantx_ops: bool = True
) -> int | None:
    """Peak RSS of a child process that loads `model` and runs the workload once."""
    cmd = [
        sys.executable,
        "-m",
        "quantx_onnx.bench.decode",
        "--rss-child",
        str(model),
        str(threads),
        str(prompt_tokens),
        str(new_tokens),
        str(int(quantx_ops)),
    ]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if r.returncode != 0:
        return None
    try:
        return int(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def peak_rss_self() -> int:
    """This process's peak resident memory in bytes. /proc's VmHWM belongs to the current
    address space; ru_maxrss would also count the parent's memory at fork (Linux folds the
    pre-exec high-water mark into it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_child(
    model: str, threads: int, prompt_tokens: int, new_tokens: int, quantx_ops: bool = True
) -> None:
    session = DecoderSession(model, threads=threads, quantx_ops=quantx_ops)
    run_once(session, prompt_ids(session.vocab, prompt_tokens), new_tokens)
    print(peak_rss_self())


def run(
    models: list[str],
    threads: int = 2,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    rounds: int = 3,
    measure_memory: bool = True,
    out=print,
    stock_ort: bool = False,
) -> list[DecodeResult]:
    """``stock_ort``: models without QuantX nodes (fp32, ORT 4-bit, portable QuantX) run in
    plain ONNX Runtime sessions, the QuantX library not even loaded."""
    ops = {m: not stock_ort or uses_quantx_ops(m) for m in models}
    sessions = {m: DecoderSession(m, threads=threads, quantx_ops=ops[m]) for m in models}
    ids = prompt_ids(min(s.vocab for s in sessions.values()), prompt_tokens)
    for s in sessions.values():  # warm up
        run_once(s, ids, 4)
    prefill = {m: [] for m in models}
    decode = {m: [] for m in models}
    for _ in range(rounds):
        for m, s in sessions.items():
            p, d = run_once(s, ids, new_tokens)
            prefill[m].append(p)
            decode[m].append(d)
    del sessions
    results = []
    for m in models:
        d = statistics.median(decode[m])
        results.append(
            DecodeResult(
                model=str(m),
                file_bytes=model_bytes(m),
                prefill_ms=1e3 * statistics.median(prefill[m]),
                decode_tokens_per_s=(new_tokens - 1) / d,
                decode_ms_per_token=1e3 * d / (new_tokens - 1),
                peak_rss_bytes=peak_rss(m, threads, prompt_tokens, new_tokens, ops[m])
                if measure_memory
                else None,
            )
        )
    out(
        f"decode benchmark: prefill {prompt_tokens} tokens, then {new_tokens} greedy tokens, "
        f"{threads} threads, median of {rounds} alternating rounds"
    )
    out(
        f"{'model':<40} {'file MB':>8} {'prefill ms':>10} {'tok/s':>7} {'ms/tok':>7} "
        f"{'peak RSS MB':>11}"
    )
    for r in results:
        label = r.model if ops[r.model] else f"{r.model} [stock ORT]"
        rss = f"{r.peak_rss_bytes / 1e6:11.0f}" if r.peak_rss_bytes else f"{'n/a':>11}"
        out(
            f"{label:<40} {r.file_bytes / 1e6:8.1f} {r.prefill_ms:10.1f} "
            f"{r.decode_tokens_per_s:7.1f} {r.decode_ms_per_token:7.2f} {rss}"
        )
    if len(results) > 1:
        first = results[0]
        for r in results[1:]:
            speed = first.decode_tokens_per_s / r.decode_tokens_per_s
            out(
                f"  {first.model} vs {r.model}: decode {speed:.2f}x, "
                f"prefill {r.prefill_ms / first.prefill_ms:.2f}x, "
                f"size {r.file_bytes / first.file_bytes:.2f}x"
            )
    return results


def to_json(results: list[DecodeResult]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in results], indent=1)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--rss-child":
    _rss_child(sys.argv[2], *map(int, sys.argv[3:6]), bool(int(sys.argv[6])))
