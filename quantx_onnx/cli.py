"""Command line: ``python -m quantx_onnx <command>``.

Every failure the user can cause is reported as one line on stderr with a documented exit
code (README, "Exit codes"); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .errors import QuantXError

EXIT_INTERNAL = 1


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000.0
    return f"{n:.1f} GB"


def _progress(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None

    def wrap(items):
        return tqdm(items, desc=desc, unit="weight", disable=None, leave=False)

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
    p.add_argument("-o", "--output", required=True, help="output .onnx file or folder")
    p.add_argument("--bits", type=int, default=3, help="bits per weight code: 2, 3, 4 or 8")
    p.add_argument(
        "--group-size", type=int, default=64, help="weights per scale along K (0: per-channel)"
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
    p.add_argument("--scale-bits", type=int, default=0, help="hierarchical scales: sub-scale bits")
    p.add_argument("--super-group", type=int, default=8, help="groups per super-scale")
    p.add_argument(
        "--no-embeddings", action="store_true", help="keep embedding Gather tables in float"
    )
    p.add_argument("--quiet", action="store_true", help="print only the output path")
    p.set_defaults(run=_run_optimize)


def _run_optimize(args) -> int:
    from .config import QuantConfig
    from .pipeline import optimize

    config = QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=args.symmetric,
        target=args.target,
        accuracy_level=args.accuracy_level,
        exclude=tuple(args.exclude),
        scale_bits=args.scale_bits,
        super_group=args.super_group,
        embeddings=not args.no_embeddings,
    )
    report = optimize(
        args.model, args.output, config, progress=None if args.quiet else _progress("quantize")
    )
    if args.quiet:
        print(report.output)
        return 0
    print(_optimize_summary(report, config))
    return 0


def _optimize_summary(report, config) -> str:
    lin = report.linear
    lines = [f"QuantX optimize: {report.input} -> {report.output}"]
    path = "int8 activations" if report.accuracy_level == 4 else "float activations"
    grid = "symmetric" if config.symmetric else "asymmetric"
    group = "per-channel" if config.group_size == 0 else f"group {config.group_size}"
    lines.append(
        f"  target {report.target} (layout {report.layout}, {path}); {config.bits}-bit {grid}, "
        f"{group}, method {config.method}"
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
    if lin.untouched:
        left = ", ".join(f"{c} {op}" for op, c in sorted(lin.untouched.items()))
        lines.append(f"  left as is (no constant weight, e.g. attention): {left}")
    params = report.quantized_weights
    lines.append(
        f"  weights: {params / 1e6:.1f}M parameters at {report.bits_per_weight:.3f} bits/weight"
    )
    ratio = report.bytes_before / max(report.bytes_after, 1)
    lines.append(
        f"  size: {_human_bytes(report.bytes_before)} -> {_human_bytes(report.bytes_after)} "
        f"({ratio:.1f}x smaller)"
    )
    if report.copied:
        lines.append(f"  copied: {', '.join(report.copied)}")
    lines.append(f"  time: {report.seconds:.1f} s")
    return "\n".join(lines)


# --- entry point ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quantx_onnx",
        description="QuantX-ONNX: 3-bit weight-only quantization for ONNX Runtime",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_optimize(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except QuantXError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
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
