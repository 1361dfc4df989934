#!/usr/bin/env bash
# Decode/prefill thread scaling of QuantX 3-bit SmolLM2 beside llama.cpp Q4_0, on a machine with
# no internet (the lent GPU machine's 16-core CPU): builds llama.cpp (from llama-cpp-python's
# vendored source) and our op library there, then runs `python -m quantx_onnx bench llamacpp` at
# 1, 2, 4, 8, 16 threads and prints one table.
#
#   scripts/thread_scaling.sh stage          # here: packs everything into .scaling/pN (61 MiB
#                                            # each: the device tool carries at most 64 MiB a call)
#   scripts/thread_scaling.sh run            # there, once per part, each call carrying one
#                                            # .scaling/pN: parts accumulate between calls on a
#                                            # warm machine; the call that completes the set
#                                            # unpacks, builds and measures
#
# What is packed: llama.cpp's source (trimmed of models/docs), the Q4_0 GGUF and the QuantX model
# (both as `python -m quantx_onnx bench llamacpp` makes and uses them here) and the ONNX Runtime
# headers our CMake build fetched. Environment: THREADS ("1 2 4 8 16"), ROUNDS (3), PYTHON
# (python3), QUANTX_MODEL (stage: the QuantX export; default the demo's calibrated one), OUT
# (results are copied there when set).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=$ROOT/.scaling
WORK=${WORK:-/tmp/quantx-scaling}
PY=${PYTHON:-python3}
THREADS=${THREADS:-"1 2 4 8 16"}
ROUNDS=${ROUNDS:-3}
PART_MB=${PART_MB:-61}

stage() {
  local cache=${QUANTX_LLAMACPP_DIR:-$HOME/.cache/quantx_onnx/llamacpp}
  local model=${QUANTX_MODEL:-$HOME/.cache/quantx_onnx/demo/smollm2-quantx3-wiki}
  local src
  src=$(ls -d "$cache"/llama_cpp_python-*/vendor/llama.cpp | head -1)
  local gguf
  gguf=$(ls "$cache"/*.Q4_0.gguf | head -1)
  local headers
  headers=$(ls -d "$ROOT"/build*/ort-headers "$ROOT"/build/*/ort-headers 2>/dev/null | head -1 || true)
  [[ -d $src && -f $gguf && -f $model/model.onnx ]] || {
    echo "run 'python -m quantx_onnx bench llamacpp' here first (builds llama.cpp, makes the Q4_0)"
    exit 1
  }
  rm -rf "$STAGE" && mkdir -p "$STAGE/tmp/bundle"
  echo "packing $src (trimmed), $gguf, $model, ${headers:-no ORT headers}"
  local gpu=()  # GPU backends: not configured in a CPU build
  for b in cuda sycl vulkan opencl metal cann musa hip webgpu zdnn; do
    gpu+=(--exclude="llama.cpp/ggml/src/ggml-$b")
  done
  tar -C "$(dirname "$src")" --exclude=llama.cpp/models --exclude=llama.cpp/docs \
    --exclude=llama.cpp/tools/ui --exclude=llama.cpp/.git "${gpu[@]}" \
    -czf "$STAGE/tmp/bundle/llama.cpp.tar.gz" llama.cpp
  cp "$gguf" "$STAGE/tmp/bundle/model.Q4_0.gguf"
  mkdir -p "$STAGE/tmp/bundle/quantx-model"
  cp "$model"/*.json "$model"/model.onnx* "$STAGE/tmp/bundle/quantx-model/"
  [[ -n $headers ]] && cp -r "$headers" "$STAGE/tmp/bundle/ort-headers"
  tar -C "$STAGE/tmp" -cf - bundle | split -b "${PART_MB}M" -d -a 1 - "$STAGE/tmp/chunk"
  local n=0
  for c in "$STAGE"/tmp/chunk*; do
    n=$((n + 1))
    mkdir -p "$STAGE/p$n"
    mv "$c" "$STAGE/p$n/chunk"
  done
  echo "$n" >"$STAGE/p1/count"
  rm -rf "$STAGE/tmp"
  du -sh "$STAGE"/p*
  echo "now call the device tool $n times with command 'bash scripts/thread_scaling.sh run',"
  echo "carrying .scaling/p1, then .scaling/p2, ... (one per call, the machine kept warm)"
}

run() {
  mkdir -p "$WORK/parts"
  for d in "$STAGE"/p*; do
    [[ -f $d/chunk ]] && cp "$d/chunk" "$WORK/parts/$(basename "$d")"
    [[ -f $d/count ]] && cp "$d/count" "$WORK/parts/count"
  done
  local have
  have=$(ls "$WORK/parts" | grep -c '^p' || true)
  local need
  need=$(cat "$WORK/parts/count" 2>/dev/null || echo "?")
  if [[ $need == "?" || $have -lt $need ]]; then
    echo "have $have of $need parts in $WORK/parts: call again carrying the next .scaling/pN"
    exit 0
  fi
  if [[ ! -d $WORK/bundle ]]; then
    echo "unpacking $have parts"
    (for i in $(seq 1 "$need"); do cat "$WORK/parts/p$i"; done) | tar -C "$WORK" -xf -
  fi
  local B=$WORK/bundle
  local jobs
  jobs=$(nproc)
  if [[ ! -x $WORK/llamacpp/build/bin/llama-bench ]]; then
    mkdir -p "$WORK/llamacpp" && tar -C "$WORK/llamacpp" -xzf "$B/llama.cpp.tar.gz"
    echo "building llama.cpp (llama-bench, llama-quantize) with $jobs jobs"
    cmake -S "$WORK/llamacpp/llama.cpp" -B "$WORK/llamacpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_TESTS=OFF >"$WORK/llamacpp-cmake.log" 2>&1
    cmake --build "$WORK/llamacpp/build" -j "$jobs" --target llama-bench llama-quantize \
      >"$WORK/llamacpp-build.log" 2>&1 || { tail -30 "$WORK/llamacpp-build.log"; exit 1; }
  fi
  if [[ ! -f $WORK/ops/custom_ops/libquantx_ops.so ]]; then
    echo "building the QuantX op library"
    local hdr=()
    [[ -d $B/ort-headers ]] && hdr=(-DONNXRUNTIME_INCLUDE_DIR="$(dirname "$(find "$B/ort-headers" -name onnxruntime_cxx_api.h | head -1)")")
    cmake -S "$ROOT" -B "$WORK/ops" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQUANTX_BUILD_STATIC=OFF \
      "${hdr[@]}" >"$WORK/ops-cmake.log" 2>&1 || { tail -30 "$WORK/ops-cmake.log"; exit 1; }
    cmake --build "$WORK/ops" -j "$jobs" >"$WORK/ops-build.log" 2>&1 || { tail -30 "$WORK/ops-build.log"; exit 1; }
  fi
  # the kernel tables this CPU runs against the reference (avx-vnni natively on Intel cores)
  "$WORK/ops/custom_ops/quantx_kernel_tests" --cases 300 | sed -n '1p;$p'
  export QUANTX_OPS_LIBRARY=$WORK/ops/custom_ops/libquantx_ops.so
  export QUANTX_LLAMACPP_DIR=$WORK/llamacpp
  lscpu | grep -E "Model name|^CPU\(s\)|L3" || true
  "$PY" -c "import onnxruntime, quantx_onnx; print('onnxruntime', onnxruntime.__version__, 'kernels', quantx_onnx.kernel_name())"
  # An ONNX Runtime without GroupQueryAttention's query_seqlens input (1.30) refuses the model
  # as written: cut each GQA node to the 11 inputs it takes, which for the benchmark's one
  # unpadded sequence from position 0 is the same attention.
  "$PY" - "$B/quantx-model/model.onnx" <<'PY'
import sys

import onnx

from quantx_onnx.passes.attention_mask import runtime_problem

why = runtime_problem()
if why:
    m = onnx.load(sys.argv[1])
    for n in m.graph.node:
        if n.op_type in ("GroupQueryAttention", "QxGroupQueryAttention") and len(n.input) > 11:
            kept = list(n.input)[:11]
            del n.input[:]
            n.input.extend(kept)
    onnx.save(m, sys.argv[1])
    print(f"{why}: GroupQueryAttention cut to 11 inputs for this run")
PY
  for t in $THREADS; do
    echo "=== $t threads"
    PYTHONUNBUFFERED=1 "$PY" -m quantx_onnx bench llamacpp "$B/quantx-model" --gguf "$B/model.Q4_0.gguf" \
      --threads "$t" --rounds "$ROUNDS" --json "$WORK/scaling_t$t.json"
  done
  "$PY" - "$WORK" $THREADS <<'EOF'
import json, sys
work, threads = sys.argv[1], sys.argv[2:]
print("| threads | llama.cpp prefill ms | QuantX prefill ms | prefill time ratio | llama.cpp tok/s "
      "| QuantX tok/s | decode x | QuantX x roof | llama.cpp x roof | read GB/s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t in threads:
    r = json.load(open(f"{work}/scaling_t{t}.json"))
    ours, theirs = r["engines"]
    gbs = list(r["read_gb_per_s"].values())[0]
    print(f"| {t} | {theirs['prefill_ms']:.1f} | {ours['prefill_ms']:.1f} | "
          f"{r['ratios']['prefill_time_ratio']:.2f} | {theirs['decode_tokens_per_s']:.1f} | "
          f"{ours['decode_tokens_per_s']:.1f} | {r['ratios']['decode_x']:.2f} | "
          f"{ours['x_roof']:.2f} | {theirs['x_roof']:.2f} | {gbs:.1f} |")
EOF
  if [[ -n ${OUT:-} ]]; then cp "$WORK"/scaling_t*.json "$OUT"/; fi
}

case "${1:-}" in
  stage) stage ;;
  run) run ;;
  *) echo "usage: $0 stage|run" >&2; exit 2 ;;
esac
