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

from . import model_io, vlm
from .allocate import BudgetError
from .calibration.encoders import default_spec as encoder_spec
from .calibration.encoders import encoder_defaults, encoder_feeds, is_encoder
from .calibration.feeds import batches, decoder_feeds, token_windows
from .calibration.selfgen import SELF, generate_windows
from .config import E2E_SELF_SAMPLES, SELF_SKIP, QuantConfig
from .errors import InputError, NothingToQuantize
from .format import Layout
from .genai import GenaiReport, write_genai_config
from .passes import LinearMatch, LinearPassReport, WeightKey, quantize_linear_nodes
from .passes.attention_rule import AttentionReport, fuse_attention
from .passes.logits_rule import add_logits_to_keep
from .passes.multi_matmul_rule import fuse_multi_matmuls
from .passes.quantize_linear import DEFAULT_RULES, SpillFile, find_matches, in_memory
from .passes.qx_attention_rule import OP_QX as OP_QX_ATTENTION
from .passes.qx_attention_rule import use_qx_attention
from .recipes import (
    Recipe,
    recipe_for,
    single_recipe_quantizer,
    table_fields,
    with_plan,
    with_recipe_for,
)
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
    config: QuantConfig | None = None  # with every default resolved
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per step
    plan: dict | None = None  # the bit allocation, when a budget was planned
    tuning: dict | None = None  # end-to-end tuning report
    genai: GenaiReport | None = None  # genai_config.json for onnxruntime-genai (export folders)
    portable: dict | None = None  # --portable: what the QuantX nodes became (portable.py)
    multi_matmuls: int = 0  # QxMultiMatMul nodes (q/k/v, gate/up fused; multi_matmul_rule.py)

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
            "phases": self.phases,
            "bits_per_weight": self.bits_per_weight,
            "quantized_parameters": self.quantized_weights,
            "calibration": self.calibration,
            "plan": self.plan,
            "end_to_end": self.tuning,
            "portable": self.portable,
            "attention_fused_layers": self.attention.fused,
            "attention_op": self.attention.op if self.attention.fused else None,
            "multi_matmul_nodes": self.multi_matmuls,
            "genai": self.genai.to_json() if self.genai else None,
            "skipped": [dataclasses.asdict(n) for n in self.linear.skipped],
            "no_constant_weight": self.linear.untouched,  # op -> count (activation x activation)
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


def default_calibration(model: ir.Model, folder: Path, config: QuantConfig) -> str | None:
    """What a run calibrates on when the user gave nothing: a decoder export with a KV cache
    and a tokenizer generates its own text (``self``) below 8 bits; an encoder (image model,
    text encoder with a tokenizer) calibrates on synthetic inputs (:mod:`.calibration.encoders`);
    anything else stays data-free."""
    if config.calib or config.data_free or config.bits >= 8:  # 8 bits: RTN is near lossless
        return config.calib
    names = {v.name for v in model.graph.inputs}
    decoder = "input_ids" in names and any(n.startswith("past_key_values.") for n in names)
    if decoder:
        return SELF if (folder / "tokenizer.json").is_file() else None
    return encoder_spec(model, folder)


def e2e_extra_text(model: ir.Model, folder: Path, config: QuantConfig) -> str | None:
    """What the end-to-end step tunes on besides the calibration text: ``--e2e-text``, or by
    default the model's own text when a decoder with a tokenizer calibrates on given text.
    Tuned on Wikipedia alone, the step removes 31% of the Wikipedia excess perplexity and 22%
    of Lee's; with 64 / 128 / 256 windows of own text beside it, SmolLM2 ends 0.2 / 0.4 / 1.0%
    lower on Wikipedia and 1.4 / 2.6 / 3.0% on Lee (docs/ACCURACY.md)."""
    if config.e2e_text is not None:
        return None if config.e2e_text.lower() == "none" else config.e2e_text
    sources = (config.calib or "").split("+")
    if not config.calib or config.calib == "<feeds>" or SELF in sources:
        return None
    own = default_calibration(model, folder, dataclasses.replace(config, calib=None))
    return SELF if own == SELF else None  # decoders only: an encoder's default is synthetic


def _e2e_feeds(model, source, config: QuantConfig, spec: str, progress) -> list[dict]:
    """Batches of ``spec`` at its own default window length: ``--e2e-samples`` windows, else
    E2E_SELF_SAMPLES for own text and the source's default number for given text."""
    samples = config.e2e_samples
    if samples is None and spec == SELF:
        samples = E2E_SELF_SAMPLES
    cfg = dataclasses.replace(config, calib=spec, calib_samples=samples, calib_seq_len=None)
    return calibration_feeds(model, source, cfg, progress=progress)


def calibration_feeds(
    model: ir.Model,
    source: model_io.ModelSource,
    config: QuantConfig,
    feeds: Iterable[dict] | None = None,
    progress=None,
) -> list[dict]:
    """Calibration batches: given feeds, self-generated windows, or windows of the configured
    text / token file; ``A+B`` mixes sources (e.g. ``gensim:wiki-calib+self``)."""
    if feeds is not None:
        out = [dict(f) for f in feeds]
        if not out:
            raise InputError("calibration feeds are empty")
        return out
    folder = source.folder or source.model_path.parent
    if is_encoder(model):
        return encoder_feeds(model, folder, config.calib, config)
    names = [v.name for v in model.graph.inputs]
    if "input_ids" not in names:
        raise InputError("--calib-text needs a decoder export with input_ids; pass feeds instead")
    # "A+B": a mix, the samples split evenly, rows interleaved so every batch holds each source
    sources = config.calib.split("+")
    samples = config.samples_for(config.calib)
    seq_len = config.seq_len_for(config.calib)
    shares = [len(range(i, samples, len(sources))) for i in range(len(sources))]
    parts = []
    for spec, samples in zip(sources, shares):
        if samples == 0:
            continue
        if spec == SELF:
            parts.append(
                generate_windows(
                    source.model_path,
                    samples,
                    seq_len,
                    seed=config.seed,
                    skip=SELF_SKIP,
                    threads=config.threads,
                    progress=_bar(progress, "generating calibration text"),
                )
            )
        else:
            parts.append(token_windows(spec, folder, samples, seq_len, config.seed))
    seq = min(p.shape[1] for p in parts)
    order = sorted(
        ((row, i) for i, p in enumerate(parts) for row in range(len(p))), key=lambda t: t[0]
    )
    windows = np.stack([parts[i][row, :seq] for row, i in order])
    past = _decoder_past_shapes(model)
    return [decoder_feeds(names, past, b) for b in batches(windows, config.batch_windows(seq))]


SENSITIVITY_TOKENS = 8192  # calibration tokens the Fisher pass reads (4096: +0.7% perplexity)


def _first_batches(feeds: list[dict], limit: int, count) -> list[dict]:
    """The first calibration batches (whole ones) until ``count(batch inputs)`` sums to
    ``limit``; a batch without token ids or embeddings counts as the whole limit."""
    taken, seen = [], 0
    for f in feeds:
        if seen >= limit:
            break
        taken.append(f)
        ids = f.get("input_ids", f.get("inputs_embeds"))  # a VLM's decoder takes embeddings
        seen += count(ids) if ids is not None else limit
    return taken


def _sensitivity_feeds(feeds: list[dict]) -> list[dict]:
    """The first calibration batches, up to SENSITIVITY_TOKENS tokens (whole batches)."""
    return _first_batches(feeds, SENSITIVITY_TOKENS, lambda ids: ids.shape[0] * ids.shape[1])


def _first_windows(feeds: list[dict], windows: int | None) -> list[dict]:
    """The first calibration batches, up to ``windows`` windows (whole batches; None: all)."""
    return feeds if windows is None else _first_batches(feeds, windows, len)


def _kept(shared: dict | None, key: str, make):
    """``shared[key]``, made by ``make()`` the first time. ``shared``: a dict the caller keeps
    across runs of one model and calibration source (a sweep of budgets); None: made each
    call."""
    if shared is None:
        return make()
    if key not in shared:
        shared[key] = make()
    return shared[key]


def _plan(
    ir_model, matches, tables, feeds, config, recipe, overrides, layout, progress, shared=None
):
    """Measure sensitivity on the float model, then allocate bits under the budget.
    ``shared`` (a dict kept by the caller across runs of one model and calibration, e.g. a
    sweep of budgets) caches the sensitivity and every candidate's price."""
    from .calibration.sensitivity import measure
    from .passes.rule import weight_array
    from .plan import make_plan

    by_key: dict[WeightKey, list[LinearMatch]] = {}
    for m in matches:
        by_key.setdefault(m.key, []).append(m)

    def sensitivity():
        try:
            return measure(
                ir_model,
                matches,
                _sensitivity_feeds(feeds),
                device=config.device,
                progress=_bar(progress, "measuring sensitivity"),
            )
        except ValueError as e:
            raise InputError(f"bit allocation: {e} (use --uniform)") from e

    sens = _kept(shared, "sensitivity", sensitivity)
    weights = {k: weight_array(ms[0].weight, k) for k, ms in by_key.items()}
    base, pinned = {}, set()
    user = config.user_overrides(overrides)
    for k, ms in by_key.items():
        names = [k.initializer, *(m.name for m in ms)]
        base[k] = recipe_for(recipe, overrides, names)
        if recipe_for(recipe, user, names) != recipe:
            pinned.add(k)
    quantized = {k.initializer for k in by_key}
    # what the file holds besides packed weights: the other tensors, and per node and per
    # packed tensor its protobuf framing (names, shapes, attributes: ~250 B per node measured)
    other = sum(
        v.const_value.nbytes
        for name, v in ir_model.graph.initializers.items()
        if name not in quantized and v.const_value is not None
    )
    other += 250 * sum(1 for _ in ir_model.graph) + 400 * len(by_key)
    # end-to-end tuning adds an fp16 input scale (K values) to every quantized weight
    shapes = [w.shape for w in weights.values()]
    reserved = _input_scale_bytes(shapes) if _tunes_input_channels(shapes, config) else 0
    table_recipes = {
        k: dataclasses.replace(recipe, **fields)
        for k, fields in table_fields(config, tables, matches).items()
    }
    try:
        if not config.plan_search:  # the default run's plan, as before
            return make_plan(
                weights,
                base,
                pinned,
                table_recipes,
                sens,
                layout,
                budget_bpw=config.budget_bpw,
                budget_mb=config.budget_mb,
                other_bytes=other,
                reserved_bytes=reserved,
                progress=_bar(progress, "pricing recipes"),
            )
        return _searched_plan(
            weights, base, pinned, table_recipes, sens, layout, by_key, config, other, reserved,
            progress, shared,
        )  # fmt: skip
    except BudgetError as e:
        raise InputError(
            f"bit allocation: {e}; give a larger --budget-bpw/--budget-mb or a smaller --speedup"
        ) from e


def _searched_plan(
    weights, base, pinned, tables, sens, layout, by_key, config, other, reserved, progress, shared
):
    """An explicit budget's plan: the wider search, priced in bytes, loss and decode time
    (the target's cost model), --budget-bpw counted over the whole file."""
    from .bench.target_cost import load_cost_model
    from .plan import plan_from_candidates, price_candidates, weight_budget

    cost_model = load_cost_model(config.target, config.threads or 2)
    matmul_keys = {k for k, ms in by_key.items() if any(m.rule != "gather" for m in ms)}
    prices = None if shared is None else shared.setdefault("prices", {})
    candidates = price_candidates(
        weights,
        base,
        pinned,
        tables,
        sens,
        layout,
        search=True,
        cost_model=cost_model,
        matmul_keys=matmul_keys,
        prices=prices,
        progress=_bar(progress, "pricing recipes"),
    )
    if config.budget_bpw is None and config.budget_mb is None:
        budget = -1  # --speedup alone: no byte bound
    else:
        budget = weight_budget(
            weights,
            budget_bpw=config.budget_bpw,
            budget_mb=config.budget_mb,
            other_bytes=other,
            reserved_bytes=reserved,
            file_bpw=True,
        )
    fp32_ns = sum(
        weights[k].shape[0] * weights[k].shape[1] * cost_model.fp32_decode_ns for k in matmul_keys
    )
    return plan_from_candidates(
        candidates,
        budget,
        speedup=config.speedup,
        fp32_ns=fp32_ns,
        cost_model_name=f"{cost_model.target} ({cost_model.source})",
        names={k: ms[0].weight.name for k, ms in by_key.items()},
    )


INPUT_SCALE_MAX_BPW = 0.05  # end-to-end tuning's input scales, when they cost less than this


def _encoder_plan(*args):
    from .calibration.encoder_plan import plan_for_run

    try:
        return plan_for_run(*args)
    except BudgetError as e:
        raise InputError(f"bit allocation: {e}; give a larger --budget-bpw") from e


def _input_scale_bytes(shapes: list[tuple[int, int]]) -> int:
    return sum(2 * k for k, _ in shapes)  # fp16, K per matrix W[K, N]


def _tunes_input_channels(
    shapes: list[tuple[int, int]], config: QuantConfig, encoder: bool = False
) -> bool:
    """End-to-end tuning fits an input-channel multiplier per matrix where the K fp16 values
    it stores cost under INPUT_SCALE_MAX_BPW bits per weight on average (0.02 on SmolLM2; on a
    tiny model they would eat the budget). Never for encoders: on MiniLM they cost 0.03 bits
    per weight and fitted worse than the column multipliers alone (docs/ACCURACY.md)."""
    if not config.e2e_epochs or encoder:
        return False
    total = sum(k * n for k, n in shapes)
    return 8 * _input_scale_bytes(shapes) <= INPUT_SCALE_MAX_BPW * total


def _refiner(ir_model, config):
    """Block reconstruction of each decoder layer after its GPTQ pass (``--block-steps``)."""
    if not config.block_steps or not config.calibrated:
        return None
    from .calibration.blockwise import refine_stage

    def refine(stage, matches, weights, live, targets):
        return refine_stage(
            ir_model,
            stage,
            matches,
            weights,
            live,
            targets,
            steps=config.block_steps,
            device=config.device,
            seed=config.seed,
        )

    return refine


def _tune(ir_model, cache, matches, feeds, config, progress) -> dict:
    """End-to-end tuning: new scales in ``cache``, new float initializers in the model."""
    from .calibration.e2e import tune_end_to_end

    try:
        tuned, floats, report = tune_end_to_end(
            ir_model,
            cache,
            matches,
            feeds,
            epochs=config.e2e_epochs,
            rounding=config.e2e_rounding,
            span=config.e2e_span,
            input_channels=_tunes_input_channels(
                [(q.fmt.K, q.fmt.N) for q in cache.values()], config, is_encoder(ir_model)
            ),
            device=config.device,
            seed=config.seed,
            progress=_bar(progress, "end-to-end tuning"),
        )
    except ValueError as e:  # an op the torch executor lacks: keep the layer-wise result
        return {"skipped": str(e)}
    cache.update(tuned)
    for name, value in floats.items():
        ir_model.graph.initializers[name].const_value = ir.tensor(value)
    return report.to_json()


def _bar(progress, desc: str):
    """A one-argument progress wrapper for a step (``progress(items, desc)`` given by the
    caller, e.g. tqdm bars in the CLI), or None."""
    return None if progress is None else (lambda items: progress(items, desc))


def optimize(
    model: str | Path,
    output: str | Path | None = None,
    config: QuantConfig | None = None,
    *,
    progress=None,
    calib_feeds: Iterable[dict] | None = None,
    shared: dict | None = None,
) -> OptimizeReport:
    """Quantize every MatMul/Gemm (and embedding Gather) with a constant weight in ``model``
    (a .onnx file or an optimum export folder) and write the result to ``output`` (a .onnx
    path, or a folder for a folder input; by default beside the input, ``model.quantx.onnx``
    or ``<folder>-quantx/``, refused if that exists). With ``config.calib`` (or ``calib_feeds``,
    an iterable of ORT feed dicts) the float model is run over real inputs first and the
    recipe uses what it sees; a decoder export with a tokenizer calibrates on text it
    generates itself unless ``config.data_free``. ``progress(items, desc)`` may wrap each
    long step's iterable (a progress bar). A VLM export folder (with vision_encoder.onnx) has
    each of its graphs quantized with its component's bits (``config.components``) and gives a
    :class:`quantx_onnx.vlm.optimize.VlmReport` (an OptimizeReport per component).
    ``shared``: a dict the caller keeps across runs of one model and calibration source (a
    sweep of budgets): the calibration batches, the sensitivity and the candidates' prices are
    computed once."""
    start = time.perf_counter()
    config = config or QuantConfig()
    if calib_feeds is not None and not config.calib:
        config = dataclasses.replace(config, calib="<feeds>")
    config.validate()
    if vlm.is_vlm_folder(model):  # several graphs, a recipe per component
        if calib_feeds is not None:
            raise InputError(f"{model}: a VLM folder calibrates from --calib-text/--calib-images")
        from .vlm.optimize import optimize_vlm

        return optimize_vlm(model, output, config, progress)
    if config.components:
        raise InputError(f"{model}: --component needs a VLM export folder (with {vlm.VISION})")
    if config.calib_images:  # an image model's photos: its calibration source
        if config.calib:
            raise InputError("give one of --calib-text and --calib-images")
        config = dataclasses.replace(config, calib=config.calib_images, calib_images=None)
    target = resolve_target(config.target)
    level = target.accuracy_level if config.accuracy_level is None else config.accuracy_level
    source = model_io.resolve_input(model)
    if output is None:
        output = model_io.default_output(source)
    out_model = model_io.check_output(source, Path(output))
    in_files = [source.model_path, *model_io.external_data_files(source.model_path)]
    bytes_before = _files_size(in_files)
    ir_model = model_io.load_model(source)
    folder = source.folder or source.model_path.parent
    config = dataclasses.replace(config, calib=default_calibration(ir_model, folder, config))
    config = encoder_defaults(ir_model, config).resolved()
    if config.calibrated:
        from .calibration.device import check_device

        check_device(config.device)
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
        rotate=bool(config.rotate),
    )
    layout = Layout(target.layout)
    scale_dtype = np.float16 if config.scale_dtype == "float16" else np.float32
    overrides = config.parsed_overrides()
    quantizer = single_recipe_quantizer(recipe, layout, scale_dtype, overrides)
    excluded = _exclusion(config)
    accepted, _, _ = find_matches(ir_model.graph, DEFAULT_RULES, excluded)
    matches = [m for _, m in accepted]
    tables = {m.key for m in matches if m.rule == "gather"}
    user = config.user_overrides(overrides)
    for key, fields in table_fields(config, tables, matches).items():  # with tied lm_heads
        quantizer = with_recipe_for({key}, fields, quantizer, user)

    cache: dict[WeightKey, object] = {}
    entries: dict[WeightKey, dict] = {}
    calibration = plan = tuning = None
    phases: dict[str, float] = {}  # seconds per step of the run
    if config.calib:
        clock = time.perf_counter()
        feeds = _kept(
            shared,
            "feeds",
            lambda: calibration_feeds(ir_model, source, config, calib_feeds, progress),
        )
        phases["calibration data"] = time.perf_counter() - clock
        if config.allocating:
            clock = time.perf_counter()
            if is_encoder(ir_model):
                plan = _encoder_plan(
                    ir_model, matches, tables, feeds, config, recipe, overrides, layout, progress
                )
            else:
                plan = _plan(
                    ir_model, matches, tables, feeds, config, recipe, overrides, layout, progress,
                    shared,
                )  # fmt: skip
            quantizer = with_plan(plan.recipes, quantizer)
            phases["sensitivity and bit plan"] = time.perf_counter() - clock
        from .calibration.driver import calibrate_and_quantize

        try:
            result = calibrate_and_quantize(
                ir_model,
                matches,
                feeds,
                quantizer,
                sequential=config.sequential,
                hessian_mode=config.hessian,
                threads=config.threads,
                progress=_bar(progress, "calibrating layers"),
                refine=_refiner(ir_model, config),
                propagation=config.propagation,
            )
        except ValueError as e:
            raise InputError(f"{source.model_path}: {e}") from e
        cache, entries = result.weights, result.info
        phases["layer-wise quantization"] = result.seconds
        calibration = {
            "source": str(config.calib),
            "batches": len(feeds),
            "tokens": result.tokens,
            "seconds": result.seconds,
            "sequential": config.sequential,
        }
        if result.refined:
            calibration["block_reconstruction"] = [dataclasses.asdict(r) for r in result.refined]
        if config.e2e_epochs and config.calibrated:
            clock = time.perf_counter()
            extra_text = e2e_extra_text(ir_model, folder, config)
            extra = []
            if extra_text:  # made once for the runs of a sweep, as the calibration batches
                extra = _kept(
                    shared,
                    "e2e_feeds",
                    lambda: _e2e_feeds(ir_model, source, config, extra_text, progress),
                )
                phases["end-to-end text"] = time.perf_counter() - clock
                clock = time.perf_counter()
            tuned = _first_windows(feeds, config.tuned_windows())
            tuning = _tune(ir_model, cache, matches, tuned + extra, config, progress)
            if "skipped" not in tuning:
                tuning["calibration_batches"] = len(tuned)
                if extra_text:
                    tuning["extra_text"] = {"source": extra_text, "batches": len(extra)}
            phases["end-to-end tuning"] = time.perf_counter() - clock

    def quantize(key: WeightKey, w: np.ndarray, matches: list[LinearMatch]):
        if key in cache:
            return cache[key]
        q, entry = quantizer(key, w, None, [m.name for m in matches])
        entries[key] = entry
        return q

    # Large models (external data) spill packed weights to disk as they are made, so memory
    # stays bounded by one weight rather than by the quantized model.
    spill = portable = None
    fused_matmuls = 0
    if source.uses_external_data:
        out_model.parent.mkdir(parents=True, exist_ok=True)
        spill = SpillFile(out_model.parent / f".{out_model.name}.{os.getpid()}.spill")
    try:
        linear = quantize_linear_nodes(
            ir_model,
            quantize,
            accuracy_level=int(level),
            excluded=excluded,
            progress=None if config.calib else _bar(progress, "quantizing weights"),
            make_tensor=spill or in_memory,
        )
        if not linear.rewritten:
            why = "; ".join(linear.skip_reasons()) or "the graph has no MatMul, Gemm or Gather"
            raise NothingToQuantize(
                f"{source.model_path}: no MatMul/Gemm/Gather with a constant weight to quantize "
                f"({why})"
            )
        # decoders: an optional input that lets generation compute the last position's logits
        add_logits_to_keep(ir_model)
        if config.portable:
            from .portable import to_portable

            portable = dataclasses.asdict(to_portable(ir_model))
        else:  # q/k/v and gate/up: one node each; QuantX's attention kernel
            fused_matmuls = fuse_multi_matmuls(ir_model)
            if config.qx_attention and use_qx_attention(ir_model):
                attention.op = OP_QX_ATTENTION
        with model_io.staged_output(out_model) as stage:
            staged = stage / out_model.name
            model_io.save_model(ir_model, staged, external=source.uses_external_data or None)
            copied = model_io.copy_companions(source, stage)
            genai = None
            if source.folder is not None:  # onnxruntime-genai reads the folder as it is
                genai = write_genai_config(stage, ir_model, out_model.name)
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
        config=config,
        phases=phases,
        plan=plan.to_json() if plan else None,
        tuning=tuning,
        genai=genai,
        portable=portable,
        multi_matmuls=fused_matmuls,
    )
    write_report(config.report, report)
    return report


def write_report(path: str | None, report) -> None:
    """``report.to_json()`` to ``path`` (atomically), when a path is given."""
    if path:
        with model_io.staged_output(Path(path)) as stage:
            (stage / Path(path).name).write_text(json.dumps(report.to_json(), indent=1))
