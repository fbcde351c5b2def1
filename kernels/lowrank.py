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
krylov      block Golub-Kahan-Lanczos (block Krylov) on the operator: products with M
            and M^T only (factored: two skinny GEMMs each; or a dense M), full
            re-orthogonalisation, Rayleigh-Ritz on the projected matrix Q^T M P, and a
            stopping rule on the Ritz residuals. Matches the exact truncation to a
            stated tolerance or says that it did not (the caller then runs an exact
            method); see :func:`krylov_svd`.
dense       torch.linalg.svd of the dense matrix (the reference / FlexLoRA's way).

Inputs are upcast to fp32 (fp64 stays fp64): QR and SVD have no 16-bit kernels and
would lose the small singular values anyway.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .dispatch import work_dtype  # noqa: F401  (re-exported: LR.work_dtype)


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


# ------------------------------------------------------------------ block Krylov
def _onednn_linear():
    """torch's oneDNN fp32 linear (x @ W^T), or None where this torch build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def rows_times(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [b, p] @ weight[q, p]^T -> [b, q] (2-D; ``weight`` may be a transposed view).

    The Krylov products are skinny (b = 16..32 rows against a 1024..2703-wide factor). On
    the CPU in fp32 they go through oneDNN's linear, which runs its AVX-512 kernels where
    MKL's sgemm (torch.matmul's CPU path) does not on AMD CPUs: on the 2-core EPYC dev box
    (1 thread) 85 against 69 GF/s for 2048 x 2703 by 32, 79 against 75 GF/s for 1024^2 by
    16. Same IEEE fp32 arithmetic (oneDNN's default math mode; taken only while oneDNN's fp32
    matmul precision is IEEE, see :func:`ieee_fp32_matmul`, so no bf16/tf32 down-conversion),
    fp32 rounding of the products either way. Anything else (CUDA, fp64, no oneDNN):
    torch.matmul.
    """
    if onednn_gemm(x) and weight.dtype == torch.float32:
        return _ONEDNN_LINEAR(x, weight, None, "none", [], "")
    return x @ weight.transpose(-2, -1)


def onednn_gemm(t: torch.Tensor) -> bool:
    """Whether fp32 GEMMs on ``t`` go through oneDNN (:func:`rows_times`)."""
    return (_ONEDNN_LINEAR is not None and t.device.type == "cpu" and t.dtype == torch.float32
            and _onednn_fp32_is_ieee())


def _precision_switches() -> list:
    """torch's per-backend fp32 matmul precision switches (torch >= 2.9: CUDA's and oneDNN's
    ``matmul.fp32_precision``); [] where only the legacy global one exists."""
    switches = [getattr(getattr(torch.backends, name, None), "matmul", None) for name in ("cuda", "mkldnn")]
    return [s for s in switches if s is not None and hasattr(s, "fp32_precision")]


def _onednn_fp32_is_ieee() -> bool:
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if mkldnn is not None and hasattr(mkldnn, "fp32_precision"):
        value = mkldnn.fp32_precision
        if value == "none":  # inherits the backends-wide setting
            value = getattr(torch.backends, "fp32_precision", "none")
        return value in ("ieee", "none")
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # torch refuses to answer for a mix of the legacy and per-backend settings
        return False


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in IEEE fp32 inside the block, whatever the caller set (TF32 on CUDA, bf16
    on oneDNN), the caller's settings restored after. Krylov's certificate and the exact
    methods' accuracy assume IEEE fp32 products: under TF32 M v = s u would hold only to ~1e-3,
    and no estimate would see it. (The settings are process-wide: other threads' matmuls run
    in IEEE fp32 meanwhile.)"""
    switches = _precision_switches()
    if not switches:
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    saved = [switch.fp32_precision for switch in switches]
    try:
        for switch in switches:
            switch.fp32_precision = "ieee"
        yield
    finally:
        for switch, value in zip(switches, saved):
            switch.fp32_precision = value


class FactoredOperator:
    """M_g = B_g diag(d_g) A_g for per-layer B_g [m, R], d_g [R], A_g [R, n] (one R for all).

    Products cost 2 (m + n) R flops per column; neither the m x n matrix nor a scaled
    or stacked copy of the factors is made (the scaling acts on the R x b intermediate,
    and the layers are looped: their factors may be views of the caller's tensors).
    """

    def __init__(self, Bs: list[torch.Tensor], As: list[torch.Tensor], scales: list[torch.Tensor]):
        self.Bs, self.As, self.scales = Bs, As, [d.unsqueeze(-1) for d in scales]
        self.shape = (len(Bs), Bs[0].shape[0], As[0].shape[1])
        self.dtype, self.device = Bs[0].dtype, Bs[0].device
        self.column_flops = 2 * (self.shape[1] + self.shape[2]) * As[0].shape[0]

    # Both products in row form (X^T -> X^T A^T diag(d) B^T): every GEMM streams a factor once
    # against b rows, in the orientation rows_times runs fastest.
    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        rows = [rows_times(rows_times(x.t(), A) * d.t(), B) for B, A, d, x in zip(self.Bs, self.As, self.scales, X)]
        return torch.stack(rows).transpose(-2, -1)

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        rows = [rows_times(rows_times(y.t(), B.t()) * d.t(), A.t())
                for B, A, d, y in zip(self.Bs, self.As, self.scales, Y)]
        return torch.stack(rows).transpose(-2, -1)

    def select(self, idx: list[int]) -> FactoredOperator:
        return FactoredOperator([self.Bs[i] for i in idx], [self.As[i] for i in idx],
                                [self.scales[i].squeeze(-1) for i in idx])


class DenseOperator:
    """M [G, m, n] held densely: 2 m n flops per column of a product.

    Products go through torch.bmm (MKL's sgemm on the CPU), not oneDNN's linear: inside the
    Krylov loop oneDNN re-blocks its 4 MiB weight on every call and, in the loop, pushes M
    out of cache; measured in the loop (1024^2, b = 16, 1 thread, dev CPU) MKL's products
    took 15.1 against 16.9 ms per layer, and the re-orthogonalisation around them ran 7 %
    faster too, though alone oneDNN's product is the faster one (0.42 against 0.47 ms).
    """

    def __init__(self, M: torch.Tensor):
        self.M = M
        self.shape = tuple(M.shape)
        self.dtype, self.device = M.dtype, M.device
        self.column_flops = 2 * M.shape[1] * M.shape[2]

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.M, X)

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        # (Y^T M)^T: a transposed M operand runs ~1.8x slower in BLAS
        return torch.bmm(Y.transpose(-2, -1), self.M).transpose(-2, -1)

    def select(self, idx: list[int]) -> DenseOperator:
        return DenseOperator(self.M[idx])


# The error estimate (_estimate). The kept product is M V V^T (M v_i = s_i u_i holds
# exactly here), so its distance to the exact truncation is the error of the kept right
# subspace, weighted by the singular values. Two parts, from the Ritz values s and the
# residuals rho_i = ||M^T u_i - s_i v_i||:
#   first order   triplet i (i <= k + 1: the kept ones and their neighbour) leaks
#                 ~ rho_i s_c^2 / (s_i^2 - s_c^2) into directions outside the Krylov space,
#                 whose singular values are below s_c (the Ritz value at index
#                 c = min(d, max(2k, k + b))), on top of its own backward error:
#                 e_i = min(rho_i (2 + s_c^2 / (s_i^2 - s_c^2)), 2 s_i)
#                 (a triplet can be wrong by no more than twice its size);
#   second order  kept i and Ritz triplet j in (k, c) mix through those residuals by an
#                 angle ~ s_i rho_i s_j rho_j / ((s_i^2 - s_c^2)(s_i^2 - s_j^2)) (capped at
#                 1), costing sqrt(s_i^2 + s_j^2) x angle: large where the spectrum is
#                 locally flat across k while the boundary triplets are still unresolved.
# est = sqrt(sum e_i^2 + sum mix_ij^2) / ||S_k||; the rule compares _certified(est) with tol.
# Calibrated on 1024^2 fp32 spectra (power laws s_j = (1 + j)^-p, p = 3 .. 0.05, gaps
# s_k / s_{k+1} = 1.1 .. 1.001, linear, Marchenko-Pastur, summed client updates; blocks
# 16 and 32; tol 1e-2 .. 1e-5; bench/NOTES_server.md): the true relative error of the
# product was 0.07 .. 0.90 x the certified estimate at every stop with est >= 5e-6; below,
# fp32's own rounding floor (1e-6 .. 6e-6) dominates.
KRYLOV_LEAK_FLOOR = 2.0


@dataclass
class KrylovResult:
    """Per-layer outcome of :func:`krylov_svd`; rows of layers that did not converge are zero."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    converged: list[bool]
    dims: list[int]          # Krylov dimension (columns of P and of Q) when the layer stopped
    estimates: list[float]   # the certified error estimate there (inf when never checked)


def _extend_basis(basis_rows: torch.Tensor | None, X: torch.Tensor, last: int = 0):
    """(N, C, L) with X = basis C + N L, N orthonormal and orthogonal to the basis.

    ``basis_rows`` [G, d, len] holds the orthonormal basis as rows; ``last``: how many of
    its trailing rows X can have a component along in exact arithmetic (Golub-Kahan-
    Lanczos: M^T Q_j only touches the last P block, M P_{j+1} only the last Q block;
    0: all). Pass 1 removes those, a Householder QR normalises (X may be arbitrarily
    ill-conditioned), pass 2 runs against the whole basis on the *normalised* block: it
    removes what rounding put along the older blocks (and, when X lay (nearly) in the
    basis' span, the noise the QR amplified to unit columns). Where pass 2 moved the block
    by more than sqrt(eps), it is re-normalised by :func:`_renormalise`. Fourth output: None
    where N is orthogonal to the basis by construction, else [G] the largest |basis^T N|
    entry (see there).
    """
    if basis_rows is None:
        N, L = _qr(X)
        return N, None, L, None
    d = basis_rows.shape[-2]
    head = basis_rows if not last or last >= d else basis_rows[:, d - last:]
    C = torch.bmm(head, X)
    N, L = _qr(_minus_basis(X, C, head))
    C2 = torch.bmm(basis_rows, N)
    N = _minus_basis(N, C2, basis_rows)
    # N^T N = I - C2^T C2 (+ pass 1's Householder rounding): when pass 2 moved the block by
    # ||C2||_F <= sqrt(eps) it is already orthonormal to within eps more than that rounding,
    # and re-normalising would change nothing that matters. The usual case: a Krylov block's
    # pass 2 only removes rounding (||C2||_F ~ 1e-6 in fp32 on summed client updates).
    # One number for all layers: the Frobenius norm over the batch bounds every layer's.
    L_new, lost = L, None
    if not torch.linalg.vector_norm(C2).item() <= math.sqrt(torch.finfo(N.dtype).eps):  # NaN: re-normalise
        N, C2, L2, lost = _renormalise(N, C2, basis_rows)
        L_new = torch.bmm(L2, L)
    coef = torch.bmm(C2, L)  # the whole basis' coefficients; pass 1's only touch its last rows
    coef[:, d - C.shape[-2]:] += C
    return N, coef, L_new, lost


# Pass 2 leaves N = N1 - basis C2 with N1 orthonormal, so N^T N = I - C2^T C2 in exact
# arithmetic. When ||N^T N - I||_F <= 1/2, every singular value of N lies in
# [sqrt(1/2), sqrt(3/2)] (cond(N) <= sqrt(3)), and Cholesky QR (Gram matrix, Cholesky,
# one triangular solve: GEMM-shaped work instead of Householder's column sweeps) loses
# orthogonality only by ~eps cond(N)^2 <= 3 eps, as good as Householder (Yamamoto et al.
# 2015, CholeskyQR2). That is the normal case: pass 2 only removes rounding. Otherwise
# (noise blocks of a rank-deficient M, whose components along the basis the first QR
# amplified) N can be arbitrarily ill-conditioned: a third pass where pass 2 cancelled
# more than half of a column, then Householder. That still fails when a column was nothing
# but rounding lying in the basis' span (a Krylov space that has outgrown rank(M), e.g.
# d > R: a whole block with no new direction), whose normalisation blows the rounding back
# up to O(1) components along the basis. So that path measures what it returns: a layer
# whose block is further than LOST_ORTHOGONALITY_EPS x eps from orthogonal to its basis
# stops, unconverged, and the caller's exact method answers.
CHOLESKY_QR_MAX_DEVIATION = 0.5
LOST_ORTHOGONALITY_EPS = 64


def _renormalise(N: torch.Tensor, C2: torch.Tensor, basis_rows: torch.Tensor):
    """(N', C2', L2, lost) with N = N' L2 - basis (C2' - C2), N' orthonormal: the QR after pass 2;
    lost: None (Cholesky QR, orthogonal to the basis by construction) or [G] max |basis N'|."""
    gram = torch.bmm(N.transpose(-2, -1), N)
    eye = _eye(gram.shape[-1], gram.dtype, gram.device)
    # One number for all layers: the Frobenius norm over the batch bounds every layer's.
    if torch.dist(gram, eye.expand_as(gram)).item() <= CHOLESKY_QR_MAX_DEVIATION:
        chol, info = torch.linalg.cholesky_ex(gram)
        if not info.any().item():  # cannot fail at cond <= sqrt(3); guarded anyway, Householder follows
            L2 = chol.transpose(-2, -1)
            # N L2^-1 through the explicit b x b inverse: one GEMM (a triangular solve with many
            # rows runs 3..5x slower in BLAS), and as accurate as the solve at cond(L2) <= sqrt(3).
            inverse = torch.linalg.solve_triangular(L2, eye.expand_as(L2), upper=True)
            return torch.bmm(N, inverse), C2, L2, None
    if bool((gram.diagonal(dim1=-2, dim2=-1) < 0.25).any()):
        C3 = torch.bmm(basis_rows, N)
        N = _minus_basis(N, C3, basis_rows)
        C2 = C2 + C3
    N, L2 = _qr(N)
    return N, C2, L2, torch.bmm(basis_rows, N).abs().amax(dim=(-2, -1))


_EYES: dict = {}


def _eye(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (b, dtype, device)
    if key not in _EYES:
        _EYES[key] = torch.eye(b, dtype=dtype, device=device)
    return _EYES[key]


def _minus_basis(X: torch.Tensor, C: torch.Tensor, basis_rows: torch.Tensor) -> torch.Tensor:
    """X - basis @ C, fused, as (X^T - C^T basis_rows)^T: BLAS runs this orientation ~1.7x faster
    than one with basis_rows transposed."""
    return torch.baddbmm(X.transpose(-2, -1), C.transpose(-2, -1), basis_rows, alpha=-1).transpose(-2, -1)


def _qr(X: torch.Tensor):
    """Householder thin QR, for blocks of unknown conditioning. (Cholesky QR on those was
    tried: ~1.4x faster on 2048 x 32 blocks, but on steep spectra its eps cond(X)^2 loss of
    orthogonality broke the free residuals; it is used only where cond <= sqrt(3), above.)"""
    return torch.linalg.qr(X)


# Per block step, ~30 small torch calls (QRs of b columns, slices, the bookkeeping):
# ~0.5 ms of CPU time on the 2-core dev CPU (measured at 256^2, b = 8..32), i.e. ~5e7
# GEMM flops. It decides the small layers, where LAPACK's SVD takes a few ms.
KRYLOV_STEP_OVERHEAD_FLOPS = 5e7


def krylov_flops(m: int, n: int, dim: int, column_flops: float, block: int) -> float:
    """GEMM-equivalent flops of :func:`krylov_svd` reaching Krylov dimension ``dim`` on one layer.

    ``dim`` products with M and with M^T (``column_flops`` each per column), two
    re-orthogonalisation passes on both sides (4 (m + n) dim^2), the Ritz checks
    (eighs of d x d Gram matrices, fp64 or fp32 probes, ~30 d^3 GEMM-equivalent flops each: LAPACK's
    tridiagonal reduction runs far below GEMM speed; the checks at d <= dim sum to
    ~2 dim^3), and a fixed overhead per block step.
    """
    steps = -(-dim // block)
    return 2 * dim * column_flops + 4 * (m + n) * dim**2 + 60 * dim**3 + KRYLOV_STEP_OVERHEAD_FLOPS * steps


def krylov_svd(op, k: int, *, tol: float, block: int, max_dim: int,
               generators: list[torch.Generator]) -> KrylovResult:
    """Top-k singular triplets of the operator M [G, m, n] by block Golub-Kahan-Lanczos.

    Algorithm (one block of b columns per step, all G layers in lockstep):
      P_0 = orth(Omega), Omega [n, b] Gaussian from generators[g];
      Y = M P_j,    Y = Q C + Q_j R_j    (orthogonalised against every earlier Q block);
      X = M^T Q_j,  X = P C' + P_{j+1} L (against every earlier P block).
    The coefficients fill the projected matrix Bm = Q^T M P (d x d, d = (j+1) b),
    whose SVD Bm = U~ S V~^T gives the Ritz triplets u_i = Q u~_i, v_i = P v~_i.
    Their residuals cost nothing: M v_i - s_i u_i = 0 (every M P block was
    orthogonalised into Q) and ||M^T u_i - s_i v_i|| = ||L u~_i[last block]||.

    Stopping rule: est <= tol, est the residual-based estimate of the kept product's
    relative error described at KRYLOV_LEAK_FLOOR (the residuals rho_i of the kept
    triplets and of their neighbour k+1, each weighted by how flat the spectrum past k
    is: a flat tail leaks more). Under it the kept singular values and the kept product
    U_k S_k V_k^T match the exact rank-k truncation to ``tol`` relative (2-norm of S,
    Frobenius norm of the product), up to the truncation's own conditioning: fp32 data
    resolve the rank-k truncation only to ~1e-7 s_1 / (s_k - s_{k+1}), as does a dense
    fp32 SVD. With s_k = s_{k+1} exactly, any of the equally optimal truncations may
    come back.

    Iterations: block Lanczos theory (Saad 1980; Musco & Musco 2015) bounds the error
    after j steps by ~exp(-2 j sqrt(s_k^2 / s_c^2 - 1)), s_c the largest singular value
    whose direction the space has not captured yet (beyond the block: s_c <~ s_{k+b}).
    So the steps grow as the spectrum past k flattens, like 1 / sqrt(s_k^2 / s_c^2 - 1);
    the gap s_k / s_{k+1} alone matters little, because the neighbour k+1 converges
    along with the kept triplets (measured counts: bench/NOTES_server.md). Checks (an
    eigh of Bm Bm^T, O(d^3)) are spaced by the measured convergence rate; one the rate
    expects to miss is a probe in fp32, and every stop is certified by an fp64 check.

    Termination: at most ``max_dim`` columns (rounded down to whole blocks, and never
    more than min(m, n)); a layer that has not met the rule by then, or whose estimate
    stagnates at its working precision's floor, is returned with converged=False, and
    the caller must compute it by an exact method. Never an unflagged approximation.
    """
    G, m, n = op.shape
    dtype, device = op.dtype, op.device
    short = min(m, n)
    b = max(1, min(block, short))
    d_cap = max(b, min(max_dim, short) // b * b)
    d_need = min(k + 1, short)  # Ritz triplets the rule needs (the kept ones and their neighbour)
    U_out = torch.zeros(G, m, k, dtype=dtype, device=device)
    S_out = torch.zeros(G, k, dtype=dtype, device=device)
    V_out = torch.zeros(G, n, k, dtype=dtype, device=device)
    converged, dims, estimates = [False] * G, [0] * G, [math.inf] * G
    history: list[list[tuple[int, float]]] = [[] for _ in range(G)]
    active = list(range(G))

    omega = torch.stack([torch.randn((n, b), generator=g, device=device, dtype=dtype) for g in generators])
    # The bases are stored as rows (Qt [G, d, m], Pt [G, d, n]): a new block is one
    # contiguous write, and the basis so far a contiguous prefix. Every entry of Qt, Pt
    # and Bm[:d, :d] is written before it is read (Y steps fill the column blocks above
    # the diagonal, X steps the row blocks up to it): no zero-fill.
    Qt = torch.empty(G, d_cap, m, dtype=dtype, device=device)
    Pt = torch.empty(G, d_cap, n, dtype=dtype, device=device)
    # Bm holds what the working precision computed (fp32 coefficients lose nothing in fp32);
    # a certifying check and the Ritz vectors convert it to fp64.
    Bm = torch.empty(G, d_cap, d_cap, dtype=dtype, device=device)
    P0 = torch.linalg.qr(omega)[0]
    Pt[:, :b] = P0.transpose(-2, -1)
    Qb, _, R, _ = _extend_basis(None, op.matmul(P0))
    Qt[:, :b] = Qb.transpose(-2, -1)
    Bm[:, :b, :b] = R
    d, next_check = b, d_need
    lost_limit = LOST_ORTHOGONALITY_EPS * torch.finfo(dtype).eps
    broken: set[int] = set()  # positions in active whose basis lost orthogonality: they stop unconverged
    while active:
        X = op.rmatmul(Qt[:, d - b:d].transpose(-2, -1))
        Pn, C, L, lost = _extend_basis(Pt[:, :d], X, last=b)
        broken |= _lost(lost, lost_limit)
        Bm[:, d - b:d, :d].copy_(C.transpose(-2, -1))
        last = d + b > d_cap
        if d >= next_check or last or broken:
            probe = _is_probe(history, active, d, tol)
            done = _check(Bm[:, :d, :d], L, k, d, b, short, tol, last, history, active, broken, probe)
            broken = set()
            next_check = _next_check(history, [g for j, g in enumerate(active) if j not in done], d, b, tol)
            keep = [j for j in range(len(active)) if j not in done]
            for j, (theta, Ut) in done.items():
                g = active[j]
                dims[g] = d
                estimates[g] = _certified(history[g][-1][1], torch.finfo(dtype).eps) if history[g] else math.inf
                if theta is not None:
                    converged[g] = True
                    U_out[g], S_out[g], V_out[g] = _ritz(Qt[j, :d], Pt[j, :d], Bm[j, :d, :d].double(), theta, Ut, k)
            if done:
                if not keep:
                    break
                active = [active[j] for j in keep]
                idx = torch.tensor(keep, device=device)
                op, Qt, Pt, Bm, Pn = op.select(keep), Qt[idx], Pt[idx], Bm[idx], Pn[idx]
        if last:
            break
        Pt[:, d:d + b] = Pn.transpose(-2, -1)
        Qn, C, R, lost = _extend_basis(Qt[:, :d], op.matmul(Pn), last=b)
        broken |= _lost(lost, lost_limit)
        Bm[:, :d, d:d + b].copy_(C)
        Bm[:, d:d + b, d:d + b].copy_(R)
        Qt[:, d:d + b] = Qn.transpose(-2, -1)
        d += b
    return KrylovResult(*fix_signs(U_out, S_out, V_out), converged, dims, estimates)


def _lost(lost: torch.Tensor | None, limit: float) -> set[int]:
    return set() if lost is None else set(torch.nonzero(~(lost <= limit)).flatten().tolist())  # NaN: lost


def _check(Bd: torch.Tensor, L: torch.Tensor, k: int, d: int, b: int, short: int, tol: float, last: bool,
           history: list, active: list[int], broken: set[int] = frozenset(), probe: bool = False):
    """Ritz values and residuals of every active layer; decides who stops and when to look next.

    ``probe``: a check the schedule expects to miss (see _probe_limit) runs its eigh in fp32;
    if any layer's estimate comes out near the rule, the check is redone in fp64, so every
    stop is certified from fp64 Ritz pairs.

    Returns {position in active: (theta, U~) if converged else (None, None)} for the
    layers that stop: converged, or unconverged when this is the last allowed step, when
    their basis lost orthogonality (``broken``), or when the estimate fails to halve over
    two checks once below 1e-3 (stagnation at the rounding floor); every active layer's
    estimate is appended to its history.
    """
    eps = torch.finfo(L.dtype).eps
    c = min(d, max(2 * k, k + b, k + 1))
    probe = probe and not last and not broken and L.dtype == torch.float32
    theta, Ut, est, used = _ritz_estimate(Bd, L, k, d, b, c, torch.float32 if probe else torch.float64)
    if used == torch.float32 and _probe_inconclusive(theta, est, k, tol):
        theta, Ut, est, _ = _ritz_estimate(Bd, L, k, d, b, c, torch.float64)
    done = {}
    for j, g in enumerate(active):
        estimate = float(est[j])
        hist = history[g]
        hist.append((d, estimate))
        if j in broken or not math.isfinite(estimate):  # NaN/Inf: an overflow; the exact method decides
            done[j] = (None, None)
        elif _certified(estimate, eps) <= tol and d >= min(k + 1, short):
            done[j] = (theta[j], Ut[j])
        elif last or (len(hist) >= 3 and estimate < STAGNATION_LEVEL and estimate > 0.5 * hist[-3][1]):
            done[j] = (None, None)
    return done


def _ritz_estimate(Bd: torch.Tensor, L: torch.Tensor, k: int, d: int, b: int, c: int, precision: torch.dtype):
    """(theta [G, c] descending, U~ [G, d, min(d, k)] descending, est [G], precision used): the
    top c eigenvalues of Bm Bm^T and the top k eigenvectors from an eigh in ``precision`` (fp64
    where an fp32 one fails), and each layer's estimate. theta and est are float64 numpy arrays:
    the residuals need only the last b rows of the top c eigenvectors, and numpy's calls on
    these few thousand numbers cost ~1 us where torch's cost ~5 (the estimate is ~20 of them)."""
    Bp = Bd.to(precision)
    try:
        theta, Ut = torch.linalg.eigh(Bp @ Bp.transpose(-2, -1))
    except torch.linalg.LinAlgError:  # non-finite Bm (products that overflowed), or no convergence
        if precision != torch.float64:
            return _ritz_estimate(Bd, L, k, d, b, c, torch.float64)
        G = Bd.shape[0]
        return (np.zeros((G, c)), torch.zeros(G, d, min(d, k), dtype=torch.float64, device=Bd.device),
                np.full(G, math.inf), precision)
    top = theta[:, d - c:].double().cpu().numpy()[:, ::-1]
    last_rows = Ut[:, d - b:, d - c:].double().cpu().numpy()[:, :, ::-1]
    rho = np.linalg.norm(L.double().cpu().numpy() @ last_rows, axis=-2)
    top = np.maximum(top, 0.0)
    return top, Ut[:, :, max(d - k, 0):].flip(-1), _estimate(np.sqrt(top), rho, k, d), precision


# Probes. A check costs an eigh of the d x d matrix Bm Bm^T: in fp64, 3.3 ms at d = 224 on the
# dev CPU, as much as two block steps of a 1024^2 layer. fp64 is needed to certify a stop (the
# residuals are the last rows of the eigenvectors, and an fp32 eigh of the Gram matrix bends
# them by ~eps_32 s_1^2 / gap), not to see that a layer is still an order of magnitude away:
# a check the schedule expects to miss runs its eigh in fp32 (0.57x the time) and is redone in
# fp64 if its estimate comes out below _probe_limit. Estimates below STAGNATION_LEVEL (the
# ones the stagnation rule compares) are therefore always fp64 ones.
STAGNATION_LEVEL = 1e-3
PROBE_NEAR = 10.0


def _probe_limit(tol: float) -> float:
    return max(PROBE_NEAR * tol, STAGNATION_LEVEL)


# An fp32 eigh of the Gram matrix resolves its eigenvalues only down to ~eps_32 theta_1: kept
# values below PROBE_RESOLUTION x eps_32 x theta_1 (s_k / s_1 < ~4e-3, steep spectra) are
# noise there, and so is the probe's estimate.
PROBE_RESOLUTION = 1e3


def _probe_inconclusive(theta: np.ndarray, est: np.ndarray, k: int, tol: float) -> bool:
    """Whether an fp32 probe must be redone in fp64: some layer's estimate is at or below
    _probe_limit (or NaN), or its k-th Ritz value is below what fp32 resolves."""
    limit = _probe_limit(tol)
    if any(not e > limit for e in est.tolist()):
        return True
    kk = min(k, theta.shape[-1]) - 1
    floor = PROBE_RESOLUTION * torch.finfo(torch.float32).eps * theta[:, 0]
    return bool((theta[:, kk] <= floor).any())  # NaN theta: caught by its NaN estimate


def _is_probe(history: list, still: list[int], d: int, tol: float) -> bool:
    """Whether the check at dimension d can be a probe: each layer still running has made
    fewer than two checks (no rate yet), or the geometric rate of its last two predicts an
    estimate above _probe_limit there. A rate that does not fall predicts nothing: fp64."""
    for g in still:
        if len(history[g]) < 2:
            continue
        rate = _falling_rate(history[g])
        if rate is None or not rate[1] + rate[2] * (d - rate[0]) > math.log(_probe_limit(tol)):
            return False
    return True


def _falling_rate(hist: list[tuple[int, float]]) -> tuple[int, float, float] | None:
    """(d1, log e1, d log e / d d) of the last two checks' geometric rate, or None where there
    are fewer than two or the estimate did not fall (nothing can be predicted from it)."""
    if len(hist) < 2 or not 0 < hist[-1][1] < hist[-2][1]:
        return None
    (d0, e0), (d1, e1) = hist[-2], hist[-1]
    return d1, math.log(e1), math.log(e1 / e0) / (d1 - d0)


def _estimate(s: np.ndarray, rho: np.ndarray, k: int, d: int) -> np.ndarray:
    """[G] estimated relative error of the kept product from Ritz values s and residuals rho
    ([G, c] float64, descending, c = min(d, max(2k, k + b))); see KRYLOV_LEAK_FLOOR. NaN in,
    NaN out (an overflow certifies nothing)."""
    with np.errstate(all="ignore"):  # overflow and NaN stay in the result, as torch's would, unannounced
        return _estimate_terms(s, rho, k, d)


def _estimate_terms(s: np.ndarray, rho: np.ndarray, k: int, d: int) -> np.ndarray:
    tiny = np.finfo(np.float64).tiny
    c = s.shape[-1]
    s2 = s * s
    # Out-of-space directions lie below s_c (the Ritz value at index c) once the space is past it.
    s_c2 = s2[:, c - 1:] if d > k + 1 else np.zeros_like(s2[:, :1])
    need = min(k + 1, c)
    first = np.minimum(rho[:, :need] * (KRYLOV_LEAK_FLOOR + s_c2 / np.maximum(s2[:, :need] - s_c2, tiny)),
                       2 * s[:, :need])
    # Second order: kept triplet i and a Ritz triplet j in (k, c) mix through the residuals,
    # by ~ s_i rho_i s_j rho_j / ((s_i^2 - s_c^2)(s_i^2 - s_j^2)); it matters where the
    # spectrum is locally flat across k (steep power laws), and costs ~ s * angle.
    sr = s * rho
    num = sr[:, :k, None] * sr[:, None, k + 1:c]
    sk2, sj2 = s2[:, :k, None], s2[:, None, k + 1:c]
    den = (sk2 - s_c2[:, :, None]) * (sk2 - sj2)
    angle = np.where(num > 0, np.minimum(num / np.maximum(den, tiny), 1.0), 0.0)
    kept = np.linalg.norm(s[:, :k], axis=-1)
    est = np.sqrt((first * first).sum(-1) + ((sk2 + sj2) * angle * angle).sum((-2, -1))) / np.maximum(kept, tiny)
    return np.where(kept == 0, 0.0, est)  # M = 0: exact (NaN stays NaN)


def _certified(est: float, eps: float) -> float:
    """The error an estimate certifies: far from convergence (est ~1e-2) the first-order
    estimate alone once ran 1.3x low, and (1 + 50 est) keeps a margin there (1.005 at
    1e-4); below 16 eps of the working precision the data's own rounding dominates, so
    nothing smaller is certified. A NaN or Inf estimate (an overflowing product) certifies
    nothing."""
    if not math.isfinite(est):
        return math.inf
    return max(est * (1 + 50 * est), 16 * eps) if est > 0 else 0.0


def _next_check(history: list, still: list[int], d: int, b: int, tol: float) -> int:
    """The Krylov dimension of the next check for the layers ``still`` running.

    Half-way to where the last two checks' geometric rate reaches tol, rounded to the
    nearest block: Krylov convergence speeds up, so the rate measured so far over-predicts
    (on summed client updates, 1024^2 and 2048^2, k = 64, the extrapolation asked for
    1.8..2.2x the columns the layer then needed). At least one block, at most doubling
    the dimension (early rates are the least reliable). A miss costs one more check a
    block later; each check is an eigh of d x d, so they are spent sparingly.
    """
    ahead = []
    for g in still:
        rate = _falling_rate(history[g])
        if rate is None:
            return d + b
        d1, log_e1, slope = rate
        ahead.append((math.log(tol) - log_e1) / slope / 2)
    if not ahead:
        return d + b
    return d + max(b, min(round(min(ahead) / b), d // b) * b)


def _ritz(Qt: torch.Tensor, Pt: torch.Tensor, Bd: torch.Tensor, theta: torch.Tensor, Ut: torch.Tensor, k: int):
    """(U, S, V) of one layer from its bases (as rows) and the eigenpairs of Bm Bm^T (fp64)."""
    s = torch.from_numpy(np.sqrt(theta[:k])).to(Bd.device)
    if s[-1] <= 1e-6 * s[0] or s[0] == 0:
        # Tiny or zero kept values: V~ = Bm^T U~ / s loses orthogonality; take the SVD of Bm.
        Us, s, Vsh = torch.linalg.svd(Bd)
        Uk, Vk, s = Us[:, :k], Vsh[:k].transpose(-2, -1), s[:k]
    else:
        Uk = Ut.double()
        Vk = (Bd.transpose(-2, -1) @ Uk) / s
    # (X^T basis_rows)^T: BLAS runs this orientation ~1.4x faster than basis_rows^T X.
    return (Uk.t().to(Qt.dtype) @ Qt).t(), s.to(Qt.dtype), (Vk.t().to(Pt.dtype) @ Pt).t()
