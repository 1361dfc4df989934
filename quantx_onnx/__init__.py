"""QuantX-ONNX: 3-bit (also 2/4/8-bit) weight-only quantization for ONNX Runtime.

Public API:
    optimize(model, output, config)  rewrite a model's weights into QuantX nodes
    QuantConfig                      what to quantize and how
    session_options()                onnxruntime.SessionOptions with the QuantX ops registered
    InferenceSession(path)           onnxruntime.InferenceSession with the QuantX ops registered
    make_portable(model, output)     a QuantX model in stock ONNX Runtime operators
    library_path()                   the custom-op library, for C/C++ hosts
"""

import os as _os

# In a source checkout the graph passes live beside this package (passes/); wheels install them
# as quantx_onnx/passes. Let `quantx_onnx.passes` resolve in both (editable installs do the same).
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "passes")) and _os.path.isfile(
    _os.path.join(_here, _os.pardir, "passes", "__init__.py")
):
    __path__.append(_os.path.dirname(_here))

from .config import QuantConfig  # noqa: E402
from .errors import InputError, NothingToQuantize, OutputError, QuantXError  # noqa: E402
from .pipeline import OptimizeReport, optimize  # noqa: E402
from .portable import PortableReport  # noqa: E402
from .portable import convert as make_portable  # noqa: E402
from .runtime import kernel_name, library_path, session_options  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "InferenceSession",
    "InputError",
    "NothingToQuantize",
    "OptimizeReport",
    "OutputError",
    "PortableReport",
    "QuantConfig",
    "QuantXError",
    "kernel_name",
    "library_path",
    "make_portable",
    "optimize",
    "session_options",
]


def __getattr__(name: str):
    # InferenceSession subclasses onnxruntime's: import onnxruntime only when it is used
    if name == "InferenceSession":
        from .session import InferenceSession

        return InferenceSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
