"""QuantX-ONNX: 3-bit (also 2/4/8-bit) weight-only quantization for ONNX Runtime.

Public API:
    optimize(model, output, config)  rewrite a model's weights into QuantX nodes
    QuantConfig                      what to quantize and how
    session_options()                onnxruntime.SessionOptions with the QuantX ops registered
    library_path()                   the custom-op library, for C/C++ hosts
"""

from .config import QuantConfig
from .errors import InputError, NothingToQuantize, OutputError, QuantXError
from .pipeline import OptimizeReport, optimize
from .runtime import kernel_name, library_path, session_options

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "NothingToQuantize",
    "OptimizeReport",
    "OutputError",
    "QuantConfig",
    "QuantXError",
    "kernel_name",
    "library_path",
    "optimize",
    "session_options",
]
