"""Two builds of the QuantX op library on one model, processes alternating: prefill time and
decode time per step, for changes to the kernels or ops (docs/PERF.md). Each round runs one
child process per library (``QUANTX_OPS_LIBRARY``); a child times `--reps` prefills of
`--prompt` tokens, then decode steps after `--depth` cached positions for `--seconds`.

    python scripts/ops_ab.py MODEL_DIR OLD/libquantx_ops.so NEW/libquantx_ops.so \
        --threads 2 --depth 160 --rounds 4

Builds of the library: ``cmake -S . -B DIR -DQUANTX_BUILD_OPS=ON -DQUANTX_BUILD_TESTS=OFF
-DONNXRUNTIME_INCLUDE_DIR=...`` (the headers the package build fetched, under
build/*/ort-headers), then ``cmake --build DIR --target quantx_ops``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import numpy as np
from quantx_onnx.llm import DecoderSession
model = sys.argv[1]
threads, prompt, reps, depth = map(int, sys.argv[2:6])
seconds = float(sys.argv[6])
s = DecoderSession(model, threads=threads)
rng = np.random.default_rng(0)
ids = rng.integers(100, 30000, (1, prompt), dtype=np.int64)
s.step(ids, s.empty_cache(1, prompt + 8), 0, last_only=True)
prefill = []
for _ in range(reps):
    cache = s.empty_cache(1, prompt + 8)
    t0 = time.perf_counter()
    s.step(ids, cache, 0, last_only=True)
    prefill.append((time.perf_counter() - t0) * 1e3)
n = 40
ids = rng.integers(100, 30000, (1, depth), dtype=np.int64)
first, cache = s.step(ids, s.empty_cache(1, depth + n + 8), 0, last_only=True)
steps, spent, end = 0, 0.0, time.time() + seconds
while time.time() < end:
    cache.length, logits, pos = depth, first, depth  # rewind the shared cache
    t0 = time.perf_counter()
    for _ in range(n):
        token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        logits, cache = s.step(token, cache, pos)
        pos += 1
    spent += time.perf_counter() - t0
    steps += n
print(json.dumps({"prefill_ms": statistics.median(prefill), "step_ms": spent * 1e3 / steps}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("old", help="the baseline libquantx_ops.so")
    ap.add_argument("new", help="the changed libquantx_ops.so")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--depth", type=int, default=160)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    for lib in (args.old, args.new):
        if not os.path.isfile(lib):
            sys.exit(f"{lib}: no such file")
    results: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, lib in (("old", args.old), ("new", args.new)):
            env = dict(os.environ, QUANTX_OPS_LIBRARY=os.path.abspath(lib))
            argv = [args.model, args.threads, args.prompt, args.reps, args.depth, args.seconds]
            run = subprocess.run(
                [sys.executable, "-c", CHILD, *map(str, argv)],
                env=env,
                capture_output=True,
                text=True,
            )
            if run.returncode:
                sys.exit(f"{name} ({lib}) failed:\n{run.stderr[-2000:]}")
            results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
            row = results[name][-1]
            print(
                f"round {r + 1}/{args.rounds} {name}: prefill {row['prefill_ms']:.2f} ms, "
                f"decode {row['step_ms']:.3f} ms/step",
                flush=True,
            )
    med = {
        name: {k: statistics.median(row[k] for row in rows) for k in ("prefill_ms", "step_ms")}
        for name, rows in results.items()
    }
    print(
        f"{args.threads} threads, prefill {args.prompt}, decode after {args.depth}, medians of "
        f"{args.rounds} alternating processes"
    )
    for key, label in (("prefill_ms", "prefill ms"), ("step_ms", "decode ms/step")):
        old, new = med["old"][key], med["new"][key]
        print(f"  {label:15} old {old:8.3f}  new {new:8.3f}  old/new {old / new:.3f}")


if __name__ == "__main__":
    main()
