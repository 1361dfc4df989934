"""The op fuzzer (tests/fuzz_op.py) in a child process, so that a crash fails the test instead
of killing pytest."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .cmake_build import ROOT


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzz_op_never_crashes(seed):
    r = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_op", "--cases", "500", "--seed", str(seed)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    valid, rejected = (int(r.stdout.split()[1]), int(r.stdout.split()[4]))
    assert valid > 100 and rejected > 100, r.stdout
