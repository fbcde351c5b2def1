"""Truncated SVD of low-rank sums  M = B A  (B [m, R] already scaled, A [R, n]), batched.

Plain torch (runs on whatever device the tensors are on). Every function takes a
leading batch axis: B [G, m, R], A [G, R, n] or a dense M [G, m, n], and returns
U [G, m, k], S [G, k], V [G, n, k] with the sign convention of :func:`fix_signs`.

factored    exact: QR(B) = Qb Rb, QR(A^T) = Qa Ra, svd(Rb Ra^T) = Uc S Vc^T, then
            M = (Qb Uc) S (Qa Vc)^T. Cost 2 (m + n) R^2 + O(R^3), memory O((m + n) R);
            never forms the m x n matrix. Needs R <= min(m, n) for the reduced QR.
randomized  Halko, Martinsson & Tropp (2011), Alg. 4.4 (randomized subspace iteration):
            a Gaussian test matrix of k + oversample columns, n_iter power iterations
            with a QR after every product, then an exact SVD of the small Q^T M.
            Only needs products with M and M^T, so it runs on the factored operator
            (two skinny GEMMs per product) or on a dense matrix.
dense       torch.linalg.svd of the dense matrix (the reference / FlexLoRA's way).

Inputs are upcast to fp32 (fp64 stays fp64): QR and SVD have no 16-bit kernels and
would lose the small singular values anyway.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fix_signs(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor):
    """Make the largest-magnitude entry of every U column positive; flip V with it.

    Singular vectors are defined up to a sign per triplet; fixing it makes results
    of different methods, devices and runs directly comparable.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)  # [..., 1, k]
    sign = torch.sign(torch.gather(U, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, S, V * sign


def _truncate(U, S, Vh, k):
    return fix_signs(U[..., :k], S[..., :k], Vh[..., :k, :].transpose(-2, -1))


def factored_svd(B: torch.Tensor, A: torch.Tensor, k: int):
    """Top-k SVD of B @ A, exact, for B [G, m, R], A [G, R, n] with k <= min(m, n).

    When k > R the rank columns are zero-padded to k so Qb and Qa still have k
    orthonormal columns; the extra singular values are exactly zero.
    """
    work = work_dtype(B.dtype)
    B = B.to(work)
    A = A.to(work)
    R = B.shape[-1]
    if k > R:
        B = torch.cat([B, B.new_zeros(B.shape[0], B.shape[1], k - R)], dim=-1)
        A = torch.cat([A, A.new_zeros(A.shape[0], k - R, A.shape[2])], dim=-2)
    # Householder QR kept in compact form: Q is only ever applied to the k columns we
    # keep (ormqr, 4 m R k flops), never formed (orgqr, another ~2 m R^2).
    qb, tau_b = torch.geqrf(B)  # [G, m, R]
    qa, tau_a = torch.geqrf(A.transpose(-2, -1))  # [G, n, R]; the view is already column-major
    Rb = qb[..., : B.shape[-1], :].triu()
    Ra = qa[..., : B.shape[-1], :].triu()
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.transpose(-2, -1))
    U = _apply_q(qb, tau_b, Uc[..., :k])
    V = _apply_q(qa, tau_a, Vch[..., :k, :].transpose(-2, -1))
    return fix_signs(U, S[..., :k], V)


def _apply_q(qr: torch.Tensor, tau: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Q[:, :R] @ X for the compact Householder QR (qr [G, m, R], tau) and X [G, R, k]."""
    rows = qr.shape[-2] - X.shape[-2]
    padded = torch.cat([X, X.new_zeros(X.shape[0], rows, X.shape[-1])], dim=-2)
    return torch.ormqr(qr, tau, padded)


def dense_svd(M: torch.Tensor, k: int):
    """Top-k SVD of the dense M [G, m, n] through a full torch.linalg.svd."""
    U, S, Vh = torch.linalg.svd(M.to(work_dtype(M.dtype)), full_matrices=False)
    return _truncate(U, S, Vh, k)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y)[0]


def randomized_svd(matmul: Callable[[torch.Tensor], torch.Tensor],
                   rmatmul: Callable[[torch.Tensor], torch.Tensor],
                   shape: tuple[int, int, int], k: int, oversample: int, n_iter: int,
                   generators: list[torch.Generator], dtype: torch.dtype, device: torch.device):
    """HMT randomized SVD of an operator M [G, m, n] given X -> M X and Y -> M^T Y.

    The sketch has p = min(k + oversample, m, n) columns; batch element g draws its
    test matrix from generators[g], so its result does not depend on what else is
    in the batch. Every product is re-orthonormalised by QR before the next one:
    without it the power iterations collapse onto the top singular vector in
    floating point.
    """
    G, m, n = shape
    p = min(k + oversample, m, n)
    omega = torch.stack([torch.randn((n, p), generator=g, device=device, dtype=dtype) for g in generators])
    Q = _orth(matmul(omega))
    for _ in range(n_iter):
        Q = _orth(matmul(_orth(rmatmul(Q))))
    small = rmatmul(Q).transpose(-2, -1)  # Q^T M  [G, p, n]
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return _truncate(Q @ Us, S, Vh, k)


def randomized_svd_factored(B: torch.Tensor, A: torch.Tensor, k: int, oversample: int, n_iter: int,
                            generators: list[torch.Generator]):
    """:func:`randomized_svd` of B @ A through products with B and A only."""
    work = work_dtype(B.dtype)
    B = B.to(work)
    A = A.to(work)
    Bt = B.transpose(-2, -1)
    At = A.transpose(-2, -1)
    shape = (B.shape[0], B.shape[1], A.shape[2])
    return randomized_svd(lambda X: B @ (A @ X), lambda Y: At @ (Bt @ Y), shape, k, oversample, n_iter,
                          generators, work, B.device)


def randomized_svd_dense(M: torch.Tensor, k: int, oversample: int, n_iter: int,
                         generators: list[torch.Generator]):
    """:func:`randomized_svd` of a dense M [G, m, n]."""
    M = M.to(work_dtype(M.dtype))
    Mt = M.transpose(-2, -1)
    return randomized_svd(lambda X: M @ X, lambda Y: Mt @ Y, tuple(M.shape), k, oversample, n_iter,
                          generators, M.dtype, M.device)
