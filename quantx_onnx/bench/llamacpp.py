"""`python -m quantx_onnx bench llamacpp [MODEL]`: QuantX beside llama.cpp, one run.

The peer for small-model CPU inference is llama.cpp. This benchmark builds it (once, into a cache
folder outside the repository) from the source that PyPI's ``llama-cpp-python`` sdist vendors,
makes a Q4_0 GGUF from the packaged SmolLM2 (``llama-quantize --allow-requantize`` to F32, then
Q4_0), and times both engines with the same threads, alternating round by round:

- prefill: ``prompt_tokens`` tokens from an empty cache (llama-bench ``-p P -n 0``; QuantX one
  session run over the prompt);
- decode: ``new_tokens`` tokens after a prompt of ``prompt_tokens`` (llama-bench
  ``-p 0 -n N -d P``; QuantX ``new_tokens - 1`` greedy steps after the prefill).

It also prints a model-level roofline: the bytes each engine must read per decoded token (every
weight except the embedding table's rows, plus the KV cache at the mean decode depth) over the
read bandwidth measured on the spot on a buffer of that size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ..errors import InputError

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp (commit 0c1e570, Oct 2026)
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
]
TARGETS = ["llama-bench", "llama-quantize"]


def cache_dir() -> Path:
    """``QUANTX_LLAMACPP_DIR`` or ~/.cache/quantx_onnx/llamacpp (never inside the repository)."""
    env = os.environ.get("QUANTX_LLAMACPP_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(base) / "quantx_onnx" / "llamacpp"


def _run(cmd: list[str], log: Path, out) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise InputError(
            f"{cmd[0]} failed (exit {r.returncode}); end of {log}:\n" + "\n".join(tail)
        )


def ensure_llamacpp(cache: Path | None = None, jobs: int | None = None, out=print) -> Path:
    """The folder holding llama-bench and llama-quantize, built first if missing."""
    cache = cache or cache_dir()
    bindir = cache / "build" / "bin"
    if all((bindir / t).is_file() for t in TARGETS):
        return bindir
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.is_file():
            out(f"[llamacpp] downloading the llama-cpp-python=={LLAMA_CPP_PYTHON} sdist (pip)")
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                    "-d",
                    str(cache),
                ],
                log,
                out,
            )
        out(f"[llamacpp] unpacking {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    cmake = shutil.which("cmake") or "cmake"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = jobs or os.cpu_count() or 2
    out(
        f"[llamacpp] building {', '.join(TARGETS)} from {src} with {jobs} jobs "
        f"(about 10 minutes on 2 cores; log: {log})"
    )
    start = time.perf_counter()
    _run([cmake, "-S", str(src), "-B", str(cache / "build"), *gen, *CMAKE_FLAGS], log, out)
    _run([cmake, "--build", str(cache / "build"), "-j", str(jobs), "--target", *TARGETS], log, out)
    out(f"[llamacpp] built in {time.perf_counter() - start:.0f} s")
    return bindir


def ensure_q4_0(bindir: Path, cache: Path | None = None, out=print) -> Path:
    """Q4_0 GGUF of the packaged SmolLM2: requantized to F32, then to Q4_0 (cached)."""
    from ..demo import smollm2_gguf

    cache = cache or cache_dir()
    src = smollm2_gguf()
    q4 = cache / f"{src.stem.split('.')[0]}.Q4_0.gguf"
    if q4.is_file():
        return q4
    f32 = cache / f"{src.stem.split('.')[0]}.F32.gguf"
    log = cache / "quantize.log"
    out(f"[llamacpp] {src.name} -> {f32.name} -> {q4.name}")
    quantize = str(bindir / "llama-quantize")
    _run([quantize, "--allow-requantize", str(src), str(f32), "F32"], log, out)
    _run([quantize, str(f32), str(q4), "Q4_0"], log, out)
    f32.unlink()
    return q4


def llama_bench(
    bindir: Path, gguf: Path, threads: int, prompt: int, gen: int, depth: int, reps: int = 1
) -> dict:
    """One llama-bench test; its JSON record (avg_ns, avg_ts, model_size, ...)."""
    cmd = [
        str(bindir / "llama-bench"),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-p",
        str(prompt),
        "-n",
        str(gen),
        "-d",
        str(depth),
        "-r",
        str(reps),
        "-o",
        "json",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise InputError(f"llama-bench failed: {r.stderr[-2000:]}")
    records = json.loads(r.stdout)
    if len(records) != 1:
        raise InputError(f"llama-bench: expected one test, got {len(records)}")
    return records[0]


# --- bytes per decoded token -------------------------------------------------------------------
@dataclasses.dataclass
class TokenBytes:
    weights: int  # weight bytes read per decoded token
    kv: int  # KV-cache bytes read per decoded token at the mean decode depth

    @property
    def total(self) -> int:
        return self.weights + self.kv


def _kv_bytes(layers: int, kv_dim: int, depth: float, elem_bytes: int) -> int:
    return int(2 * layers * kv_dim * depth * elem_bytes)


def quantx_token_bytes(model, depth: float) -> TokenBytes:
    """Every initializer a node other than a lookup (Gather, QxGather) consumes, plus the KV
    cache (float32) read at `depth`."""
    import onnx

    from ..model_io import resolve_input

    path = resolve_input(model).model_path
    proto = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            length = {e.key: e.value for e in init.external_data}.get("length", "0")
            sizes[init.name] = int(length)
        else:
            sizes[init.name] = len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    read = set()
    for node in proto.graph.node:
        if node.op_type in ("Gather", "QxGather"):
            continue
        read.update(i for i in node.input if i in sizes)
    weights = sum(sizes[n] for n in read)
    kv_inputs = [i for i in proto.graph.input if i.name.startswith("past_key_values.")]
    layers = len(kv_inputs) // 2
    dims = kv_inputs[0].type.tensor_type.shape.dim if kv_inputs else []
    kv_dim = int(dims[1].dim_value) * int(dims[3].dim_value) if kv_inputs else 0
    return TokenBytes(weights, _kv_bytes(layers, kv_dim, depth, 4))


def gguf_token_bytes(path: Path, depth: float, model_size: int = 0) -> TokenBytes:
    """Every tensor except token_embd (whose rows are looked up), unless the output projection is
    tied to it; plus the KV cache (f16, llama.cpp's default) read at `depth`. Without the
    `gguf` package: llama-bench's model_size (all tensors: right for tied embeddings) and no KV."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return TokenBytes(model_size, 0)

    reader = GGUFReader(str(path))
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    weights = sum(n for name, n in tensors.items() if name != "token_embd.weight")
    if "output.weight" not in tensors:  # tied: the whole table is the lm_head
        weights += tensors.get("token_embd.weight", 0)

    def field(suffix):
        for name, f in reader.fields.items():
            if name.endswith(suffix):
                return int(f.parts[f.data[0]][0])
        return 0

    layers = field(".block_count")
    heads = field(".attention.head_count")
    kv_heads = field(".attention.head_count_kv") or heads
    head_dim = field(".embedding_length") // max(heads, 1)
    return TokenBytes(weights, _kv_bytes(layers, kv_heads * head_dim, depth, 2))


def read_bandwidth_gbs(nbytes: int, threads: int) -> float:
    """GB/s to read a buffer of `nbytes` (the size a decoded token reads) with `threads`."""
    from .kernels import stream_ms

    return nbytes / stream_ms(nbytes, threads) / 1e6


# --- the run -------------------------------------------------------------------------------------
@dataclasses.dataclass
class EngineResult:
    name: str
    file_bytes: int
    prefill_ms: float
    decode_tokens_per_s: float
    token_bytes: int
    roof_tokens_per_s: float = 0.0
    prefill_samples: list = dataclasses.field(default_factory=list)
    decode_samples: list = dataclasses.field(default_factory=list)

    @property
    def x_roof(self) -> float:
        return self.roof_tokens_per_s / self.decode_tokens_per_s


def run(
    model,
    threads: int = 2,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    rounds: int = 5,
    jobs: int | None = None,
    gguf: Path | None = None,
    out=print,
) -> dict:
    from ..llm import DecoderSession
    from .decode import model_bytes, prompt_ids, run_once

    bindir = ensure_llamacpp(jobs=jobs, out=out)
    gguf = Path(gguf) if gguf else ensure_q4_0(bindir, out=out)
    session = DecoderSession(model, threads=threads)
    if "logits_to_keep" not in session.input_names:
        out(
            f"note: {model} has no logits_to_keep input, so its prefill computes the lm_head at "
            "every prompt position (llama.cpp: the last only); models optimized from now on have "
            "it, `python -m quantx_onnx.passes.logits_rule MODEL OUT` adds it to older ones"
        )
    ids = prompt_ids(session.vocab, prompt_tokens)
    run_once(session, ids, 4)  # warm up

    depth = prompt_tokens + new_tokens / 2
    ours = EngineResult(
        f"QuantX {Path(str(model)).name}",
        model_bytes(model),
        0.0,
        0.0,
        quantx_token_bytes(model, depth).total,
    )
    size = llama_bench(bindir, gguf, threads, 1, 0, 0)["model_size"]
    theirs = EngineResult(
        f"llama.cpp {gguf.name}",
        gguf.stat().st_size,
        0.0,
        0.0,
        gguf_token_bytes(gguf, depth, size).total,
    )
    for i in range(rounds):
        rp = llama_bench(bindir, gguf, threads, prompt_tokens, 0, 0)
        rd = llama_bench(bindir, gguf, threads, 0, new_tokens, prompt_tokens)
        theirs.prefill_samples.append(rp["avg_ns"] / 1e6)
        theirs.decode_samples.append(rd["avg_ts"])
        time.sleep(0.05)  # let llama.cpp's threads go before ours spin
        p, d = run_once(session, ids, new_tokens)
        ours.prefill_samples.append(1e3 * p)
        ours.decode_samples.append((new_tokens - 1) / d)
        out(
            f"  round {i + 1}/{rounds}: llama.cpp {theirs.prefill_samples[-1]:.1f} ms, "
            f"{theirs.decode_samples[-1]:.1f} tok/s; QuantX {ours.prefill_samples[-1]:.1f} ms, "
            f"{ours.decode_samples[-1]:.1f} tok/s"
        )
    for r in (ours, theirs):
        r.prefill_ms = statistics.median(r.prefill_samples)
        r.decode_tokens_per_s = statistics.median(r.decode_samples)
    gbs = {r.name: read_bandwidth_gbs(r.token_bytes, threads) for r in (ours, theirs)}
    for r in (ours, theirs):
        r.roof_tokens_per_s = gbs[r.name] * 1e9 / r.token_bytes

    out(
        f"SmolLM2 side by side: {threads} threads, prefill {prompt_tokens} tokens, decode "
        f"{new_tokens} tokens after {prompt_tokens}, median of {rounds} alternating rounds"
    )
    out(
        f"{'engine':<44} {'file MB':>7} {'prefill ms':>10} {'tok/s':>7} {'MB/token':>8} "
        f"{'GB/s':>5} {'roof tok/s':>10} {'x roof':>6}"
    )
    for r in (ours, theirs):
        achieved = r.token_bytes * r.decode_tokens_per_s / 1e9
        out(
            f"{r.name:<44} {r.file_bytes / 1e6:7.1f} {r.prefill_ms:10.1f} "
            f"{r.decode_tokens_per_s:7.1f} {r.token_bytes / 1e6:8.1f} {achieved:5.1f} "
            f"{r.roof_tokens_per_s:10.1f} {r.x_roof:6.2f}"
        )
    out(
        f"read bandwidth on the spot: {gbs[ours.name]:.1f} GB/s over {ours.token_bytes / 1e6:.1f} "
        f"MB, {gbs[theirs.name]:.1f} GB/s over {theirs.token_bytes / 1e6:.1f} MB"
    )
    ratios = {
        "decode_x": ours.decode_tokens_per_s / theirs.decode_tokens_per_s,
        "prefill_time_ratio": ours.prefill_ms / theirs.prefill_ms,
        "size_ratio": theirs.file_bytes / ours.file_bytes,
        "token_bytes_ratio": theirs.token_bytes / ours.token_bytes,
    }
    out(
        f"QuantX vs llama.cpp: decode {ratios['decode_x']:.2f}x its tok/s, prefill "
        f"{ratios['prefill_time_ratio']:.2f}x its time, file {ratios['size_ratio']:.2f}x smaller, "
        f"{ratios['token_bytes_ratio']:.2f}x fewer bytes per token"
    )
    return {
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "engines": [dataclasses.asdict(r) | {"x_roof": r.x_roof} for r in (ours, theirs)],
        "read_gb_per_s": gbs,
        "ratios": ratios,
    }
