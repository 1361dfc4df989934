"""Builds of the C++ tree for the tests that run C++ programs (kernel tests, sanitizers, NEON
under qemu). Build folders live at the repository root (build-tests, build-asan, ...) so that
re-runs are incremental."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(tool: str) -> str:
    """Path of `tool`; skips the test outside CI when it is missing, fails in CI."""
    path = shutil.which(tool)
    if path:
        return path
    if in_ci():
        pytest.fail(f"{tool} is required in CI (scripts/setup.sh --test installs it)")
    pytest.skip(f"{tool} not installed")


def ort_headers() -> str | None:
    """ONNX Runtime headers already fetched by an earlier build, to avoid fetching again."""
    if os.environ.get("ONNXRUNTIME_INCLUDE_DIR"):
        return os.environ["ONNXRUNTIME_INCLUDE_DIR"]
    hits = glob.glob(str(ROOT / "build*" / "**" / "onnxruntime_cxx_api.h"), recursive=True)
    return str(Path(hits[0]).parent) if hits else None


def build(name: str, *options: str, targets=("all",), timeout=1800) -> Path:
    """Configure and build the repository's CMake tree into ROOT/name."""
    require("cmake")
    out = ROOT / name
    cmd = ["cmake", "-S", str(ROOT), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", *options]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"] if not (out / "CMakeCache.txt").exists() else []
    headers = ort_headers()
    if headers and not any(o.startswith("-DQUANTX_BUILD_OPS=OFF") for o in options):
        cmd.append(f"-DONNXRUNTIME_INCLUDE_DIR={headers}")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    for target in targets:
        r = subprocess.run(
            ["cmake", "--build", str(out), "-j2", "--target", target],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode:
            raise AssertionError(f"build of {name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return out


def passed_failed(output: str) -> tuple[int, int]:
    """The last 'N passed, M failed' summary in the output (a line may carry a prefix, as
    run_neon_tests.sh's '-cpu max: N passed, M failed')."""
    for line in reversed(output.strip().splitlines()):
        found = re.search(r"(\d+) passed, (\d+) failed$", line.strip())
        if found:
            return int(found.group(1)), int(found.group(2))
    raise AssertionError(f"no 'N passed, M failed' line in:\n{output[-2000:]}")
