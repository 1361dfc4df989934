"""C++ kernel tests: every kernel table this CPU supports against the portable reference kernel
on randomized shapes and formats (custom_ops/tests/kernel_tests.cc), natively, and the ARM64
NEON tables under qemu-aarch64."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .cmake_build import ROOT, build, passed_failed, require


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _run_kernel_tests(build_dir: str, *args: str, options=()) -> str:
    """Builds quantx_kernel_tests into `build_dir`, runs it with `args` (720 random cases per
    table), asserts that every check passed and returns its output."""
    out = build(build_dir, "-DQUANTX_BUILD_OPS=OFF", *options, targets=("quantx_kernel_tests",))
    r = subprocess.run(
        [str(out / "custom_ops" / "quantx_kernel_tests"), *args, "--cases", "720"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    passed, failed = passed_failed(r.stdout)
    assert r.returncode == 0 and failed == 0, r.stdout[-3000:]
    assert passed >= 720
    return r.stdout


def test_native_kernel_tables_match_the_reference():
    tested = _run_kernel_tests("build-tests").splitlines()[0]
    assert "ref" in tested


def test_avx_vnni_kernels_match_the_reference():
    """The avx-vnni table (AVX2 code with VEX vpdpbusd). On a CPU with AVX-VNNI the native test
    above covers it; on one with AVX-512 VNNI only (Zen 4) a test build encodes the same
    instruction as EVEX (QUANTX_AVXVNNI_EVEX) and runs the table's code here."""
    flags = _cpu_flags()
    if "avx_vnni" in flags:
        opts, name = (), "build-tests"
    elif {"avx512_vnni", "avx512vl", "avx2"} <= flags:
        opts, name = ("-DQUANTX_AVXVNNI_EVEX=ON",), "build-tests-vnni-evex"
    else:
        pytest.skip("this CPU has neither AVX-VNNI nor AVX-512 VNNI")
    _run_kernel_tests(name, "--isa", "avx-vnni", options=opts)


def test_neon_kernels_under_qemu():
    require("aarch64-linux-gnu-g++")
    require("qemu-aarch64")
    script = ROOT / "custom_ops" / "tests" / "run_neon_tests.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
    # one summary per CPU model ('-cpu max: N passed, M failed'); the later run that checks
    # neon-dotprod is refused on a CPU without it prints its own '0 passed, 1 failed'.
    summaries = [ln for ln in r.stdout.splitlines() if ln.startswith("-cpu ") and "passed," in ln]
    assert len(summaries) == 2, r.stdout[-2000:]
    for line in summaries:
        passed, failed = passed_failed(line)
        assert passed > 0 and failed == 0, line
    assert "neon-dotprod reported unsupported (ok)" in r.stdout, r.stdout[-2000:]
