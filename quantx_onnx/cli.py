"""Command line: ``python -m quantx_onnx <command>``.

Every failure the user can cause is reported as one line on stderr with a documented exit
code (README, "Exit codes"); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .errors import QuantXError

EXIT_INTERNAL = 1


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000.0
    return f"{n:.1f} GB"


def _progress(default_desc: str):
    """A progress-bar wrapper ``wrap(items, desc=...)`` (tqdm on a terminal, silent else)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None

    def wrap(items, desc: str = default_desc):
        return tqdm(items, desc=desc, disable=None, leave=False)

    return wrap


# --- optimize ------------------------------------------------------------------------------
def _add_optimize(sub):
    p = sub.add_parser(
        "optimize",
        help="quantize a model's MatMul/Gemm/Gather weights into QuantX nodes",
        description="Rewrite every MatMul/Gemm with a constant weight (and embedding Gathers) "
        "into com.quantx nodes with packed low-bit weights.",
    )
    p.add_argument("model", help="a .onnx file or an optimum export folder")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="output .onnx file or folder (default: beside the input, MODEL.quantx.onnx for a "
        "file, FOLDER-quantx/ for a folder; refused if it exists)",
    )
    p.add_argument("--bits", type=int, default=3, help="bits per weight code: 2, 3, 4, 5, 6 or 8")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="weights per scale along K (0: per-channel; default 32 with hierarchical 4-bit "
        "sub-scales when calibrating, else 64)",
    )
    p.add_argument("--symmetric", action="store_true", help="no zero points (z = 2^(bits-1))")
    p.add_argument(
        "--target",
        default="auto",
        help="auto (this machine), generic, x86-avx2, x86-avx512, arm64-neon, arm64-dotprod",
    )
    p.add_argument(
        "--accuracy-level",
        type=int,
        default=None,
        help="0: float activations; 4: int8 activations (default: the target's)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave nodes/weights whose name matches REGEX in float (repeatable)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="REGEX=FIELD:VALUE,...",
        help="change the recipe of weights/nodes matching REGEX, e.g. "
        "'embed|lm_head=bits:4,group:32' (fields: bits, group, method, symmetric, "
        "scale_bits, super_group; repeatable, applied in order)",
    )
    p.add_argument(
        "--scale-bits", type=int, default=None, help="hierarchical scales: sub-scale bits (0: off)"
    )
    p.add_argument("--super-group", type=int, default=8, help="groups per super-scale")
    p.add_argument(
        "--no-embeddings", action="store_true", help="keep embedding Gather tables in float"
    )
    p.add_argument(
        "--embedding-bits",
        type=int,
        default=None,
        help="bits of embedding tables and the lm_head, in groups of 32 (default max(--bits, "
        "4): the most sensitive weights; 0: the same recipe as the rest)",
    )
    p.add_argument(
        "--method",
        default=None,
        help="rtn, mse, gptq, awq, codebook or auto (default: gptq when calibrating, else rtn)",
    )
    p.add_argument(
        "--calib-text",
        default=None,
        metavar="FILE",
        help="calibration text (file, gensim:wiki-calib, ...), .npy/.npz token ids, or 'self' "
        "(the model generates it; the default for decoder exports with a tokenizer); "
        "'A+B' mixes sources, e.g. gensim:wiki-calib+self",
    )
    p.add_argument(
        "--calib-images",
        default=None,
        metavar="DIR",
        help="calibration images, a folder, one file or skimage:calib (bundled photos): "
        "for an image model (default: synthetic inputs) or a VLM folder's vision encoder (also "
        "placed before the --calib-text windows)",
    )
    p.add_argument(
        "--component",
        action="append",
        default=[],
        metavar="NAME=BITS,...",
        help="VLM folders: bits per component, vision, text, embed (default vision=4, text "
        "--bits, embed as text; 'float' keeps one unquantized), e.g. vision=4,text=3",
    )
    p.add_argument(
        "--data-free",
        action="store_true",
        help="never calibrate: round-to-nearest, as fast as possible (lower quality)",
    )
    p.add_argument(
        "--budget-bpw",
        type=float,
        default=None,
        help="bit allocation: average bits per quantized weight, embeddings included "
        "(default when calibrating: --bits + 0.7); encoders count their matrices only, "
        "embedding tables keep their recipe (default: --bits + 0.3 for a text encoder, "
        "one recipe for an image encoder)",
    )
    p.add_argument(
        "--budget-mb", type=float, default=None, help="bit allocation: model file size in MB"
    )
    p.add_argument(
        "--uniform", action="store_true", help="one recipe for every matrix (no bit allocation)"
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=None,
        metavar="X",
        help="bit allocation: decode matmuls at least X times faster than fp32, by the "
        "target's cost model (python -m quantx_onnx bench calibrate-target)",
    )
    p.add_argument(
        "--max-ppl-increase",
        type=float,
        default=None,
        metavar="P",
        help="the smallest model whose perplexity on a held-out part of the calibration text "
        "is at most P (0.1 = +10%%) above fp32's; searches the budget, one full quantization "
        "per step",
    )
    p.add_argument(
        "--e2e-epochs",
        type=int,
        default=None,
        help="end-to-end tuning passes over the calibration batches (default 1 when "
        "calibrating; 0: off)",
    )
    p.add_argument(
        "--e2e-rounding",
        action="store_true",
        help="end-to-end tuning also learns each code's rounding (one step up or down, "
        "sign-gradient on the model's KL; slow on a CPU, meant for --device cuda)",
    )
    p.add_argument(
        "--e2e-text",
        default=None,
        metavar="SPEC",
        help="text the end-to-end step also tunes on, as --calib-text takes it (default: 'self', "
        "the model's own text, when a decoder calibrates on given text: it keeps the tuning "
        "from fitting one genre; 'none': the calibration text alone)",
    )
    p.add_argument(
        "--e2e-samples",
        type=int,
        default=None,
        metavar="N",
        help="windows of the --e2e-text text (default: 128 of 256 tokens for the model's own "
        "text, as --calib-samples would take for given text; more is better on unseen genres "
        "and slower: docs/ACCURACY.md); when the model's own text is the whole calibration "
        "and there is no --e2e-text: the first N of its windows (default 64 of the 96)",
    )
    p.add_argument(
        "--e2e-span",
        type=int,
        default=None,
        metavar="K",
        help="input channels each tuned scale multiplier of a column covers, rounded up to "
        "the format's scale blocks (default 256 for decoders: one per super-scale of the "
        "default groups of 32; 0: one per column, the default for encoders)",
    )
    p.add_argument(
        "--block-steps",
        type=int,
        default=0,
        help="experimental learned rounding per decoder layer: sign-gradient steps fitting "
        "each layer's output to the float model's (0: off, the default; on SmolLM2 it made "
        "perplexity worse, docs/ACCURACY.md)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of sensitivity and end-to-end tuning: cpu, cuda, cuda:N",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=None,
        help="calibration sequences (default: 64, self-generated or of real text)",
    )
    p.add_argument(
        "--calib-seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: 256 self-generated, 512 of real text)",
    )
    p.add_argument(
        "--no-sequential",
        action="store_true",
        help="calibrate every layer on float inputs (faster, less accurate)",
    )
    p.add_argument(
        "--propagation",
        type=float,
        default=None,
        metavar="ALPHA",
        help="error propagation: fit each weight to the float layer's output on the quantized "
        "model's inputs, this fraction of the way (default: 0.5 for encoders, 0 (off) for "
        "decoders, whose end-to-end tuning does as much; 0.25 helps decoders without it)",
    )
    p.add_argument(
        "--hessian",
        default="norm",
        help="token weighting of the calibration Hessian: norm (every token alike, default) "
        "or plain (sum of x x^T, as in the GPTQ paper)",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="FILE.json",
        help="write the per-weight recipe report (bits, output error) as JSON",
    )
    p.add_argument("--threads", type=int, default=None, help="ORT threads for calibration")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the calibration's random draws (the model's own text, the windows taken "
        "from given text, the order of the tuning batches): another seed, another equally "
        "good draw",
    )
    p.add_argument(
        "--no-fuse-attention",
        action="store_true",
        help="keep the exported attention ops (default: one GroupQueryAttention per layer)",
    )
    p.add_argument(
        "--ort-attention",
        action="store_true",
        help="keep ONNX Runtime's GroupQueryAttention for the fused attention (default: "
        "QxGroupQueryAttention, which decodes with QuantX's kernel and hands the rest to it)",
    )
    p.add_argument(
        "--portable",
        action="store_true",
        help="write the model for stock ONNX Runtime (no QuantX library): MatMulNBits where "
        "ORT runs the format natively, packed bit planes + standard ops elsewhere",
    )
    p.add_argument(
        "--rotate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize matrices in a randomized Hadamard basis (kernels rotate the "
        "activations; K = 12^a * 2^b only). Default: on for calibrated runs, off for "
        "--data-free and --portable",
    )
    p.add_argument("--quiet", action="store_true", help="print only the output path")
    p.set_defaults(run=_run_optimize)


def optimize_config(args):
    """The QuantConfig of parsed ``optimize`` arguments."""
    from .config import QuantConfig

    return QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=args.symmetric,
        target=args.target,
        accuracy_level=args.accuracy_level,
        exclude=tuple(args.exclude),
        scale_bits=args.scale_bits,
        super_group=args.super_group,
        embeddings=not args.no_embeddings,
        embedding_bits=args.embedding_bits,
        fuse_attention=not args.no_fuse_attention,
        qx_attention=not args.ort_attention,
        method=args.method,
        calib=args.calib_text,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        sequential=not args.no_sequential,
        hessian=args.hessian,
        report=args.report,
        threads=args.threads,
        seed=args.seed,
        overrides=tuple(args.override),
        data_free=args.data_free,
        budget_bpw=args.budget_bpw,
        budget_mb=args.budget_mb,
        uniform=args.uniform,
        e2e_epochs=args.e2e_epochs,
        e2e_rounding=args.e2e_rounding,
        e2e_text=args.e2e_text,
        e2e_samples=args.e2e_samples,
        e2e_span=args.e2e_span,
        block_steps=args.block_steps,
        propagation=args.propagation,
        device=args.device,
        portable=args.portable,
        rotate=args.rotate,
        components=tuple(args.component),
        calib_images=args.calib_images,
        speedup=args.speedup,
        max_ppl_increase=args.max_ppl_increase,
    )


def _run_optimize(args) -> int:
    from .pipeline import optimize

    config = optimize_config(args)
    progress = None if args.quiet else _progress("weights")
    if config.max_ppl_increase is not None:
        from .tradeoff import optimize_to_quality

        report = optimize_to_quality(args.model, args.output, config, progress=progress)
        return _print_optimize(report, args)
    report = optimize(args.model, args.output, config, progress=progress)
    return _print_optimize(report, args)


def _print_optimize(report, args) -> int:
    if args.quiet:
        print(report.output)
        return 0
    parts = getattr(report, "components", None)  # a VLM folder: one summary per graph
    if parts is None:
        print(_optimize_summary(report))
    else:
        print(f"QuantX optimize (VLM): {report.input} -> {report.output}")
        for component, part in parts.items():
            print(f"[{component}] " + _optimize_summary(part))
        for component in report.kept_float:
            print(f"[{component}] kept in float (--component {component}=float)")
        ratio = report.bytes_before / max(report.bytes_after, 1)
        print(
            f"  quantized graphs: {_human_bytes(report.bytes_before)} -> "
            f"{_human_bytes(report.bytes_after)} ({ratio:.1f}x smaller), {report.seconds:.1f} s"
        )
        print(f"  copied: {', '.join(report.copied)}")
    if args.output is None:
        where = Path(report.output)  # a VLM report's output is the folder itself
        folder = Path(args.model).is_dir() and parts is None
        print(f"wrote {where.parent if folder else where} (no -o given)")
    return 0


def _optimize_summary(report) -> str:
    config = report.config
    lin = report.linear
    lines = [f"QuantX optimize: {report.input} -> {report.output}"]
    path = "int8 activations" if report.accuracy_level == 4 else "float activations"
    grid = "symmetric" if config.symmetric else "asymmetric"
    group = "per-channel" if config.group_size == 0 else f"group {config.group_size}"
    lines.append(
        f"  target {report.target} (layout {report.layout}, {path}); {config.bits}-bit {grid}, "
        f"{group}, method {config.resolved_method}"
    )
    by_op: dict[str, int] = {}
    for n in lin.rewritten:
        by_op[n.op_type] = by_op.get(n.op_type, 0) + 1
    ops = ", ".join(f"{c} {op}" for op, c in sorted(by_op.items()))
    lines.append(f"  rewritten: {len(lin.rewritten)} nodes ({ops}) over {len(lin.weights)} weights")
    if lin.skipped:
        lines.append(f"  skipped: {len(lin.skipped)} nodes")
        for n in lin.skipped:
            lines.append(f"    {n.node} ({n.op_type}, weight {n.weight}): {n.reason}")
    else:
        lines.append("  skipped: none")
    att = report.attention
    if att.fused or att.skipped:
        lines.append(f"  attention: {len(att.fused)} layers fused into {att.op}")
        for layer, why in sorted(att.skipped.items()):
            lines.append(f"    layer {layer} kept as exported: {why}")
    if report.multi_matmuls:
        n = report.multi_matmuls
        lines.append(f"  projections of one input (q/k/v, gate/up): {n} QxMultiMatMul nodes")
    rotated = sum(1 for w in lin.weights if w.attributes.get("rotate"))
    if rotated:
        lines.append(f"  rotated (randomized Hadamard input basis): {rotated} weights")
    if lin.untouched:
        left = ", ".join(f"{c} {op}" for op, c in sorted(lin.untouched.items()))
        lines.append(f"  left as is (no constant weight: activation x activation): {left}")
    params = report.quantized_weights
    lines.append(
        f"  weights: {params / 1e6:.1f}M parameters at {report.bits_per_weight:.3f} bits/weight"
    )
    ratio = report.bytes_before / max(report.bytes_after, 1)
    lines.append(
        f"  size: {_human_bytes(report.bytes_before)} -> {_human_bytes(report.bytes_after)} "
        f"({ratio:.1f}x smaller)"
    )
    if report.calibration:
        c = report.calibration
        lines.append(
            f"  calibration: {c['tokens']} tokens from {c['source']} "
            f"({'sequential' if c['sequential'] else 'one pass'}, {c['seconds']:.1f} s)"
        )
        if report.plan:
            p = report.plan
            lines.append(
                f"  bit plan: {p['planned_bytes'] / 1e6:.2f} MB of weights for a budget of "
                f"{p['budget_bytes'] / 1e6:.2f} MB, estimated loss "
                f"+{p['estimated_loss_increase']:.4f} nats/token before GPTQ"
            )
            for recipe, count in sorted(p["recipes"].items()):
                lines.append(f"    {count:4d} x {recipe}")
            if p.get("estimated_speedup_vs_fp32"):
                want = p.get("speedup_budget")
                lines.append(
                    f"    decode matmuls (cost model {p['cost_model']}): "
                    f"{p['estimated_decode_matmul_ms']:.3f} ms/token, "
                    f"{p['estimated_speedup_vs_fp32']:.2f}x fp32"
                    + (f" (asked {want:.2f}x)" if want else "")
                    + f"; the fastest plan of this size: {p['max_speedup_vs_fp32']:.2f}x"
                )
            lines.append(
                f"    whole file: {8 * report.bytes_after / max(params, 1):.3f} bits per "
                f"quantized weight"
            )
        blocks = c.get("block_reconstruction") or []
        if blocks:
            kept = [b for b in blocks if b["kept"]]
            gain = np.mean([1 - b["loss_after"] / b["loss_before"] for b in kept]) if kept else 0
            lines.append(
                f"  block reconstruction: {len(kept)}/{len(blocks)} layers improved, layer "
                f"output error -{100 * gain:.0f}% on average, "
                f"{sum(b['seconds'] for b in blocks):.1f} s"
            )
        t = report.tuning
        if t and "skipped" in t:
            lines.append(f"  end-to-end tuning skipped: {t['skipped']}")
        elif t:
            what, unit = (
                ("KL to the float model", " nats/token")
                if t.get("loss", "kl") == "kl"
                else ("output error against the float model", "")
            )
            lines.append(
                f"  end-to-end tuning: {t['steps']} steps on {t['device']}, {what} "
                f"{t['kl_first']:.4f} -> {t['kl_last']:.4f}{unit}, {t['seconds']:.1f} s"
            )
            if not t.get("kept", True):
                lines.append(
                    f"  end-to-end tuning not kept: it did not lower the {what} on its first "
                    f"batches ({t['check_before']:.4f} -> {t['check_after']:.4f}); the "
                    "layer-wise result is saved"
                )
        errs = [w["output_error"] for w in report.weights if "output_error" in w]
        lines.append("  per weight: recipe, bits/weight, relative output error")
        width = max(len(w["weight"]) for w in report.weights)
        for w in report.weights:
            err = f"{w['output_error']:.4f}" if "output_error" in w else "-"
            lines.append(
                f"    {w['weight']:<{width}}  {w['recipe']:<28} {w['bits_per_weight']:6.3f}  {err}"
            )
        chosen = collections.Counter(w["recipe"] for w in report.weights)
        lines.append(
            "  recipes chosen: " + ", ".join(f"{c} x {r}" for r, c in sorted(chosen.items()))
        )
        if errs:
            lines.append(
                f"  layer output error: median {np.median(errs):.4f}, "
                f"max {max(errs):.4f} (relative, over the calibration tokens)"
            )
    if report.portable:
        p = report.portable
        lines.append(
            f"  portable (stock ONNX Runtime): {p['matmulnbits']} MatMulNBits, "
            f"{p['subgraph']} unpack+MatMul, {p['gathers']} unpack Gather"
        )
    if report.copied:
        lines.append(f"  copied: {', '.join(report.copied)}")
    if report.genai and report.genai.written:
        g = report.genai
        extra = ", tokenizer.json decoder rewritten for genai" if g.tokenizer_fixed else ""
        lib = f" with {g.library}" if g.library else ""
        lines.append(f"  onnxruntime-genai: genai_config.json{lib}{extra}")
    elif report.genai:
        lines.append(f"  onnxruntime-genai: no genai_config.json ({report.genai.reason})")
    steps = "".join(f", {name} {t:.0f} s" for name, t in report.phases.items())
    lines.append(f"  time: {report.seconds:.1f} s{steps}")
    return "\n".join(lines)


# --- portable ------------------------------------------------------------------------------
def _add_portable(sub):
    p = sub.add_parser(
        "portable",
        help="convert a QuantX model for stock ONNX Runtime (no QuantX library needed)",
        description="Replace every com.quantx node by ONNX Runtime's own operators: MatMulNBits "
        "(2/4/8-bit, groups 16..256) or standard-op unpacking of packed bit planes (3-bit, "
        "codebooks, ...). The weights stay packed in the file.",
    )
    p.add_argument("model", help="a QuantX .onnx file or export folder")
    p.add_argument("-o", "--output", required=True, help="output .onnx file or folder")
    p.add_argument(
        "--accuracy-level",
        type=int,
        default=None,
        help="accuracy_level of the MatMulNBits nodes (default: each QuantX node's)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the output path")
    p.set_defaults(run=_run_portable)


def _run_portable(args) -> int:
    from .errors import InputError
    from .portable import convert

    if args.accuracy_level is not None and args.accuracy_level not in (0, 1, 2, 3, 4):
        raise InputError(f"--accuracy-level {args.accuracy_level}: must be 0..4")
    report = convert(args.model, args.output, accuracy_level=args.accuracy_level)
    print(report.output if args.quiet else report.summary())
    return 0


# --- bench ---------------------------------------------------------------------------------
def _add_workload_args(p, rounds: int):
    """The prefill-then-decode workload of `bench decode` and `bench llamacpp`."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=rounds)


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks (kernels against ORT MatMulNBits and fp32)")
    bsub = p.add_subparsers(dest="bench", required=True)
    k = bsub.add_parser(
        "kernels",
        help="QuantX 2/3/4-bit vs ORT MatMulNBits 4/2-bit vs fp32 MatMul, same process",
    )
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--json", help="also write the results to this JSON file")
    k.add_argument("--shapes", help="comma-separated KxN list (default: the five standard shapes)")
    k.add_argument("--rows", help="comma-separated M values (default 1,16,128)")
    k.add_argument("--rounds", type=int, default=15, help="alternating timed rounds per shape")
    k.add_argument(
        "--working-set",
        type=int,
        default=64,
        metavar="MB",
        help="weights per config rotate through at least this many MB (default 64)",
    )
    k.add_argument("--hot", action="store_true", help="one cache-resident weight copy instead")
    k.add_argument("--group-size", type=int, default=None, help="QuantX group size (default 64)")
    k.set_defaults(run=_run_bench_kernels)
    d = bsub.add_parser("decode", help="prefill + decode tokens/s and peak memory, side by side")
    d.add_argument("model", help="export folder to measure (e.g. a QuantX model)")
    d.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="DIR",
        help="other export folders in the same run (fp32, ORT 4-bit, ...)",
    )
    _add_workload_args(d, rounds=3)
    d.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    d.add_argument(
        "--stock-ort",
        action="store_true",
        help="run models without QuantX nodes (fp32, ORT 4-bit, portable) without the QuantX "
        "library",
    )
    d.add_argument("--json", help="also write the results to this JSON file")
    d.set_defaults(run=_run_bench_decode)
    f = bsub.add_parser(
        "profile", help="ORT profile of decode steps: time per op type, QuantX share"
    )
    f.add_argument("model", help="export folder (decoder with KV cache)")
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--prompt-tokens", type=int, default=128)
    f.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    f.add_argument("--json", help="also write the profile to this JSON file")
    f.set_defaults(run=_run_bench_profile)
    lc = bsub.add_parser(
        "llamacpp",
        help="SmolLM2 QuantX beside llama.cpp Q4_0 (built once from llama-cpp-python's sdist)",
    )
    lc.add_argument(
        "model",
        nargs="?",
        help="QuantX SmolLM2 export (default: the demo's, smollm2-quantx3-wiki in the demo cache)",
    )
    _add_workload_args(lc, rounds=5)
    lc.add_argument("--jobs", type=int, help="build jobs for llama.cpp (default: all cores)")
    lc.add_argument("--gguf", help="llama.cpp model to run (default: Q4_0 of the packaged SmolLM2)")
    lc.add_argument("--json", help="also write the results to this JSON file")
    lc.set_defaults(run=_run_bench_llamacpp)
    c = bsub.add_parser(
        "calibrate-target",
        help="the bit allocator's cost model: kernel time per weight of every candidate format "
        "(bits, group, scales) at decode and prefill, measured here and cached",
    )
    c.add_argument("--target", default="auto", help="auto (this machine) or a target name")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--force", action="store_true", help="measure again even if cached")
    c.add_argument("--json", help="also write the cost model to this JSON file")
    c.set_defaults(run=_run_bench_calibrate_target)


def _parse_list(text, item):
    try:
        return tuple(item(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        from .errors import InputError

        raise InputError(f"cannot parse {text!r}: {e}") from None


def _run_bench_kernels(args) -> int:
    from .bench import kernels

    shapes = kernels.SHAPES
    if args.shapes:
        shapes = _parse_list(args.shapes, lambda s: tuple(int(v) for v in s.lower().split("x")))
    rows = _parse_list(args.rows, int) if args.rows else kernels.ROWS
    report = kernels.run(
        threads=args.threads,
        shapes=shapes,
        rows=rows,
        rounds=args.rounds,
        working_set_mb=args.working_set,
        hot=args.hot,
        group=args.group_size,
    )
    if args.json:
        kernels.save_json(report, args.json)
    return 0


# --- export / generate / eval ------------------------------------------------------------
def _add_export(sub):
    p = sub.add_parser("export", help="Hugging Face folder or GGUF file -> optimum ONNX export")
    p.add_argument("source", help="a Hugging Face model folder or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show transformers/optimum output and run optimum's per-output validation",
    )
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .export import export

    start = time.perf_counter()
    done = export(args.source, args.output, quiet=not args.verbose, progress=_progress("export"))
    path = done.model if done.model.name == "model.onnx" else done.model.parent  # VLM: folder
    size = sum(f.stat().st_size for f in done.model.parent.iterdir() if ".onnx" in f.name)
    print(
        f"exported {args.source} -> {path} ({_human_bytes(size)}, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    print(f"  {done.check.summary()}")
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate text with an exported decoder (KV cache)")
    p.add_argument("model", help="export folder (fp32, ORT 4-bit or QuantX)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--image",
        action="append",
        default=None,
        help="an image file for a VLM export folder (repeatable; each <image> in the prompt "
        "takes one, else they go first)",
    )
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from .generate import GenerationStats, generate

    stats = GenerationStats()

    def show(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(
        args.model,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
        threads=args.threads,
        on_text=show,
        stats=stats,
        image=args.image,
    )
    print()
    print(
        f"[{stats.prompt_tokens} prompt tokens in {stats.prefill_s * 1e3:.0f} ms, "
        f"{stats.new_tokens} new tokens, {stats.decode_tokens_per_s:.1f} tok/s decode]",
        file=sys.stderr,
    )
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate exported decoders and encoders")
    esub = p.add_subparsers(dest="eval", required=True)
    for name, help_ in (
        ("perplexity", "perplexity of one model, as JSON"),
        ("compare", "perplexity of two models side by side, as JSON"),
    ):
        e = esub.add_parser(name, help=help_)
        e.add_argument("models", nargs=1 if name == "perplexity" else 2, metavar="MODEL")
        e.add_argument(
            "--text",
            required=True,
            help="a UTF-8 file, or gensim:wiki-eval, gensim:wiki-calib, gensim:lee, "
            "gensim:lee-calib",
        )
        e.add_argument("--max-tokens", type=int, default=16384)
        e.add_argument("--window", type=int, default=1024)
        e.add_argument("--threads", type=int, default=None)
        e.set_defaults(run=_run_eval)
    e = esub.add_parser(
        "encoder",
        help="image models / text encoders against their float model on real inputs, as JSON",
        description="Pearson correlation of the outputs pooled over photos (image models); "
        "mean cosine of sentence embeddings and nearest-neighbour agreement (text encoders)",
    )
    e.add_argument("reference", help="the float model (.onnx or export folder)")
    e.add_argument("models", nargs="+", metavar="MODEL", help="quantized models to compare")
    e.add_argument("--photos", default="skimage:eval", help="folder, image or skimage:eval")
    e.add_argument("--text", default="gensim:lee", help="sentence source (file or gensim:*)")
    e.add_argument("--sentences", type=int, default=300, help="how many sentences")
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(run=_run_eval_encoder)


def _run_eval_encoder(args) -> int:
    from .encoder_eval import compare

    rows = compare(
        args.reference,
        args.models,
        photos=args.photos,
        text=args.text,
        count=args.sentences,
        threads=args.threads,
    )
    print(json.dumps(rows, indent=1))
    return 0


def _run_eval(args) -> int:
    from .data import load_text
    from .evaluate import perplexity

    text = load_text(args.text)
    results = [
        perplexity(
            m,
            text,
            max_tokens=args.max_tokens,
            window=args.window,
            threads=args.threads,
            progress=_progress("windows"),
        )
        for m in args.models
    ]
    for r in results:
        r["text"] = args.text
    if len(results) == 1:
        print(json.dumps(results[0], indent=1))
    else:
        a, b = results
        print(
            json.dumps(
                {"a": a, "b": b, "ratio_b_over_a": b["perplexity"] / a["perplexity"]}, indent=1
            )
        )
    return 0


def _run_bench_decode(args) -> int:
    from .bench import decode

    if args.new_tokens < 2 or args.prompt_tokens < 1:
        from .errors import InputError

        raise InputError("--new-tokens >= 2 and --prompt-tokens >= 1 are required")
    results = decode.run(
        [args.model, *args.baseline],
        threads=args.threads,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        measure_memory=not args.no_memory,
        stock_ort=args.stock_ort,
    )
    if args.json:
        with open(args.json, "w") as f:
            f.write(decode.to_json(results))
    return 0


def _run_bench_profile(args) -> int:
    import dataclasses
    import json

    from .bench import profile

    if args.steps < 1 or args.prompt_tokens < 1:
        from .errors import InputError

        raise InputError("--steps >= 1 and --prompt-tokens >= 1 are required")
    result = profile.profile_decode(args.model, args.threads, args.prompt_tokens, args.steps)
    print("\n".join(profile.format_profile(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=1)
    return 0


def _run_bench_llamacpp(args) -> int:
    from .bench import llamacpp
    from .errors import InputError

    model = args.model
    if model is None:
        from .demo import default_cache

        model = default_cache() / "smollm2-quantx3-wiki"
        if not model.is_dir():
            raise InputError(f"{model}: not built; run `python -m quantx_onnx demo` or name one")
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.rounds < 1:
        raise InputError("--new-tokens >= 2, --prompt-tokens >= 1 and --rounds >= 1 are required")
    result = llamacpp.run(
        model,
        threads=args.threads,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        jobs=args.jobs,
        gguf=args.gguf,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _run_bench_calibrate_target(args) -> int:
    from .bench import target_cost

    model, path = target_cost.calibrate_target(
        args.target, args.threads, force=args.force, progress=_progress("timing formats")
    )
    target_cost.describe(model)
    print(f"cached in {path}" if path else "built-in default (this machine cannot run it)")
    if args.json:
        Path(args.json).write_text(json.dumps(model.to_json(), indent=1))
    return 0


# --- sweep ---------------------------------------------------------------------------------
def _add_sweep(sub):
    p = sub.add_parser(
        "sweep",
        help="the Pareto front: budgets and uniform recipes against perplexity and decode speed",
        description="Quantize MODEL at several budgets (one shared calibration) and the uniform "
        "recipes, evaluate perplexity and decode tokens/s, print the table and write a PNG plot.",
    )
    p.add_argument("model", help="fp32 export folder")
    p.add_argument("--calib-text", required=True, help="calibration text (as for optimize)")
    p.add_argument(
        "--eval-text", action="append", required=True, help="evaluated text (repeatable)"
    )
    p.add_argument("-o", "--output", default="sweep-out", help="folder for models, table, plot")
    p.add_argument("--budgets", default="3.0,3.5,4.0,4.5", help="bits per weight, comma list")
    p.add_argument("--uniform-bits", default="2,3,4", help="uniform recipes (comma list)")
    p.add_argument(
        "--speed-at", default="4.0", help="budgets that also get a --speedup point ('' none)"
    )
    p.add_argument(
        "--speed-fraction",
        type=float,
        default=0.3,
        help="a speed point's --speedup: this far from the accuracy-first plan's estimated "
        "speed (0) to the fastest plan of its size (1)",
    )
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-rounds", type=int, default=5)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument(
        "--calib-batch",
        type=int,
        default=None,
        help="windows per calibration batch (default: 4 of 512 tokens, fewer when longer; 2 "
        "halves the sensitivity pass's memory)",
    )
    p.add_argument(
        "--e2e-epochs",
        type=int,
        default=None,
        help="end-to-end tuning passes of every point (default: optimize's; 0 saves most of "
        "a point's time on a CPU)",
    )
    p.set_defaults(run=_run_sweep)


def _run_sweep(args) -> int:
    from .config import QuantConfig
    from .sweep import run_sweep

    run_sweep(
        args.model,
        args.output,
        calib=args.calib_text,
        eval_texts=args.eval_text,
        budgets=_parse_list(args.budgets, float),
        uniform_bits=_parse_list(args.uniform_bits, int),
        speed_at=_parse_list(args.speed_at, float),
        max_tokens=args.max_tokens,
        window=args.window,
        threads=args.threads,
        decode_rounds=args.decode_rounds,
        speed_fraction=args.speed_fraction,
        config=QuantConfig(
            calib_samples=args.calib_samples,
            calib_seq_len=args.calib_seq_len,
            calib_batch=args.calib_batch,
            e2e_epochs=args.e2e_epochs,
        ),
        progress=_progress("sweep"),
    )
    return 0


# --- demo ----------------------------------------------------------------------------------
def _add_demo(sub):
    p = sub.add_parser("demo", help="SmolLM2: export, quantize, compare with fp32 and ORT 4-bit")
    p.add_argument("--cache", default=None, help="where models are built and kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--prompt", default=None)
    p.add_argument(
        "--data-free",
        action="store_true",
        help="quantize with data-free round-to-nearest instead of calibrating on Wikipedia text",
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from . import demo

    demo.run(
        Path(args.cache) if args.cache else None,
        threads=args.threads,
        ppl_tokens=args.ppl_tokens,
        prompt=args.prompt or demo.DEFAULT_PROMPT,
        calib=not args.data_free,
        progress=_progress("demo"),
    )
    return 0


# --- entry point ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quantx_onnx",
        description="QuantX-ONNX: 3-bit weight-only quantization for ONNX Runtime",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_optimize(sub)
    _add_portable(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_sweep(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .model_io import check_interrupted, raise_interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # SIGTERM unwinds like Ctrl-C
        signal.signal(signal.SIGTERM, raise_interrupted)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        pass
    try:
        code = args.run(args)
        check_interrupted()
        return code
    except QuantXError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted by SIGINT; partial output was removed", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so briefly, with how to see more
        if args.debug:
            traceback.print_exc()
        print(
            f"error: internal error ({type(e).__name__}: {e}); rerun with --debug for a traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
