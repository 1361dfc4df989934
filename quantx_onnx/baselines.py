"""ONNX Runtime's own weight-only quantization (MatMulNBits), the baseline QuantX is compared
with: same export, quantized by onnxruntime.quantization's MatMulNBitsQuantizer."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from .errors import InputError
from .model_io import copy_companions, resolve_input, staged_output


def ort_matmulnbits(
    src: str | Path,
    out: str | Path,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    accuracy_level: int = 4,
) -> Path:
    """Quantize every MatMul with a constant weight to ORT's MatMulNBits (asymmetric RTN by
    default, like the RTN 4-bit reference). As ORT's quantizer does, a weight read through a
    Transpose (the tied lm_head) stays float. Returns the output model path."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    source = resolve_input(src)
    out = Path(out)
    model = onnx.load(str(source.model_path))
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=bits
    )
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    try:
        quant = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            algo_config=config,
        )
        quant.process()
    except Exception as e:
        raise InputError(f"{source.model_path}: ONNX Runtime's quantizer failed ({e})") from e
    target = out / source.model_path.name
    with staged_output(target) as stage:
        quant.model.save_model_to_file(str(stage / target.name), use_external_data_format=False)
        copy_companions(source, stage)
        for f in (source.folder or source.model_path.parent).glob("*.jinja"):
            if not (stage / f.name).exists():
                shutil.copy2(f, stage / f.name)
    return target
