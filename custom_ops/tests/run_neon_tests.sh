#!/usr/bin/env bash
# Cross-builds the C++ kernel tests for aarch64 and runs them under qemu-aarch64 on two CPU
# models: one with the dot-product extension (tables ref, neon, neon-dotprod) and one without
# (ref, neon; the neon-dotprod table must be reported unsupported, not crash).
#
#   custom_ops/tests/run_neon_tests.sh
#
# Needs g++-aarch64-linux-gnu, qemu-user (qemu-aarch64), cmake (and ninja if present).
# Environment overrides:
#   BUILD_DIR  build directory (default: <repo>/build-aarch64)
#   SYSROOT    aarch64 target root, given to qemu as -L (default: /usr/aarch64-linux-gnu)
#   QEMU       qemu user-mode binary (default: qemu-aarch64)
#   CPU_DOT    CPU model with dotprod (default: max)
#   CPU_NODOT  CPU model without dotprod (default: cortex-a53)
#   CASES      random cases per kernel table (default: 720, one full cycle of the formats)
#   SEED       test seed (default: 1234)
#   JOBS       build parallelism (default: 2)
# Exits non-zero on any build error, test failure or unexpected table list.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build-aarch64}"
SYSROOT="${SYSROOT:-/usr/aarch64-linux-gnu}"
QEMU="${QEMU:-qemu-aarch64}"
CPU_DOT="${CPU_DOT:-max}"
CPU_NODOT="${CPU_NODOT:-cortex-a53}"
CASES="${CASES:-720}"
SEED="${SEED:-1234}"
JOBS="${JOBS:-2}"

die() {
  echo "run_neon_tests: $*" >&2
  exit 1
}

command -v aarch64-linux-gnu-g++ > /dev/null || die "aarch64-linux-gnu-g++ not found (apt install g++-aarch64-linux-gnu)"
command -v "$QEMU" > /dev/null || die "$QEMU not found (apt install qemu-user)"
[ -d "$SYSROOT" ] || die "target root $SYSROOT not found"

generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi

echo "== configure + build ($BUILD_DIR)"
cmake -S "$ROOT" -B "$BUILD_DIR" "${generator[@]}" \
  -DCMAKE_TOOLCHAIN_FILE="$ROOT/custom_ops/cmake/aarch64-toolchain.cmake" \
  -DQUANTX_AARCH64_SYSROOT="$SYSROOT" \
  -DCMAKE_BUILD_TYPE=Release -DQUANTX_BUILD_OPS=OFF -DQUANTX_BUILD_TESTS=ON > /dev/null
cmake --build "$BUILD_DIR" --target quantx_kernel_tests -j "$JOBS"
BIN="$BUILD_DIR/custom_ops/quantx_kernel_tests"
[ -x "$BIN" ] || die "$BIN was not built"

status=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# run_model CPU EXPECTED_TABLES: runs every table usable on CPU, checks the list and the result.
run_model() {
  local cpu="$1" expected="$2" rc=0
  echo "== qemu-aarch64 -cpu $cpu: $CASES cases per table"
  "$QEMU" -L "$SYSROOT" -cpu "$cpu" "$BIN" --cases "$CASES" --seed "$SEED" > "$log" 2>&1 || rc=$?
  grep -E '^(FAIL|kernel sets under test)' "$log" | head -50 || true
  local summary
  summary="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" || true)"
  echo "-cpu $cpu: ${summary:-no summary line (crashed?)}"
  if [ "$rc" -ne 0 ] || [ -z "$summary" ]; then
    echo "FAILED: -cpu $cpu exited with status $rc" >&2
    tail -5 "$log" >&2
    status=1
  fi
  local tables
  tables="$(sed -n 's/^kernel sets under test: *//p' "$log" | sed 's/ *$//')"
  if [ "$tables" != "$expected" ]; then
    echo "FAILED: -cpu $cpu tested tables '$tables', expected '$expected'" >&2
    status=1
  fi
}

run_model "$CPU_DOT" "ref neon neon-dotprod"
run_model "$CPU_NODOT" "ref neon"

# Without dotprod the neon-dotprod table must be refused by dispatch (a FAIL line and exit
# status 1), never executed (SIGILL, status 132 under qemu).
echo "== qemu-aarch64 -cpu $CPU_NODOT --isa neon-dotprod: must be reported unsupported"
rc=0
"$QEMU" -L "$SYSROOT" -cpu "$CPU_NODOT" "$BIN" --isa neon-dotprod --cases 1 > "$log" 2>&1 || rc=$?
cat "$log"
if [ "$rc" -eq 1 ] && grep -q "lacks the instructions of kernels 'neon-dotprod'" "$log"; then
  echo "-cpu $CPU_NODOT: neon-dotprod reported unsupported (ok)"
else
  echo "FAILED: expected neon-dotprod to be reported unsupported (exit status 1), got $rc" >&2
  status=1
fi

if [ "$status" -eq 0 ]; then echo "run_neon_tests: all passed"; else echo "run_neon_tests: FAILED" >&2; fi
exit "$status"
