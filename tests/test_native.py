"""C/C++ consumers of the custom ops: `cmake --install` + find_package(quantx_ops), the example
program examples/cpp (the shared library loaded by ONNX Runtime, and the static registration
entry linked in), natively and cross-built for ARM64 under qemu-aarch64 on the aarch64
onnxruntime from PyPI. Every run is compared with the Python onnxruntime run of the same model
on the same inputs."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import quantx_onnx as qx

from .cmake_build import ROOT, build, in_ci, require
from .helpers import llm_feeds, quantx_session

SYSROOT = "/usr/aarch64-linux-gnu"
TOOLCHAIN = ROOT / "custom_ops" / "cmake" / "aarch64-toolchain.cmake"
CACHE = Path(os.environ.get("QUANTX_CACHE", Path.home() / ".cache" / "quantx_onnx"))
ORT_TYPES = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}
# accuracy_level 0 keeps activations in float on every ISA: C++ and Python runs, x86 and ARM64,
# differ only by float summation order.
TOL = dict(rtol=1e-4, atol=1e-4)


def write_qxt(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The example's tensor file (examples/cpp/quantx_run.cc)."""
    codes = {np.dtype(v): k for k, v in ORT_TYPES.items()}
    with open(path, "wb") as f:
        f.write(b"QXT1" + struct.pack("<I", len(tensors)))
        for name, a in tensors.items():
            a = np.ascontiguousarray(a)
            f.write(struct.pack("<I", len(name)) + name.encode())
            f.write(struct.pack("<iI", codes[a.dtype], a.ndim))
            f.write(struct.pack(f"<{a.ndim}q", *a.shape) + a.tobytes())


def read_qxt(path: Path) -> dict[str, np.ndarray]:
    data = Path(path).read_bytes()
    assert data[:4] == b"QXT1", data[:16]
    (count,), pos = struct.unpack_from("<I", data, 4), 8
    out = {}
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, pos)
        name = data[pos + 4 : pos + 4 + n].decode()
        pos += 4 + n
        code, rank = struct.unpack_from("<iI", data, pos)
        shape = struct.unpack_from(f"<{rank}q", data, pos + 8)
        pos += 8 + 8 * rank
        dtype = np.dtype(ORT_TYPES[code])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = np.frombuffer(data[pos : pos + size], dtype).reshape(shape)
        pos += size
    assert pos == len(data)
    return out


@pytest.fixture(scope="module")
def case(tiny_llama, tmp_path_factory):
    """The tiny Llama at 3 bits (data-free, float activations), its prefill feeds as a tensor
    file, and the Python onnxruntime outputs."""
    tmp = tmp_path_factory.mktemp("native")
    qx.optimize(tiny_llama, tmp / "q3", qx.QuantConfig(data_free=True, bits=3, accuracy_level=0))
    model = tmp / "q3" / "model.onnx"
    sess = quantx_session(model)
    ops = {(n.domain, n.op_type) for n in onnx.load(str(model)).graph.node}
    # the ARM64 run needs the aarch64 onnxruntime's contrib ops too
    assert {("com.quantx", "QxMatMul"), ("com.quantx", "QxGroupQueryAttention")} <= ops, ops
    feeds = llm_feeds(sess, seq=7)
    write_qxt(tmp / "inputs.qxt", feeds)
    names = [o.name for o in sess.get_outputs()]
    expected = dict(zip(names, sess.run(None, feeds)))
    return model, tmp / "inputs.qxt", expected, tmp


def cmake(*args: str, timeout: int = 1200) -> None:
    r = subprocess.run(["cmake", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"cmake {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def cache_value(build_dir: Path, key: str) -> str:
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split("=", 1)[1]
    raise AssertionError(f"{key} not in {build_dir}/CMakeCache.txt")


def install_quantx(name: str, *options: str) -> tuple[Path, str]:
    """Builds the library tree into ROOT/name, installs it into ROOT/name/prefix; returns the
    prefix and the ONNX Runtime header folder the build used."""
    out = build(name, "-DQUANTX_BUILD_TESTS=OFF", *options)
    prefix = out / "prefix"
    cmake("--install", str(out), "--prefix", str(prefix))
    for rel in (
        "include/quantx/quantx_ops.h",
        "lib/cmake/quantx_ops/quantx_opsConfig.cmake",
        "lib/libquantx_ops.so",
        "lib/libquantx_ops_static.a",
    ):
        assert (prefix / rel).is_file(), rel
    return prefix, cache_value(out, "ONNXRUNTIME_INCLUDE_DIR")


def ort_lib_dir(lib: Path, dest: Path) -> Path:
    """A folder with libonnxruntime.so and .so.1 pointing at the wheel's versioned library
    (the wheel ships only libonnxruntime.so.X.Y.Z)."""
    dest.mkdir(parents=True, exist_ok=True)
    for link in ("libonnxruntime.so", "libonnxruntime.so.1"):
        if not (dest / link).exists():
            (dest / link).symlink_to(lib)
    return dest


def build_example(name: str, prefix: Path, headers: str, ort_dir: Path, static: bool, *opts):
    out = ROOT / name
    fresh = not (out / "CMakeCache.txt").exists()
    gen = ["-G", "Ninja"] if fresh and shutil.which("ninja") else []
    cmake(
        "-S", str(ROOT / "examples" / "cpp"), "-B", str(out), *gen,
        "-DCMAKE_BUILD_TYPE=Release",
        f"-Dquantx_ops_DIR={prefix / 'lib' / 'cmake' / 'quantx_ops'}",
        f"-DONNXRUNTIME_INCLUDE_DIR={headers}",
        f"-DONNXRUNTIME_LIBRARY={ort_dir / 'libonnxruntime.so'}",
        f"-DQUANTX_STATIC={'ON' if static else 'OFF'}",
        *opts,
    )  # fmt: skip
    cmake("--build", str(out), "-j2")
    return out / "quantx_run"


def run_example(cmd: list[str], case, env: dict, timeout: int = 900) -> tuple[dict, str]:
    model, inputs, _, tmp = case
    outputs = tmp / f"out-{abs(hash(tuple(cmd)))}.qxt"
    r = subprocess.run(
        [*cmd, str(model), str(inputs), str(outputs)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return read_qxt(outputs), r.stdout


def assert_matches(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name], ref, err_msg=name, **TOL)
    assert np.abs(expected["logits"]).max() > 1e-2  # not an all-zero model


def test_installed_package_and_example_match_python(case):
    """cmake --install layout + find_package; both registration modes give Python's outputs."""
    prefix, headers = install_quantx("build-native")
    capi = Path(ort.__file__).parent / "capi"
    ort_dir = ort_lib_dir(
        capi / f"libonnxruntime.so.{ort.__version__}", ROOT / "build-native" / "ort"
    )
    env = {"LD_LIBRARY_PATH": str(ort_dir)}
    expected = case[2]

    exe = build_example("build-native/example", prefix, headers, ort_dir, static=False)
    got, stdout = run_example([str(exe)], case, env)
    assert f"loaded {prefix / 'lib' / 'libquantx_ops.so'}" in stdout, stdout
    assert_matches(got, expected)

    exe = build_example("build-native/example-static", prefix, headers, ort_dir, static=True)
    needed = subprocess.run(["readelf", "-d", str(exe)], capture_output=True, text=True).stdout
    assert "quantx" not in needed, needed  # the ops are inside the binary
    got, stdout = run_example([str(exe)], case, env)
    assert f"static registration, kernels {qx.kernel_name()}" in stdout, stdout
    assert_matches(got, expected)


def aarch64_onnxruntime() -> Path:
    """libonnxruntime.so of PyPI's aarch64 onnxruntime wheel, same version as the x86 one,
    downloaded once into ~/.cache/quantx_onnx/ort-aarch64/."""
    version = ort.__version__
    dest = CACHE / "ort-aarch64" / version
    lib = dest / f"libonnxruntime.so.{version}"
    if lib.is_file():
        return lib
    dest.mkdir(parents=True, exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = list(dest.glob("onnxruntime-*aarch64*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux_2_28_aarch64", "--python-version", py,
               f"onnxruntime=={version}", "-d", str(dest)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(dest.glob("onnxruntime-*aarch64*.whl"))
        if r.returncode or not wheels:
            msg = f"no aarch64 onnxruntime {version} wheel from PyPI: {r.stderr[-1500:]}"
            pytest.fail(msg) if in_ci() else pytest.skip(msg)
    with zipfile.ZipFile(wheels[0]) as z:
        (dest / "lib.part").write_bytes(z.read(f"onnxruntime/capi/libonnxruntime.so.{version}"))
    (dest / "lib.part").rename(lib)
    return lib


# /proc/cpuinfo of one Neoverse-N1 core. ONNX Runtime's CPU detection (pytorch/cpuinfo) reads
# /proc/cpuinfo and /sys/devices/system/cpu; under qemu-aarch64 those are the x86 host's, on
# which it dereferences NULL while starting. qemu looks every path up under its -L root first,
# so a root with an ARM cpuinfo and a single CPU in front of the cross sysroot fixes that.
CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""


def qemu_root(dest: Path) -> Path:
    """The cross sysroot's folders (links) + an ARM /proc/cpuinfo + one CPU in /sys."""
    cpu = dest / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    (dest / "proc").mkdir(exist_ok=True)
    (dest / "proc" / "cpuinfo").write_text(CPUINFO)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text("0\n")
    for sub in Path(SYSROOT).iterdir():
        if not (dest / sub.name).is_symlink():
            (dest / sub.name).symlink_to(sub)
    return dest


def test_aarch64_example_under_qemu_matches_x86(case):
    """ARM64 end to end: library + example cross-built, the QuantX tiny Llama run by PyPI's
    aarch64 onnxruntime under qemu (NEON kernels), logits equal to the x86 Python run."""
    require("aarch64-linux-gnu-g++")
    qemu = require("qemu-aarch64")
    lib = aarch64_onnxruntime()
    cross = f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN}"
    prefix, headers = install_quantx("build-native-aarch64", cross)
    ort_dir = ort_lib_dir(lib, ROOT / "build-native-aarch64" / "ort")
    root = qemu_root(ROOT / "build-native-aarch64" / "qemu-root")
    run = [qemu, "-L", str(root), "-E", f"LD_LIBRARY_PATH={ort_dir}"]
    expected = case[2]

    exe = build_example(
        "build-native-aarch64/example-static", prefix, headers, ort_dir, True, cross
    )
    got, stdout = run_example([*run, str(exe)], case, {})
    assert "static registration, kernels neon" in stdout, stdout
    assert_matches(got, expected)

    # the static entry's failures come back as an ORT status (here: no x86 kernels on ARM64)
    model, inputs, _, tmp = case
    r = subprocess.run(
        [*run, "-E", "QUANTX_ISA=avx512", str(exe), str(model), str(inputs), str(tmp / "x.qxt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "kernels 'avx512' are not compiled" in r.stderr, r.stderr

    exe = build_example("build-native-aarch64/example", prefix, headers, ort_dir, False, cross)
    got, stdout = run_example([*run, str(exe)], case, {})
    assert f"loaded {prefix / 'lib' / 'libquantx_ops.so'}" in stdout, stdout
    assert_matches(got, expected)
