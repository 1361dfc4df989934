"""`optimize`: load -> (fuse attention) -> calibrate -> choose a recipe per weight -> quantize
-> pack for the target -> rewrite the graph -> save atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from . import model_io
from .calibration.feeds import batches, decoder_feeds, token_windows
from .config import QuantConfig
from .errors import InputError, NothingToQuantize
from .format import Layout
from .passes import LinearMatch, LinearPassReport, WeightKey, quantize_linear_nodes
from .passes.attention_rule import AttentionReport, fuse_attention
from .passes.quantize_linear import DEFAULT_RULES, SpillFile, find_matches, in_memory
from .recipes import Recipe, single_recipe_quantizer, with_recipe_for
from .targets import resolve_target


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
    weights: list[dict] = dataclasses.field(default_factory=list)  # per-weight recipe report
    calibration: dict | None = None

    @property
    def quantized_weights(self) -> int:
        return sum(w.K * w.N for w in self.linear.weights)

    @property
    def bits_per_weight(self) -> float:
        total = self.quantized_weights
        return 8.0 * sum(w.packed_bytes for w in self.linear.weights) / total if total else 0.0

    def to_json(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "target": self.target,
            "layout": self.layout,
            "accuracy_level": self.accuracy_level,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "seconds": self.seconds,
            "bits_per_weight": self.bits_per_weight,
            "quantized_parameters": self.quantized_weights,
            "calibration": self.calibration,
            "attention_fused_layers": self.attention.fused,
            "skipped": [dataclasses.asdict(n) for n in self.linear.skipped],
            "weights": self.weights,
        }


def _files_size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


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


def _decoder_past_shapes(model: ir.Model) -> dict[str, tuple[int, int]]:
    shapes = {}
    for v in model.graph.inputs:
        if (v.name or "").startswith("past_key_values.") and v.shape is not None:
            heads, dim = v.shape[1], v.shape[3]
            if not isinstance(heads, int) or not isinstance(dim, int):
                raise InputError(f"{v.name}: KV-cache input without static head sizes")
            shapes[v.name] = (heads, dim)
    return shapes


def calibration_feeds(
    model: ir.Model, folder: Path, config: QuantConfig, feeds: Iterable[dict] | None = None
) -> list[dict]:
    """Calibration batches: given feeds, or windows of the configured text / token file."""
    if feeds is not None:
        out = [dict(f) for f in feeds]
        if not out:
            raise InputError("calibration feeds are empty")
        return out
    names = [v.name for v in model.graph.inputs]
    if "input_ids" not in names:
        raise InputError("--calib-text needs a decoder export with input_ids; pass feeds instead")
    windows = token_windows(
        config.calib, folder, config.calib_samples, config.calib_seq_len, config.seed
    )
    past = _decoder_past_shapes(model)
    return [decoder_feeds(names, past, b) for b in batches(windows, config.calib_batch)]


def optimize(
    model: str | Path,
    output: str | Path,
    config: QuantConfig | None = None,
    *,
    progress=None,
    calib_feeds: Iterable[dict] | None = None,
) -> OptimizeReport:
    """Quantize every MatMul/Gemm (and embedding Gather) with a constant weight in ``model``
    (a .onnx file or an optimum export folder) and write the result to ``output`` (a .onnx
    path, or a folder for a folder input). With ``config.calib`` (or ``calib_feeds``,
    an iterable of ORT feed dicts) the float model is run over real inputs first and the
    recipe uses what it sees."""
    start = time.perf_counter()
    config = config or QuantConfig()
    if calib_feeds is not None and not config.calib:
        config = dataclasses.replace(config, calib="<feeds>")
    config.validate()
    target = resolve_target(config.target)
    level = target.accuracy_level if config.accuracy_level is None else config.accuracy_level
    source = model_io.resolve_input(model)
    out_model = model_io.check_output(source, Path(output))
    in_files = [source.model_path, *model_io.external_data_files(source.model_path)]
    bytes_before = _files_size(in_files)
    ir_model = model_io.load_model(source)
    folder = source.folder or source.model_path.parent
    attention = AttentionReport()
    if config.fuse_attention:
        attention = fuse_attention(ir_model, folder)

    recipe = Recipe(
        config.bits,
        config.group_size,
        config.resolved_method,
        config.symmetric,
        config.scale_bits,
        config.super_group,
    )
    scale_dtype = np.float16 if config.scale_dtype == "float16" else np.float32
    quantizer = single_recipe_quantizer(
        recipe, Layout(target.layout), scale_dtype, config.parsed_overrides()
    )
    excluded = _exclusion(config)
    accepted, _, _ = find_matches(ir_model.graph, DEFAULT_RULES, excluded)
    if config.embedding_bits != 0:  # tables read by a Gather (with their tied lm_head)
        tables = {m.key for _, m in accepted if m.rule == "gather"}
        quantizer = with_recipe_for(tables, config.embedding_fields(), quantizer)

    cache: dict[WeightKey, object] = {}
    entries: dict[WeightKey, dict] = {}
    calibration = None
    if config.calib:
        feeds = calibration_feeds(ir_model, folder, config, calib_feeds)
        from .calibration.driver import calibrate_and_quantize

        try:
            result = calibrate_and_quantize(
                ir_model,
                [m for _, m in accepted],
                feeds,
                quantizer,
                sequential=config.sequential,
                hessian_mode=config.hessian,
                threads=config.threads,
                progress=progress,
            )
        except ValueError as e:
            raise InputError(f"{source.model_path}: {e}") from e
        cache, entries = result.weights, result.info
        calibration = {
            "source": str(config.calib),
            "batches": len(feeds),
            "tokens": result.tokens,
            "seconds": result.seconds,
            "sequential": config.sequential,
        }

    def quantize(key: WeightKey, w: np.ndarray, matches: list[LinearMatch]):
        if key in cache:
            return cache[key]
        q, entry = quantizer(key, w, None, [m.name for m in matches])
        entries[key] = entry
        return q

    # Large models (external data) spill packed weights to disk as they are made, so memory
    # stays bounded by one weight rather than by the quantized model.
    spill = None
    if source.uses_external_data:
        out_model.parent.mkdir(parents=True, exist_ok=True)
        spill = SpillFile(out_model.parent / f".{out_model.name}.{os.getpid()}.spill")
    try:
        linear = quantize_linear_nodes(
            ir_model,
            quantize,
            accuracy_level=int(level),
            excluded=excluded,
            progress=None if config.calib else progress,
            make_tensor=spill or in_memory,
        )
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
            model_files = [f for f in stage.iterdir() if f.name.startswith(out_model.name)]
            bytes_after = _files_size(model_files)
    except ValueError as e:  # NaN/Inf weights, format violations
        raise InputError(f"{source.model_path}: {e}") from e
    finally:
        if spill is not None:
            spill.close()

    report = OptimizeReport(
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
        weights=[entries[k] for k in entries],
        calibration=calibration,
    )
    if config.report:
        with model_io.staged_output(Path(config.report)) as stage:
            (stage / Path(config.report).name).write_text(json.dumps(report.to_json(), indent=1))
    return report
