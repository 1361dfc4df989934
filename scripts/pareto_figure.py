"""Redraw the Pareto figure of docs/ACCURACY.md from a sweep's sweep.json plus points measured
outside it (an optimize report and its perplexities), e.g. budgets run through the whole
pipeline after the sweep:

    python scripts/pareto_figure.py SWEEP/sweep.json docs/pareto-smollm2.png \
        "4.0+e2e=b4.0.json:20.389:33.598" ...

Each extra point is NAME=REPORT:PPL_TEXT1:PPL_TEXT2 (perplexities in the order of the
sweep's eval texts, from `python -m quantx_onnx eval perplexity`). The front is recomputed on
the first text."""

import json
import sys
from pathlib import Path

from quantx_onnx.sweep import mark_front, plot


def main(sweep_json: str, png: str, *points: str) -> None:
    result = json.loads(Path(sweep_json).read_text())
    texts = result["eval_texts"]
    fp32 = next(r for r in result["rows"] if r["kind"] == "fp32")["ppl"]
    for spec in points:
        name, rest = spec.split("=", 1)
        report, *ppls = rest.split(":")
        if len(ppls) != len(texts):
            raise SystemExit(f"{spec}: give one perplexity per text ({', '.join(texts)})")
        rep = json.loads(Path(report).read_text())
        ppl = dict(zip(texts, map(float, ppls)))
        result["rows"].append({
            "name": name, "kind": "budget", "args": "", "file_mb": rep["bytes_after"] / 1e6,
            "file_bpw": rep["bytes_after"] * 8 / rep["quantized_parameters"],
            "budget_bpw": None, "ppl": ppl, "ratio": {t: ppl[t] / fp32[t] for t in texts},
            "decode_tok_s": None, "estimated_speedup": None, "optimize_s": None,
        })  # fmt: skip
    mark_front(result["rows"], texts[0])
    if points:
        result["calibration"] += f" (+ {len(points)} points measured after the sweep)"
    print(plot(result, Path(png)))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
