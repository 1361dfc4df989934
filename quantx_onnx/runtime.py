"""Locating and registering the custom-op library in ONNX Runtime."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from .errors import QuantXError

_LIB_NAME = "libquantx_ops.so"
_REGISTERED = "quantx.ops_registered"


def library_path() -> str:
    """Absolute path of the QuantX custom-op shared library (for C/C++ hosts:
    ``Ort::SessionOptions::RegisterCustomOpsLibrary``). ``QUANTX_OPS_LIBRARY`` overrides it."""
    override = os.environ.get("QUANTX_OPS_LIBRARY")
    if override:
        if not Path(override).is_file():
            raise QuantXError(f"QUANTX_OPS_LIBRARY={override}: no such file")
        return str(Path(override).resolve())
    # The package's own folder; editable installs list the build's install folder too.
    from . import __path__ as package_dirs

    candidates = [Path(folder) / "lib" / _LIB_NAME for folder in package_dirs]
    # a source checkout imported ahead of the installed package: the installed library
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        candidates.append(
            Path(distribution("quantx-onnx").locate_file(f"quantx_onnx/lib/{_LIB_NAME}"))
        )
    except PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return str(path.resolve())
    raise QuantXError(
        f"QuantX custom-op library {_LIB_NAME} not found in {list(package_dirs)}; reinstall the "
        "package (pip install .) so that CMake builds it"
    )


def session_options(options=None, threads: int | None = None):
    """``onnxruntime.SessionOptions`` with the QuantX ops registered (``options`` is updated
    in place when given). ``threads`` sets the intra-op thread count."""
    import onnxruntime as ort

    so = options if options is not None else ort.SessionOptions()
    # registering twice in one SessionOptions fails ("Domain already set"): remember it there
    try:
        registered = so.get_session_config_entry(_REGISTERED) == "1"
    except RuntimeError:  # no such entry yet
        registered = False
    if not registered:
        so.register_custom_ops_library(library_path())
        so.add_session_config_entry(_REGISTERED, "1")
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


@functools.lru_cache(maxsize=1)
def _lib():
    return ctypes.CDLL(library_path())


def kernel_name() -> str:
    """Kernel set this process runs (ref, avx2, avx-vnni, avx512, neon, neon-dotprod)."""
    fn = _lib().QuantxKernelName
    fn.restype = ctypes.c_char_p
    return fn().decode()
