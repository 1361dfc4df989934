"""Grids at equal bits: QuantX's scalar grid against a trellis code, the best-known family of
weight grids (QTIP's bitshift trellis), measured on real models (docs/ACCURACY.md, "A better
grid at equal bits").

    python scripts/grid_study.py mse MODEL.onnx [--L 16] [--matrices 6] [--all]
    python scripts/grid_study.py fake SRC_DIR OUT_DIR --grid ours3|ours4|t3|t4 [--L 16]
    python scripts/grid_study.py optimize SRC -o OUT [--L 12] [optimize args...]
    python scripts/grid_study.py optimize SRC -o OUT --outliers 0.005 [optimize args...]

`mse`: relative weight error ||W_hat - W||^2 / ||W||^2 of sampled weight matrices under each
grid (`--all` adds vector codes and the trellis on randomly rotated weights). `fake`: a copy
of an fp32 export with every weight MatMul replaced by its dequantized version (data-free;
tables untouched), to evaluate with `python -m quantx_onnx eval perplexity` or
`quantx_onnx.encoder_eval.compare`. `optimize`: the calibrated pipeline
with GPTQ's step replaced by block LDLQ on the trellis (the dequantized result is stored at 8
bits, whose own error is negligible: a simulation of the grid, not a format); with
`--outliers F` instead, GPTQ on our grid with the fraction F of each matrix's weights kept
exact (dense-and-sparse, as SpQR and SqueezeLLM: those with the largest Hessian-weighted
rounding error, the grid re-fitted without them).

Grids:
  ours3/ours4  QuantX's default grid, data-free: asymmetric, groups of 32, clip-searched, 4-bit
               hierarchical sub-scales under fp16 super-scales per 8 groups (3.28 / 4.31 bits)
  vq2/vq4      vector codes (--all only): 2 or 4 consecutive weights along K share one index
               into a 64- or 4096-entry codebook (k-means on RMS-normalised vectors of every
               eighth matrix), per-32 RMS scales as the trellis's (3.19 bits)
  t3rot        the trellis at k = 3 on Q_K^T W Q_N (random orthogonal Q on both sides,
               QTIP's incoherence) with one scale per matrix instead of per-32 scales (3.00)
  t3/t4        bitshift trellis: an L-bit state s_t = (s_{t-1} << k | b_t) mod 2^L per weight,
               k = 3 or 4 new bits each, weight = scale * table[s_t] with a fixed table of 2^L
               standard-normal fp16 values; scales as ours (RMS of each group of 32 times a
               per-matrix factor, rounded to 4-bit sub-scales): 3.19 / 4.19 bits, plus the
               start state (L - k bits per sequence, not charged here: 0.07 bits per weight
               for sequences of 192 at L = 16). Viterbi finds the path of least squared error.

No kernel decodes a trellis; nothing here is used by `optimize` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROUP = 32  # weights per scale along K
SUPER = 8  # groups per fp16 super-scale
SEQ = 192  # data-free trellis sequence along K (divides 384, 576, 1536)
TILE = 16  # calibrated: 16 outputs x 16 inputs per sequence of 256
FACTORS = (0.9, 1.0, 1.1, 1.2, 1.35, 1.5)  # per-matrix scale factor candidates


def _torch():
    import torch

    return torch


def trellis_table(L: int, device="cpu"):
    """The fixed code table: 2^L standard-normal values, rounded to fp16 (seed 0)."""
    torch = _torch()
    t = np.random.default_rng(0).standard_normal(1 << L).astype(np.float16).astype(np.float32)
    return torch.from_numpy(t).to(device)


def viterbi(X, table, k: int, back: bool = True):
    """Least-squares trellis paths for the rows of X [B, T] (torch). Returns the reconstructed
    rows (table values along each best path), or with ``back=False`` only the least costs [B].
    A state's predecessors share its low L - k bits; the start state is free."""
    torch = _torch()
    B, T = X.shape
    S = table.numel()
    P = S >> k
    cost = (X[:, :1] - table[None]) ** 2
    choice = torch.empty((T, B, P), dtype=torch.uint8, device=X.device) if back else None
    for t in range(1, T):
        best, arg = cost.view(B, 1 << k, P).min(1)
        if back:
            choice[t] = arg.to(torch.uint8)
        cost = best.repeat_interleave(1 << k, dim=1) + (X[:, t : t + 1] - table[None]) ** 2
    if not back:
        return cost.min(1).values
    state = cost.argmin(1)
    out = torch.empty_like(X)
    rows = torch.arange(B, device=X.device)
    for t in range(T - 1, -1, -1):
        out[:, t] = table[state]
        if t:
            low = state >> k
            state = choice[t][rows, low].long() * P + low
    return out


def hierarchical(scales: np.ndarray, bits: int = 4) -> np.ndarray:
    """Per-group scales [N, G] as stored: fp16 super-scale per SUPER groups times a ``bits``-bit
    sub-scale + 1 (the format's hierarchical scales, rtn.split_hierarchical)."""
    from quantx_onnx.format import Layout, WeightFormat
    from quantx_onnx.quantize.rtn import split_hierarchical

    N, G = scales.shape
    fmt = WeightFormat(G * GROUP, N, 3, GROUP, Layout.TILE16, scale_bits=bits, super_group=SUPER)
    return split_hierarchical(scales, fmt, np.float16)[2]


def trellis_scales(w_nk: np.ndarray, table, k: int) -> np.ndarray:
    """Per-weight scales [N, K]: each group's RMS times the factor of least weight error on one
    sample of 128 sequences (the same for every candidate), hierarchically rounded."""
    torch = _torch()
    N, K = w_nk.shape
    x = w_nk.reshape(N, K // GROUP, GROUP)
    rms = np.sqrt((x**2).mean(2)) + 1e-12
    pick = np.random.default_rng(1).choice(N * K // SEQ, min(128, N * K // SEQ), replace=False)
    best = None
    for f in FACTORS:
        per_weight = np.repeat(hierarchical(rms * f), GROUP, axis=1)
        rows = (w_nk / per_weight).reshape(-1, SEQ)[pick]
        sub = torch.from_numpy(rows.astype(np.float32)).to(table.device)
        sc = torch.from_numpy(per_weight.reshape(-1, SEQ)[pick].astype(np.float32))
        err = float((((viterbi(sub, table, k) - sub) * sc.to(table.device)) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, per_weight)
    return best[1].astype(np.float32)


def trellis_data_free(w_kn: np.ndarray, table, k: int, batch: int = 2048) -> np.ndarray:
    """W[K, N] -> dequantized trellis W_hat[K, N], sequences of SEQ along K per output."""
    torch = _torch()
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float32).T)
    N, K = w_nk.shape
    S = trellis_scales(w_nk, table, k)
    rows = torch.from_numpy((w_nk / S).reshape(-1, SEQ)).to(table.device)
    out = [viterbi(rows[i : i + batch], table, k) for i in range(0, len(rows), batch)]
    return (torch.cat(out).cpu().numpy().reshape(N, K) * S).T


def trellis_ldlq(w_kn: np.ndarray, H: np.ndarray, table, k: int) -> np.ndarray:
    """Calibrated: block LDLQ (QTIP's BlockLDLQ) with the trellis. TILE input columns at a time;
    each TILE x TILE tile of (outputs, inputs) is one trellis sequence; the block's error E
    moves the later columns by E U_bb^-1 U_b,rest (U: upper Cholesky factor of H^-1, as GPTQ)."""
    torch = _torch()
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float32).T)
    N, K = w_nk.shape
    from quantx_onnx.quantize.gptq import inverse_hessian_factor

    S = torch.from_numpy(trellis_scales(w_nk, table, k)).double()
    U, _, dead = inverse_hessian_factor(torch, H, act_order=False)  # the pipeline's dampening
    W = torch.from_numpy(w_nk).double().clone()
    W[:, dead] = 0.0
    out = torch.zeros_like(W)
    dev = table.device
    for b0 in range(0, K, TILE):
        b1 = b0 + TILE
        x = (W[:, b0:b1] / S[:, b0:b1]).reshape(N // TILE, TILE * TILE).float().to(dev)
        out[:, b0:b1] = viterbi(x, table, k).cpu().double().reshape(N, TILE) * S[:, b0:b1]
        if b1 < K:
            E = W[:, b0:b1] - out[:, b0:b1]
            W[:, b1:] -= E @ torch.linalg.solve_triangular(
                U[b0:b1, b0:b1], U[b0:b1, b1:], upper=True
            )
    return out.T.float().numpy()


def ours(w_kn: np.ndarray, bits: int) -> np.ndarray:
    """QuantX's default grid, data-free (clip search), dequantized."""
    from quantx_onnx.format import Layout, dequantize
    from quantx_onnx.recipes import Recipe, quantize_with

    recipe = Recipe(bits, GROUP, "mse", scale_bits=4, super_group=SUPER)
    return dequantize(quantize_with(recipe, w_kn, Layout.TILE16, None))


def gptq_with_outliers(w_kn: np.ndarray, H: np.ndarray, fmt, fraction: float) -> np.ndarray:
    """GPTQ (act-order and dampening as quantize/gptq.py, column by column) on our grid, the
    `fraction` of weights with the largest H_kk-weighted rounding error kept exact: their error
    is zero, so GPTQ moves only the others. Returns the dequantized W_hat[K, N]."""
    from quantx_onnx.quantize.gptq import inverse_hessian_factor
    from quantx_onnx.quantize.grid import weight_of
    from quantx_onnx.quantize.mse import clip_search
    from quantx_onnx.quantize.rtn import finish_uniform

    torch = _torch()
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float32).T)
    N, K = w_nk.shape
    d = np.diag(H).astype(np.float32)
    s, lo = clip_search(w_nk, fmt, d)
    err = (weight_of(finish_uniform(w_nk, fmt, s, lo, False, np.float16)) - w_nk) ** 2 * d
    keep = np.zeros(w_nk.size, bool)
    n_keep = int(round(fraction * w_nk.size))
    if n_keep:
        keep[np.argpartition(err.ravel(), -n_keep)[-n_keep:]] = True
    keep = keep.reshape(N, K)
    w_grid = np.where(keep, 0.0, w_nk).astype(np.float32)
    s, lo = clip_search(w_grid, fmt, d)
    grid = finish_uniform(w_grid, fmt, s, lo, False, np.float16)

    U, perm, dead = inverse_hessian_factor(torch, H)  # act-order, the pipeline's dampening
    U = U.float()
    group = torch.from_numpy(np.arange(K) // fmt.group)[perm]
    S = torch.from_numpy(grid.scales.astype(np.float32)).T[group]
    Z = torch.from_numpy(grid.effective_zero_points.astype(np.float32)).T[group]
    exact = torch.from_numpy(keep).T[perm]
    W = torch.from_numpy(w_nk).T[perm].clone()  # [K, N]: column c of W is row c here
    W[dead[perm]] = 0.0  # inputs never seen in calibration (as quantize/gptq.py)
    out = torch.empty_like(W)
    qmax = float(fmt.code_levels - 1)
    for c in range(K):  # no lazy blocks: this is a simulation, not the pipeline
        w = W[c]
        q = S[c] * (torch.clamp(torch.round(w / S[c]) + Z[c], 0.0, qmax) - Z[c])
        out[c] = torch.where(exact[c], w, q)
        W[c + 1 :] -= U[c, c + 1 :, None] * ((w - out[c]) / U[c, c])[None, :]
    return out[torch.argsort(perm)].numpy()


def grid_fn(grid: str, L: int, device: str):
    if grid in ("ours3", "ours4"):
        return lambda w: ours(w, int(grid[-1]))
    if grid in ("t3", "t4"):
        table = trellis_table(L, device)
        return lambda w: trellis_data_free(w, table, int(grid[-1]))
    raise SystemExit(f"unknown grid {grid!r} (ours3, ours4, t3, t4)")


def weight_matmuls(model):
    """(node, initializer, W[K, N]) of every MatMul whose weight is a 2-D initializer that the
    trellis sequences divide (K a multiple of SEQ, N of TILE). Gemm is left out: its B may be
    stored transposed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    seen = set()
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        init = inits[n.input[1]]
        if init.name in seen or len(init.dims) != 2:
            continue
        K, N = init.dims
        if K % SEQ or N % TILE:
            print(f"skip {n.name}: weight {init.name} {K}x{N}", file=sys.stderr)
            continue
        seen.add(init.name)
        yield n, init, numpy_helper.to_array(init).astype(np.float32)


def relative_error(w, w_hat) -> float:
    return float(((w_hat - w) ** 2).sum() / (w**2).sum())


def nearest(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook row of C for every row of X."""
    c2 = (C * C).sum(1)
    return np.concatenate(
        [(c2[None] - 2.0 * X[i : i + 16384] @ C.T).argmin(1) for i in range(0, len(X), 16384)]
    )


def normalised_vectors(w_kn: np.ndarray, dim: int):
    """(vectors [N*K/dim, dim] of W^T divided by their group's RMS, the RMS per weight)."""
    w_nk = np.ascontiguousarray(w_kn.T)
    N, K = w_nk.shape
    x = w_nk.reshape(N, K // GROUP, GROUP)
    rms = np.repeat(np.sqrt((x**2).mean(2)) + 1e-12, GROUP, axis=1)
    return (w_nk / rms).reshape(-1, dim), rms


def vector_code(mats, dim: int, entries: int):
    """k-means codebook on vectors of every eighth matrix; W -> W_hat with the best per-matrix
    scale factor (as the trellis's scales)."""
    rng = np.random.default_rng(0)
    train = []
    for _, _, w in mats[:: max(1, len(mats) // 8)]:
        v, _ = normalised_vectors(w, dim)
        train.append(v[rng.choice(len(v), min(40000, len(v)), replace=False)])
    train = np.concatenate(train)
    C = train[rng.choice(len(train), entries, replace=False)].copy()
    for _ in range(12):
        a = nearest(train, C)
        sums = np.zeros_like(C)
        np.add.at(sums, a, train)
        count = np.bincount(a, minlength=entries)[:, None]
        C = np.where(count > 0, sums / np.maximum(count, 1), C)

    def quantize(w_kn):
        v, rms = normalised_vectors(w_kn, dim)
        best = None
        for f in FACTORS:
            w_hat = (C[nearest(v / f, C)] * f).reshape(rms.shape) * rms
            err = relative_error(w_kn.T, w_hat)
            if best is None or err < best[0]:
                best = (err, w_hat)
        return best[1].T

    return quantize


def trellis_rotated(w_kn: np.ndarray, table, k: int) -> np.ndarray:
    """The trellis on Q_K^T W Q_N with one RMS scale per matrix (best factor), rotated back."""
    torch = _torch()
    rng = np.random.default_rng(0)

    def orthogonal(n):
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))

    K, N = w_kn.shape
    qk, qn = orthogonal(K), orthogonal(N)
    wr = (qk.T @ w_kn @ qn).astype(np.float32)
    sigma = float(np.sqrt((wr**2).mean()))
    rows = torch.from_numpy(np.ascontiguousarray(wr.T).reshape(-1, SEQ) / sigma).to(table.device)
    best = None
    for f in FACTORS:
        out = [viterbi(rows[i : i + 2048] / f, table, k) * f for i in range(0, len(rows), 2048)]
        w_hat = torch.cat(out).cpu().numpy().reshape(N, K).T * sigma
        err = relative_error(wr, w_hat)
        if best is None or err < best[0]:
            best = (err, w_hat)
    return qk @ best[1] @ qn.T


def cmd_mse(args) -> None:
    import onnx

    mats = list(weight_matmuls(onnx.load(args.model)))
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(mats), min(args.matrices, len(mats)), replace=False))
    grids = {g: grid_fn(g, args.L, args.device) for g in ("ours3", "ours4", "t3", "t4")}
    if args.all:
        table = trellis_table(args.L, args.device)
        grids["t3rot"] = lambda w: trellis_rotated(w, table, 3)
        grids["vq2"] = vector_code(mats, 2, 64)
        grids["vq4"] = vector_code(mats, 4, 4096)
    print("matrix | K x N | " + " | ".join(grids))
    for i in pick:
        node, init, w = mats[i]
        errs = [relative_error(w, f(w)) for f in grids.values()]
        print(f"{init.name} | {w.shape[0]}x{w.shape[1]} | " + " | ".join(f"{e:.4f}" for e in errs))


def cmd_fake(args) -> None:
    import onnx
    from onnx import numpy_helper

    from quantx_onnx.model_io import copy_companions, resolve_input

    source, dst = resolve_input(args.src), Path(args.dst)
    if source.folder is None or dst.resolve() == source.folder.resolve():
        raise SystemExit("fake: SRC_DIR must be an export folder and OUT_DIR another folder")
    dst.mkdir(parents=True, exist_ok=True)
    copy_companions(source, dst)  # tokenizer, config: what evaluation needs beside the graph
    model = onnx.load(str(source.model_path))
    quantize = grid_fn(args.grid, args.L, args.device)
    start, num, den, count = time.perf_counter(), 0.0, 0.0, 0
    for _, init, w in list(weight_matmuls(model)):
        w_hat = quantize(w)
        num += float(((w_hat - w) ** 2).sum())
        den += float((w**2).sum())
        count += 1
        init.CopyFrom(numpy_helper.from_array(w_hat.astype(np.float32), init.name))
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=model.ByteSize() > 2**31 - 1)
    print(
        f"{args.grid} (L={args.L}): {count} matrices, relative weight error {num / den:.5f}, "
        f"{time.perf_counter() - start:.0f} s -> {dst}"
    )


def cmd_optimize(args, rest: list[str]) -> int:
    """`python -m quantx_onnx optimize` with every GPTQ call replaced by trellis LDLQ at k bits
    (the recipe's bits) or, with --outliers, by GPTQ keeping that fraction exact; the result
    stored at 8 bits."""
    from quantx_onnx import recipes
    from quantx_onnx.cli import main
    from quantx_onnx.quantize.rtn import quantize_rtn

    table = trellis_table(args.L, args.device)

    def trellis_gptq(w_kn, H, fmt, base, **_):
        if args.outliers is not None:
            w_hat = gptq_with_outliers(w_kn, H, fmt, args.outliers)
        elif fmt.K % SEQ or fmt.N % TILE:  # SEQ: rows of the scale search; TILE: LDLQ tiles
            raise SystemExit(f"grid_study optimize: {fmt.K}x{fmt.N}: K must divide by {SEQ}")
        else:
            w_hat = trellis_ldlq(np.asarray(w_kn, np.float32), H, table, fmt.bits)
        stored = dataclasses.replace(fmt, bits=8, scale_bits=0, super_group=0)
        return quantize_rtn(w_hat, stored)

    recipes.quantize_gptq = trellis_gptq
    return main(["optimize", *rest, "--device", args.device])  # one device for both


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("mse", help="weight error of each grid on sampled matrices")
    p.add_argument("model")
    p.add_argument("--matrices", type=int, default=6)
    p.add_argument("--all", action="store_true", help="also vector codes and rotated trellis")
    p = sub.add_parser("fake", help="fp32 export with fake-quantized weight MatMuls")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--grid", required=True)
    p = sub.add_parser("optimize", help="optimize with GPTQ replaced by trellis LDLQ")
    p.add_argument(
        "--outliers", type=float, default=None, help="GPTQ keeping this share exact (0: none)"
    )
    for p in sub.choices.values():
        p.add_argument("--L", type=int, default=16, help="trellis state bits (default 16)")
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args, rest = ap.parse_known_args()
    if args.cmd == "optimize":
        return cmd_optimize(args, rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    {"mse": cmd_mse, "fake": cmd_fake}[args.cmd](args)
    return 0


def _cuda() -> bool:
    try:
        return _torch().cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
