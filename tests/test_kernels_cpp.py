"""C++ kernel tests: every kernel table this CPU supports against the portable reference kernel
on randomized shapes and formats (custom_ops/tests/kernel_tests.cc), natively, and the ARM64
NEON tables under qemu-aarch64."""

from __future__ import annotations

import subprocess

from .cmake_build import ROOT, build, passed_failed, require


def test_native_kernel_tables_match_the_reference():
    out = build("build-tests", "-DQUANTX_BUILD_OPS=OFF", targets=("quantx_kernel_tests",))
    r = subprocess.run(
        [str(out / "custom_ops" / "quantx_kernel_tests"), "--cases", "600"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    passed, failed = passed_failed(r.stdout)
    assert r.returncode == 0 and failed == 0, r.stdout[-3000:]
    assert passed >= 600
    tested = r.stdout.splitlines()[0]
    assert "ref" in tested


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
