"""``python -m quantx_onnx sweep MODEL --calib-text FILE --eval-text FILE``: the Pareto front
of file size (bits per weight) against perplexity and decode tokens/s.

Points: the budgets (``--budgets``, bits per quantized weight over the whole file), the uniform
recipes (``--uniform-bits``: one calibrated recipe for every matrix, the table at 4 bits),
and speed points (``--speed-at``: the same byte budget as an accuracy-first point, with
``--speedup`` set between that plan's estimated speed and the fastest plan of its size). All
plan points share one calibration: the batches, the Fisher sensitivity and every candidate's
price are computed once. Each point's model, report and metrics are kept under OUT/points/, so
a sweep that stops resumes where it was. Peers: ORT 4-bit and llama.cpp's presets as recorded
in /work/shared/notes/FINDINGS.md (not re-run; only on wiki-eval, where they were measured).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from .config import QuantConfig
from .errors import InputError

# Recorded peers (FINDINGS.md, 2026-11/12, same protocol: 16384 tokens of gensim:wiki-eval in
# windows of 1024, SmolLM2-135M): name, file MB, wiki-eval perplexity, decode tok/s or None.
PEERS = (
    ("ORT 4-bit RTN b32", 182.7, 21.79, 86.0),
    ("llama.cpp Q4_0", 90, 22.01, None),
    ("llama.cpp Q4_0 + imatrix", 90, 19.44, None),
    ("llama.cpp Q3_K_S + imatrix", 86, 21.17, None),
    ("llama.cpp IQ3_XXS + imatrix", 85, 21.16, None),
    ("llama.cpp IQ3_S + imatrix", 86, 20.59, None),
    ("llama.cpp Q3_K_M + imatrix", 92, 19.26, None),
    ("llama.cpp Q4_K_M + imatrix", 104, 18.36, None),
)
PEER_TEXT = "gensim:wiki-eval"
# Speed points ask for this far from the accuracy-first plan's estimated speed to the fastest
# plan within the same byte budget. Near the fastest end the plans turn to 2 bits (on SmolLM2
# 0.8 gave a 2.5-bit model, docs/ACCURACY.md), so the default stays near the accurate end.
SPEED_FRACTION = 0.3


@dataclasses.dataclass
class Point:
    name: str
    kind: str  # fp32 | budget | uniform | speed
    fields: dict  # QuantConfig fields
    args: str  # the optimize flags, as a user would type them
    bpw: float | None = None


def plan_points(budgets, uniform_bits, speed_at) -> list[Point]:
    """The budgets in the order given (they share the sensitivity), each speed point right
    after its accuracy-first budget, then the uniform recipes."""
    points = []
    for bpw in dict.fromkeys([*budgets, *speed_at]):
        points.append(
            Point(f"budget-{bpw:.2f}", "budget", {"budget_bpw": bpw}, f"--budget-bpw {bpw}", bpw)
        )
        if bpw in speed_at:
            points.append(Point(f"speed-{bpw:.2f}", "speed", {"budget_bpw": bpw}, "", bpw))
    for b in uniform_bits:
        points.append(
            Point(
                f"uniform-{b}bit", "uniform", {"bits": b, "uniform": True}, f"--uniform --bits {b}"
            )
        )
    return points


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _model_dir(out: Path, p: Point) -> Path:
    return out / "points" / p.name / "model"


def run_sweep(
    model,
    out,
    *,
    calib: str,
    eval_texts: list[str],
    budgets=(3.0, 3.5, 4.0, 4.5),
    uniform_bits=(2, 3, 4),
    speed_at=(4.0,),
    max_tokens: int = 16384,
    window: int = 1024,
    threads: int = 2,
    decode_rounds: int = 5,
    speed_fraction: float = SPEED_FRACTION,
    config: QuantConfig | None = None,
    progress=None,
    log=print,
) -> dict:
    """Build, evaluate and plot every point; returns the sweep's JSON (also in OUT)."""
    from . import model_io
    from .pipeline import optimize

    if not eval_texts:
        raise InputError("sweep needs at least one --eval-text")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = config or QuantConfig()
    base = dataclasses.replace(base, calib=calib)
    source = model_io.resolve_input(model)
    fp32 = Point("fp32", "fp32", {}, "(the input)")
    points = plan_points(budgets, uniform_bits, speed_at)
    shared: dict = {}
    bar = progress or (lambda items, desc=None: items)
    for p in bar(points, "sweep: building models"):
        report_path = out / "points" / p.name / "report.json"
        if _load_json(report_path) is not None and (_model_dir(out, p)).exists():
            continue
        fields = dict(p.fields)
        if p.kind == "speed":
            acc = _load_json(out / "points" / f"budget-{p.bpw:.2f}" / "report.json")
            plan = (acc or {}).get("plan") or {}
            lo, hi = plan.get("estimated_speedup_vs_fp32"), plan.get("max_speedup_vs_fp32")
            if not lo or not hi:
                log(f"  {p.name}: the accuracy-first plan has no cost-model estimate; skipped")
                continue
            fields["speedup"] = lo + speed_fraction * (hi - lo)
            p.args = f"--budget-bpw {p.bpw} --speedup {fields['speedup']:.2f}"
        cfg = dataclasses.replace(base, **fields, report=str(report_path))
        shutil_rm(_model_dir(out, p))
        report_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"  {p.name}: optimize {p.args}")
        optimize(model, _model_dir(out, p), cfg, progress=progress, shared=shared)
        (report_path.parent / "args.txt").write_text(p.args)
    for p in points:
        args = out / "points" / p.name / "args.txt"
        if args.is_file():
            p.args = args.read_text()
    built = [p for p in points if _model_dir(out, p).exists()]
    models = {"fp32": source.folder or source.model_path}
    models.update({p.name: _model_dir(out, p) for p in built})
    metrics = _evaluate(models, out, eval_texts, max_tokens, window, threads, bar)
    speed = _decode(models, out, threads, decode_rounds, log)
    rows = _rows([fp32, *built], models, out, eval_texts, metrics, speed)
    result = {
        "model": str(model),
        "calibration": calib,
        "eval_texts": eval_texts,
        "max_tokens": max_tokens,
        "window": window,
        "rows": rows,
        "peers": [
            {"name": n, "file_mb": mb, "ppl": {PEER_TEXT: ppl}, "decode_tok_s": tps}
            for n, mb, ppl, tps in PEERS
        ],
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    table = format_table(result)
    (out / "sweep.md").write_text(table + "\n")
    log(table)
    png = plot(result, out / "pareto.png")
    log(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {png}")
    return result


def shutil_rm(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _evaluate(models, out, texts, max_tokens, window, threads, bar) -> dict:
    """Perplexity of every model on every text (cached per model and text)."""
    from .evaluate import perplexity

    cache_path = out / "metrics.json"
    cache = _load_json(cache_path) or {}
    todo = [(n, t) for n in models for t in texts if f"{n}|{t}|{max_tokens}|{window}" not in cache]
    for name, text in bar(todo, "sweep: perplexity"):
        cache = {**cache, **(_load_json(cache_path) or {})}
        if f"{name}|{text}|{max_tokens}|{window}" in cache:
            continue
        from .data import load_text

        r = perplexity(
            models[name],
            text=load_text(text),
            max_tokens=max_tokens,
            window=window,
            threads=threads,
        )
        # merged with what is there now: another process may be filling the same cache
        cache = {**(_load_json(cache_path) or {}), **cache}
        cache[f"{name}|{text}|{max_tokens}|{window}"] = r["perplexity"]
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_path)
    return {(n, t): cache[f"{n}|{t}|{max_tokens}|{window}"] for n in models for t in texts}


def _decode(models, out, threads, rounds, log) -> dict:
    """Decode tokens/s of every model, measured side by side (alternating rounds)."""
    from .bench import decode

    cache_path = out / "decode.json"
    cache = _load_json(cache_path) or {}
    if set(models) - set(cache):
        results = decode.run(
            [str(m) for m in models.values()],
            threads=threads,
            rounds=rounds,
            measure_memory=False,
            out=log,
        )
        cache = {n: r.decode_tokens_per_s for n, r in zip(models, results)}
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache


def _file_bytes(folder: Path) -> int:
    from .bench.decode import model_bytes

    return model_bytes(folder)


def _rows(points, models, out, texts, metrics, speed) -> list[dict]:
    rows = []
    for p in points:
        rep = _load_json(out / "points" / p.name / "report.json") if p.kind != "fp32" else None
        size = _file_bytes(Path(models[p.name]))
        params = (rep or {}).get("quantized_parameters")
        plan = (rep or {}).get("plan") or {}
        rows.append(
            {
                "name": p.name,
                "kind": p.kind,
                "args": p.args,
                "file_mb": size / 1e6,
                "file_bpw": 8 * size / params if params else None,
                "budget_bpw": p.bpw,
                "ppl": {t: metrics[(p.name, t)] for t in texts},
                "ratio": {t: metrics[(p.name, t)] / metrics[("fp32", t)] for t in texts},
                "decode_tok_s": speed.get(p.name),
                "estimated_speedup": plan.get("estimated_speedup_vs_fp32"),
                "optimize_s": (rep or {}).get("seconds"),
            }
        )
    mark_front(rows, texts[0])
    return rows


def mark_front(rows: list[dict], text: str) -> None:
    """Set each row's ``pareto``: no other row is both smaller and better on ``text``."""
    for r in rows:
        r["pareto"] = not any(
            o is not r
            and o["file_mb"] <= r["file_mb"]
            and o["ppl"][text] <= r["ppl"][text]
            and (o["file_mb"] < r["file_mb"] or o["ppl"][text] < r["ppl"][text])
            for o in rows
        )


def format_table(result: dict) -> str:
    texts = result["eval_texts"]
    head = ["point", "optimize args", "file MB", "bits/weight"]
    for t in texts:
        head += [f"{t} ppl", "x fp32"]
    head += ["decode tok/s", "est. speedup", "front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(result["rows"], key=lambda r: -r["file_mb"]):
        cells = [
            r["name"],
            f"`{r['args']}`" if r["kind"] != "fp32" else "",
            f"{r['file_mb']:.1f}",
            f"{r['file_bpw']:.3f}" if r["file_bpw"] else "32",
        ]
        for t in texts:
            cells += [f"{r['ppl'][t]:.2f}", f"{r['ratio'][t]:.3f}"]
        tps = r["decode_tok_s"]
        est = r["estimated_speedup"]
        cells += [
            f"{tps:.1f}" if tps else "-",
            f"{est:.2f}x" if est else "-",
            "*" if r["pareto"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Size against perplexity (one panel per text) and against decode tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = result["eval_texts"]
    rows = result["rows"]
    per_mb = next((r["file_bpw"] / r["file_mb"] for r in rows if r["file_bpw"]), None)
    fig, axes = plt.subplots(1, len(texts) + 1, figsize=(6 * (len(texts) + 1), 5))
    style = {
        "budget": ("o", "C0"),
        "uniform": ("s", "C1"),
        "speed": ("D", "C2"),
        "fp32": ("*", "k"),
    }
    for ax, text in zip(axes, texts):
        for kind, (marker, color) in style.items():
            pts = [r for r in rows if r["kind"] == kind]
            if pts:
                ax.scatter(
                    [r["file_mb"] for r in pts],
                    [r["ppl"][text] for r in pts],
                    marker=marker,
                    color=color,
                    label={"budget": "QuantX budget (--budget-bpw)", "uniform": "QuantX uniform",
                           "speed": "QuantX speed budget", "fp32": "fp32"}[kind],
                )  # fmt: skip
        for r in rows:
            label = r["name"].replace("budget-", "") if r["kind"] != "fp32" else "fp32"
            ax.annotate(label, (r["file_mb"], r["ppl"][text]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["file_mb"])
        if text == texts[0] and front:
            ax.plot([r["file_mb"] for r in front], [r["ppl"][text] for r in front], "C0--", lw=1)
        if text == PEER_TEXT:
            for i, (name, mb, ppl, _) in enumerate(PEERS):
                ax.scatter([mb], [ppl], marker="x", color="C3" if "ORT" in name else "C4",
                           label="peers (recorded, FINDINGS.md)" if i == 0 else None)  # fmt: skip
                ax.annotate(name, (mb, ppl), fontsize=6, xytext=(3, -8), textcoords="offset points")
        _size_axes(ax, per_mb)
        ax.set_ylabel(f"perplexity, {Path(text).name}")
        fp = next((r["ppl"][text] for r in rows if r["kind"] == "fp32"), None)
        if fp:
            ax.set_ylim(fp * 0.95, min(max(r["ppl"][text] for r in rows), fp * 2.5) * 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for kind, (marker, color) in style.items():
        pts = [r for r in rows if r["kind"] == kind and r["decode_tok_s"]]
        ax.scatter([r["file_mb"] for r in pts], [r["decode_tok_s"] for r in pts], marker=marker,
                   color=color, label=kind)  # fmt: skip
        for r in pts:
            ax.annotate(r["name"].replace("budget-", ""), (r["file_mb"], r["decode_tok_s"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    _size_axes(ax, per_mb)
    ax.set_ylabel("decode tokens/s (measured here)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    name = Path(result["model"]).name
    fig.suptitle(f"{name}: calibrated on {Path(result['calibration']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _size_axes(ax, per_mb: float | None) -> None:
    """Log file size below, bits per quantized weight above; plain numbers on both."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ax.set_xlabel("model file (MB, log scale)")
    axes = [ax]
    if per_mb:
        top = ax.secondary_xaxis("top", functions=(lambda mb: mb * per_mb, lambda b: b / per_mb))
        top.set_xlabel("bits per quantized weight (whole file)")
        axes.append(top)
    for a in axes:
        a.xaxis.set_major_formatter(plain)
        a.xaxis.set_minor_formatter(plain)
        a.tick_params(axis="x", which="minor", labelsize=6)


def front_is_monotone(rows: list[dict], text: str) -> bool:
    """Budget points: perplexity falls as the budget rises."""
    pts = sorted((r for r in rows if r["kind"] == "budget"), key=lambda r: r["budget_bpw"])
    return all(a["ppl"][text] >= b["ppl"][text] for a, b in zip(pts, pts[1:]))


__all__ = ["run_sweep", "plan_points", "format_table", "plot", "front_is_monotone", "math"]
