"""The kernels and the ORT op library built with AddressSanitizer + UndefinedBehaviorSanitizer:
the C++ kernel tests, and the Python op tests, concurrency test and fuzzer running through the
sanitized library inside ONNX Runtime. Any sanitizer report fails (halt_on_error)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .cmake_build import ROOT, build, passed_failed, require

SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}


@pytest.fixture(scope="module")
def asan_build():
    require("gcc")
    return build(
        "build-asan", "-DQUANTX_SANITIZE=ON", targets=("quantx_kernel_tests", "quantx_ops")
    )


def test_kernel_tests_under_sanitizers(asan_build):
    r = subprocess.run(
        [str(asan_build / "custom_ops" / "quantx_kernel_tests"), "--cases", "300"],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, **SAN_ENV},
    )
    assert "Sanitizer" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0 and passed_failed(r.stdout)[1] == 0, r.stdout[-3000:]


def _preload() -> str:
    """The ASan runtime (and libstdc++, so ASan's __cxa_throw interceptor resolves) for a
    non-instrumented python that loads an instrumented library."""
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run(
            ["gcc", f"-print-file-name={name}"], capture_output=True, text=True
        ).stdout.strip()
        if not os.path.isabs(path):
            pytest.skip(f"{name} not found")
        libs.append(path)
    return " ".join(libs)


def test_python_suites_through_the_sanitized_library(asan_build):
    env = {
        **os.environ,
        **SAN_ENV,
        "LD_PRELOAD": _preload(),
        "QUANTX_OPS_LIBRARY": str(asan_build / "custom_ops" / "libquantx_ops.so"),
    }
    tests = ["tests/test_op.py", "tests/test_concurrency.py::test_one_session_from_eight_threads"]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2400,
        env=env,
    )
    assert r.returncode == 0 and "Sanitizer" not in r.stdout + r.stderr, (
        r.stdout[-3000:] + r.stderr[-3000:]
    )
    r = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_op", "--cases", "400", "--seed", "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2400,
        env=env,
    )
    assert r.returncode == 0 and "Sanitizer" not in r.stderr, r.stderr[-3000:]
    assert r.stdout.startswith("fuzz:"), r.stdout
