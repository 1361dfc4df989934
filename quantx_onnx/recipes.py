"""Recipes: how one weight matrix is quantized (grid, group, scale format, algorithm), and the
quantizers the pipeline calls per weight, with or without calibration statistics.

Every quantizer returns the weight and a report entry: recipe, bits per weight, and (with
calibration) the relative error of the layer output over the calibration tokens,
tr(dW^T H dW) / tr(W^T H W).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import rotation
from .calibration.stats import InputStats
from .format import Layout, QuantizedWeight, WeightFormat, dequantize, pack, packed_bytes
from .passes import WeightKey
from .quantize.awq import awq_quantize
from .quantize.codebook import quantize_codebook
from .quantize.gptq import output_error, quantize_gptq
from .quantize.grid import check_finite
from .quantize.mse import clip_search
from .quantize.rtn import finish_uniform, quantize_rtn

METHODS = ("rtn", "mse", "gptq", "awq", "codebook", "auto")
DATA_METHODS = ("gptq", "awq", "auto")  # need calibration statistics
AUTO_CANDIDATES = ("gptq", "awq", "codebook")  # what `auto` tries per matrix
ROTATED_METHODS = ("rtn", "mse", "gptq")  # AWQ's and codebooks' searches assume the given basis


@dataclasses.dataclass(frozen=True)
class Recipe:
    bits: int = 3
    group_size: int = 64
    method: str = "rtn"
    symmetric: bool = False
    scale_bits: int = 0
    super_group: int = 8
    # quantize in a rotated input basis where K allows it (rotation.py; GPTQ, MSE and RTN):
    # quantize_with sets the format's ``rotate`` (format() never does: a format with rotate=1
    # holding unrotated codes would be silently wrong); the plan prices rotated candidates
    rotate: bool = False

    def rotates(self, K: int) -> bool:
        return self.rotate and self.method in ROTATED_METHODS and rotation.supported(K)

    def format(self, K: int, N: int, layout: Layout) -> WeightFormat:
        group = self.group_size if 0 < self.group_size < K else 0
        return WeightFormat(
            K,
            N,
            self.bits,
            group,
            layout,
            scale_bits=self.scale_bits,
            super_group=self.super_group if self.scale_bits else 0,
        )

    def describe(self) -> str:
        grid = "sym" if self.symmetric else "asym"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        hier = f" hier{self.scale_bits}x{self.super_group}" if self.scale_bits else ""
        return f"{self.method} {self.bits}-bit {grid} {group}{hier}"


def quantize_with(
    recipe: Recipe,
    w_kn: np.ndarray,
    layout: Layout,
    stats: InputStats | None,
    scale_dtype=np.float16,
    per_row: bool = True,
) -> QuantizedWeight:
    """One matrix W[K, N] with one recipe (`per_row`: a codebook per output column, else one
    per tensor)."""
    K, N = w_kn.shape
    if recipe.rotates(K):
        return _quantize_rotated(recipe, w_kn, layout, stats, scale_dtype)
    fmt = recipe.format(K, N, layout)
    if recipe.method == "rtn" or (recipe.method in DATA_METHODS and stats is None):
        return quantize_rtn(w_kn, fmt, symmetric=recipe.symmetric, scale_dtype=scale_dtype)
    importance = np.diag(stats.hessian) if stats is not None else None

    def grid(w: np.ndarray, imp: np.ndarray | None = importance) -> QuantizedWeight:
        """The uniform grid: importance-weighted clip search (symmetric: plain absmax)."""
        if recipe.symmetric:
            return quantize_rtn(w, fmt, symmetric=True, scale_dtype=scale_dtype)
        w_nk = np.ascontiguousarray(np.asarray(w, np.float32).T)
        scales, lo = clip_search(w_nk, fmt, imp, scale_dtype=scale_dtype)
        return finish_uniform(w_nk, fmt, scales, lo, False, scale_dtype)

    if recipe.method == "mse":
        return grid(w_kn)
    if recipe.method == "gptq":
        return quantize_gptq(w_kn, stats.hessian, fmt, grid(w_kn))
    if recipe.method == "awq":
        # AWQ scaling searched on the (cheap) clip-searched grid, then GPTQ once on the weight
        # scaled by the chosen t: W' = diag(t) W sees inputs x / t, so its Hessian is
        # diag(1/t) H diag(1/t).
        q, _ = awq_quantize(
            w_kn,
            stats.channel_abs_mean,
            stats.hessian,
            lambda w, t: grid(w, importance / np.square(t)),
            scale_dtype=scale_dtype,
        )
        if q.input_scale is None:
            return quantize_gptq(w_kn, stats.hessian, fmt, grid(w_kn))
        inv = q.input_scale.astype(np.float64)
        w_scaled = np.asarray(w_kn, np.float32) / q.input_scale[:, None]
        h_scaled = stats.hessian * inv[:, None] * inv[None, :]
        q_gptq = quantize_gptq(w_scaled, h_scaled, fmt, grid(w_scaled, np.diag(h_scaled)))
        return dataclasses.replace(q_gptq, input_scale=q.input_scale)
    if recipe.method == "codebook":
        # the importance-weighted Lloyd grid, then (calibrated) GPTQ's error feedback on it
        cb = quantize_codebook(w_kn, fmt, importance, per_row=per_row, scale_dtype=scale_dtype)
        return cb if stats is None else quantize_gptq(w_kn, stats.hessian, fmt, cb)
    raise ValueError(f"unknown method {recipe.method!r}")


@dataclasses.dataclass
class _RotatedStats:
    """The statistics a rotated quantization reads: the Hessian in the rotated basis."""

    hessian: np.ndarray
    tokens: int


def _quantize_rotated(recipe, w_kn, layout, stats, scale_dtype) -> QuantizedWeight:
    """The recipe applied to W' = Q^T W (with Q^T H Q), stored with ``rotate`` set: the same
    problem in a basis where no input channel stands out (rotation.py)."""
    w_rot = rotation.rotate_weight(w_kn).astype(np.float32)
    rot_stats = None
    if stats is not None:
        hessian = rotation.rotate_hessian(stats.hessian)
        rot_stats = _RotatedStats(hessian, stats.tokens)
    plain = dataclasses.replace(recipe, rotate=False)
    q = quantize_with(plain, w_rot, layout, rot_stats, scale_dtype)
    return dataclasses.replace(q, fmt=dataclasses.replace(q.fmt, rotate=1))


def quantize_auto(
    recipe: Recipe, w_kn: np.ndarray, layout: Layout, stats: InputStats, scale_dtype=np.float16
) -> tuple[QuantizedWeight, Recipe, float]:
    """Every candidate algorithm at the recipe's grid; keep the lowest layer output error.
    The codebook candidate is one per tensor: a codebook per output column costs
    16 * 2^bits / K more bits per weight, which would break the bits budget of small K."""
    best = None
    for method in AUTO_CANDIDATES:
        if method == "codebook" and (recipe.symmetric or recipe.scale_bits):
            continue
        candidate = dataclasses.replace(recipe, method=method)
        q = quantize_with(candidate, w_kn, layout, stats, scale_dtype, per_row=False)
        err = output_error(w_kn, dequantize(q), stats.hessian)
        if best is None or err < best[2]:
            best = (q, candidate, err)
    return best


def report_entry(
    recipe: Recipe, key: WeightKey, w_kn: np.ndarray, q: QuantizedWeight, stats: InputStats | None
) -> dict:
    entry = {
        "weight": key.initializer + (" (transposed)" if key.transposed else ""),
        "K": q.fmt.K,
        "N": q.fmt.N,
        "recipe": recipe.describe() + (" rotated" if q.fmt.rotate else ""),
        "bits_per_weight": 8.0 * packed_bytes(pack(q)) / (q.fmt.K * q.fmt.N),
    }
    if stats is not None:
        entry["output_error"] = output_error(w_kn, dequantize(q), stats.hessian)
        entry["calibration_tokens"] = stats.tokens
    return entry


OVERRIDE_FIELDS = {
    "bits": int,
    "group": int,
    "method": str,
    "symmetric": int,
    "scale_bits": int,
    "super_group": int,
}


def parse_override(text: str) -> tuple[str, dict]:
    """'REGEX=bits:4,group:32' -> (REGEX, {"bits": 4, "group_size": 32})."""
    import re

    if "=" not in text:
        raise ValueError(f"--override {text!r}: expected REGEX=field:value[,field:value]")
    pattern, _, spec = text.rpartition("=")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--override {text!r}: invalid regular expression ({e})") from None
    fields = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition(":")
        if name not in OVERRIDE_FIELDS or not value:
            raise ValueError(
                f"--override {text!r}: unknown field {name!r} (choose {', '.join(OVERRIDE_FIELDS)})"
            )
        try:
            v = OVERRIDE_FIELDS[name](value)
        except ValueError:
            raise ValueError(f"--override {text!r}: bad value {value!r} for {name}") from None
        fields["group_size" if name == "group" else name] = bool(v) if name == "symmetric" else v
    return pattern, fields


def override_fields(overrides, names: list[str]) -> dict:
    """The fields of every override whose pattern matches one of `names`, later ones winning."""
    import re

    out = {}
    for pattern, fields in overrides:
        if any(re.search(pattern, n) for n in names):
            out.update(fields)
    return out


def recipe_for(base: Recipe, overrides, names: list[str]) -> Recipe:
    """`base` with every override whose pattern matches one of `names` applied, in order."""
    return dataclasses.replace(base, **override_fields(overrides, names))


def table_fields(config, tables: set, matches) -> dict:
    """The recipe fields of each embedding table (``WeightKey`` -> fields), by structure: a
    table that a MatMul also reads (a tied lm_head) is rotated, one only gathered is not
    (``QuantConfig.embedding_fields``). Empty when tables take the run's recipe
    (``--embedding-bits 0``)."""
    from .passes.gather_rule import read_by_matmul

    if config.embedding_bits == 0:
        return {}
    tied = read_by_matmul(tables, matches)
    return {k: config.embedding_fields(k in tied) for k in tables}


def with_recipe_for(keys: set, fields: dict, quantizer, overrides=()):
    """`quantizer` with `fields` forced for the weights in `keys` (matched by structure, e.g.
    embedding tables, rather than by name); the user's `overrides` that match such a weight
    by name still apply on top."""

    def quantize(key: WeightKey, w_kn, stats, names=(), forced=None):
        if key in keys:  # the user's overrides, then a plan's choice (`forced`), win
            user = override_fields(overrides, [key.initializer, *names])
            forced = {**fields, **user, **(forced or {})}
        return quantizer(key, w_kn, stats, names, forced=forced)

    return quantize


def with_plan(plan: dict, quantizer):
    """`quantizer` with each planned weight's recipe forced (a bit allocation)."""
    fields = ("bits", "group_size", "symmetric", "scale_bits", "super_group")

    def quantize(key: WeightKey, w_kn, stats, names=(), forced=None):
        r = plan.get(key)
        if r is not None:
            forced = {**(forced or {}), **{f: getattr(r, f) for f in fields}}
        return quantizer(key, w_kn, stats, names, forced=forced)

    return quantize


def single_recipe_quantizer(recipe: Recipe, layout: Layout, scale_dtype=np.float16, overrides=()):
    """Quantizer applying `recipe` (changed per weight by `overrides`, matched against the
    weight's and its nodes' names) to every weight; `auto` keeps the best candidate."""

    def quantize(
        key: WeightKey,
        w_kn: np.ndarray,
        stats: InputStats | None,
        names: list[str] = (),
        forced: dict | None = None,
    ):
        check_finite(w_kn, key.initializer)
        base = recipe_for(recipe, overrides, [key.initializer, *names])
        if forced:
            base = dataclasses.replace(base, **forced)
        chosen = base
        if base.method == "auto" and stats is not None:
            q, chosen, _ = quantize_auto(base, w_kn, layout, stats, scale_dtype)
        else:
            q = quantize_with(base, w_kn, layout, stats, scale_dtype)
        return q, report_entry(chosen, key, w_kn, q, stats)

    return quantize
