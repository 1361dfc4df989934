"""`optimize`: load -> choose a recipe per weight -> quantize -> pack for the target ->
rewrite the graph -> save atomically."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from . import model_io
from .config import QuantConfig
from .errors import InputError, NothingToQuantize
from .format import Layout, QuantizedWeight, WeightFormat
from .passes import LinearMatch, LinearPassReport, WeightKey, quantize_linear_nodes
from .passes.attention_rule import AttentionReport, fuse_attention
from .quantize.grid import check_finite
from .quantize.rtn import quantize_rtn
from .targets import Target, resolve_target


@dataclasses.dataclass
class OptimizeReport:
    input: str
    output: str
    target: str
    layout: str
    accuracy_level: int
    bytes_before: int
    bytes_after: int
    seconds: float
    linear: LinearPassReport
    attention: AttentionReport
    copied: list[str]

    @property
    def quantized_weights(self) -> int:
        return sum(w.K * w.N for w in self.linear.weights)

    @property
    def bits_per_weight(self) -> float:
        total = self.quantized_weights
        return 8.0 * sum(w.packed_bytes for w in self.linear.weights) / total if total else 0.0


def _files_size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def weight_format(config: QuantConfig, target: Target, K: int, N: int) -> WeightFormat:
    return WeightFormat(
        K=K,
        N=N,
        bits=config.bits,
        group_size=config.group_size if config.group_size < K else 0,
        layout=target.layout,
        scale_bits=config.scale_bits,
        super_group=config.super_group if config.scale_bits else 0,
    )


def rtn_quantizer(config: QuantConfig, target: Target):
    """The data-free recipe: round-to-nearest with the configured grid, for every weight."""
    scale_dtype = np.float16 if config.scale_dtype == "float16" else np.float32

    def quantize(key: WeightKey, w: np.ndarray, matches: list[LinearMatch]) -> QuantizedWeight:
        check_finite(w, key.initializer)
        fmt = weight_format(config, target, *w.shape)
        return quantize_rtn(w, fmt, symmetric=config.symmetric, scale_dtype=scale_dtype)

    return quantize


def _exclusion(config: QuantConfig):
    patterns = [re.compile(p) for p in config.exclude]
    if not patterns and config.embeddings:
        return None

    def excluded(match: LinearMatch) -> bool:
        if not config.embeddings and match.rule == "gather":
            return True
        names = (match.name, match.weight.name)
        return any(p.search(n) for p in patterns for n in names)

    return excluded


def optimize(
    model: str | Path,
    output: str | Path,
    config: QuantConfig | None = None,
    *,
    progress=None,
    quantizer=None,
) -> OptimizeReport:
    """Quantize every MatMul/Gemm (and embedding Gather) with a constant weight in ``model``
    (a .onnx file or an optimum export folder) and write the result to ``output`` (a .onnx
    path, or a folder for a folder input)."""
    start = time.perf_counter()
    config = config or QuantConfig()
    config.validate()
    target = resolve_target(config.target)
    level = target.accuracy_level if config.accuracy_level is None else config.accuracy_level
    source = model_io.resolve_input(model)
    out_model = model_io.check_output(source, Path(output))
    in_files = [source.model_path, *model_io.external_data_files(source.model_path)]
    bytes_before = _files_size(in_files)
    ir_model = model_io.load_model(source)
    attention = AttentionReport()
    if config.fuse_attention:
        attention = fuse_attention(ir_model, source.folder or source.model_path.parent)

    quantize = quantizer or rtn_quantizer(config, target)
    try:
        linear = quantize_linear_nodes(
            ir_model,
            quantize,
            accuracy_level=int(level),
            excluded=_exclusion(config),
            progress=progress,
        )
    except ValueError as e:  # NaN/Inf weights, format violations
        raise InputError(f"{source.model_path}: {e}") from e
    if not linear.rewritten:
        why = "; ".join(sorted({f"{n.node}: {n.reason}" for n in linear.skipped})[:5])
        raise NothingToQuantize(
            f"{source.model_path}: no MatMul/Gemm/Gather with a constant weight to quantize"
            + (f" (skipped: {why})" if why else "")
        )

    with model_io.staged_output(out_model) as stage:
        staged = stage / out_model.name
        model_io.save_model(ir_model, staged, external=source.uses_external_data or None)
        copied = model_io.copy_companions(source, stage)
        staged_files = [f for f in stage.iterdir() if f.suffix != ".partial"]
        model_files = [f for f in staged_files if f.name.startswith(out_model.name)]
        bytes_after = _files_size(model_files)

    return OptimizeReport(
        input=str(source.model_path),
        output=str(out_model),
        target=target.name,
        layout=Layout(target.layout).name.lower(),
        accuracy_level=int(level),
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        seconds=time.perf_counter() - start,
        linear=linear,
        attention=attention,
        copied=copied,
    )
