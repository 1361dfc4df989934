"""The randomized Hadamard rotation of a weight's input basis (format attribute ``rotate``).

A weight ``W[K, N]`` may be stored rotated: the node multiplies each activation row by
``Q = diag(d) H_K / sqrt(K)`` (after its ``input_scale``) and the codes hold ``W' = Q^T W``, so
``A @ W = (A Q) @ W'``. Rotating spreads every input channel's weights over all K rows, which
leaves fewer outliers in each group for a 3-bit grid to cover (QuIP's incoherence); the
rotation is orthogonal, so GPTQ sees the same problem in another basis (``Q^T H Q``).

``H_K`` is the Kronecker product of ``a`` Paley matrices of order 12 and ``b`` of order 2
(``K = 12^a * 2^b``: SmolLM2's 576 and 1536, MiniLM's and ViT-S's 384 and 1536, every power of
two); ``d`` is a fixed +-1 sequence from xorshift32, so nothing is stored. docs/FORMAT.md
("Rotated weights") is the specification; this module is its executable form (dense
matrices: the kernels apply the same transform in O(K log K)).
"""

from __future__ import annotations

import functools

import numpy as np

QUADRATIC_RESIDUES_11 = (1, 3, 4, 5, 9)
SIGN_SEED = 0x2545F491


def factors(K: int) -> list[int] | None:
    """The Kronecker factors of H_K (12s first, then 2s), or None when K is not 12^a * 2^b."""
    if K < 1:
        return None
    out = []
    while K % 12 == 0:
        out.append(12)
        K //= 12
    while K % 2 == 0:
        out.append(2)
        K //= 2
    return out if K == 1 else None


def supported(K: int) -> bool:
    return factors(K) is not None


@functools.lru_cache(maxsize=1)
def paley12() -> np.ndarray:
    """H_12 = I + S (Paley construction for q = 11)."""
    chi = np.array([0] + [1 if x in QUADRATIC_RESIDUES_11 else -1 for x in range(1, 11)])
    s = np.zeros((12, 12), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    i, j = np.meshgrid(np.arange(11), np.arange(11), indexing="ij")
    s[1:, 1:] = chi[(j - i) % 11]
    return np.eye(12, dtype=np.int64) + s


@functools.lru_cache(maxsize=16)
def signs(K: int) -> np.ndarray:
    """d[k] in {+1, -1}: the top bit of a xorshift32 state advanced once per k."""
    out = np.empty(K, np.float64)
    s = SIGN_SEED
    for k in range(K):
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        out[k] = -1.0 if s >> 31 else 1.0
    return out


@functools.lru_cache(maxsize=16)
def hadamard(K: int) -> np.ndarray:
    """H_K (entries +-1), the first Kronecker factor most significant."""
    fs = factors(K)
    if fs is None:
        raise ValueError(f"no rotation for K={K}: K must be 12^a * 2^b")
    h = np.ones((1, 1), np.int64)
    for m in fs:
        h = np.kron(h, paley12() if m == 12 else np.array([[1, 1], [1, -1]]))
    return h


@functools.lru_cache(maxsize=16)
def rotation(K: int) -> np.ndarray:
    """Q = diag(d) H_K / sqrt(K), float64 [K, K], orthogonal."""
    return signs(K)[:, None] * hadamard(K) / np.sqrt(K)


def rotate_rows(x: np.ndarray) -> np.ndarray:
    """x @ Q for rows x[..., K] (float64): what a rotated node does to its activations."""
    x = np.asarray(x, np.float64)
    return x @ rotation(x.shape[-1])


def unrotate_rows(x: np.ndarray) -> np.ndarray:
    """x @ Q^T for rows x[..., K] (float64): a rotated table's stored rows back in the basis
    its Gather returns."""
    x = np.asarray(x, np.float64)
    return x @ rotation(x.shape[-1]).T


def rotate_weight(w_kn: np.ndarray) -> np.ndarray:
    """W' = Q^T W (float64): the weight to quantize for a rotated node."""
    w = np.asarray(w_kn, np.float64)
    return rotation(w.shape[0]).T @ w


def unrotate_weight(w_kn: np.ndarray) -> np.ndarray:
    """Q W': the weight a rotated node multiplies its unrotated activations by."""
    w = np.asarray(w_kn, np.float64)
    return rotation(w.shape[0]) @ w


_TORCH_BLOCK = 128  # largest power-of-two factor torch_rotate_rows applies as one product


def _torch_blocks(K: int) -> list[int]:
    """The factors of H_K as torch_rotate_rows applies them: each 12, then the 2s merged into
    Sylvester blocks of up to _TORCH_BLOCK (a Kronecker product of factors on adjacent axes
    is the same map on the merged axis)."""
    fs = factors(K)
    twos = fs.count(2)
    blocks = [12] * (len(fs) - twos)
    step = _TORCH_BLOCK.bit_length() - 1
    while twos:
        blocks.append(2 ** min(twos, step))
        twos -= min(twos, step)
    return blocks


def torch_rotate_rows(torch, x, K: int, inverse: bool = False):
    """``rotate_rows`` for a torch tensor x[..., K]: the signs, then each Kronecker factor
    along its own axis (as the kernels do; no dense K x K product), the 2s merged into blocks
    of up to 128: in the end-to-end step's autograd on a CPU each factor costs two copies of
    the activations, so seven 2 x 2 factors took 6x the time of one 128 x 128 product.
    ``inverse``: ``unrotate_rows`` (x @ Q^T: each factor transposed, the signs last)."""
    d = torch.as_tensor(signs(K), dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    blocks = _torch_blocks(K)
    y = (x if inverse else x * d).reshape(*lead, *blocks)
    for axis, m in enumerate(blocks, start=len(lead)):
        h = hadamard(m)  # H_12 for a 12, a Sylvester block for merged 2s
        h = torch.as_tensor(h.T if inverse else h, dtype=x.dtype, device=x.device)
        y = torch.movedim(torch.movedim(y, axis, -1) @ h, -1, axis)  # y[.., j, ..] = sum_i y_i h_ij
    y = y.reshape(*lead, K) * (1.0 / np.sqrt(K))
    return y * d if inverse else y


def rotate_hessian(h: np.ndarray) -> np.ndarray:
    """Q^T H Q: the input second moment in the rotated basis."""
    q = rotation(h.shape[0])
    return q.T @ np.asarray(h, np.float64) @ q


def rotated_diagonal(h: np.ndarray) -> np.ndarray:
    """diag(Q^T H Q) with one K x K product instead of rotate_hessian's two."""
    q = rotation(h.shape[0])
    return ((np.asarray(h, np.float64) @ q) * q).sum(axis=0)
