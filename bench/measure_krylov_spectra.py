"""How many Krylov steps krylov_svd needs as the spectrum flattens, and how close it gets.

    python bench/measure_krylov_spectra.py [--n 1024 --k 64 --blocks 16,32 --tols 1e-2,1e-3,1e-4,1e-5]

No timing: for spectra of known shape on an n x n fp32 matrix (random singular
vectors, float64 reference SVD) it runs fedlora.kernels.lowrank.krylov_svd to each
tol without a dimension cap and prints, per spectrum, block size and tol, the Krylov
dimension reached, the stopping (certified) estimate and the true relative errors of
the kept product U S V^T and of S against the float64 rank-k truncation; several tols
calibrate the estimate (error / estimate must stay <= 1). Families:
  gap g     s_j = 1 / (1 + 0.02 j), divided by g past k: s_k / s_{k+1} ~ g
  power p   s_j = (1 + j)^-p: smaller p, flatter tail past k
  linear    s_j = 1 - j / n
  MP        a Gaussian matrix (Marchenko-Pastur singular values)
  clients   FlexLoRA's regime: 100 clients of ranks {4, .., 64}, Gaussian factors,
            scaling 16 / r, example weights (bench/test_bench_server.py's data)
bench/NOTES_server.md records the table.
"""
from __future__ import annotations

import argparse
import math

import torch

from fedlora.kernels import lowrank as LR


def with_spectrum(sigma: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    U = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    return (U * sigma) @ V.t()


def client_sum(n: int, clients: int, gen: torch.Generator) -> torch.Tensor:
    ranks = torch.tensor([4, 8, 16, 32, 64])[torch.randint(0, 5, (clients,), generator=gen)].tolist()
    examples = torch.randint(50, 500, (clients,), generator=gen, dtype=torch.float64)
    weights = examples / examples.sum()
    out = torch.zeros(n, n, dtype=torch.float64)
    for r, w in zip(ranks, weights.tolist()):
        A = torch.randn(r, n, generator=gen) / n**0.5
        B = torch.randn(n, r, generator=gen) / n**0.5
        out += w * 16.0 / r * (B.double() @ A.double())
    return out


def spectra(n: int, k: int, gen: torch.Generator):
    j = torch.arange(n, dtype=torch.float64)
    for g in (1.1, 1.01, 1.001):
        sigma = 1 / (1 + 0.02 * j)
        sigma[k:] /= g
        yield f"gap {g}", with_spectrum(sigma, n, gen)
    for p in (3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, 0.05):
        yield f"power {p}", with_spectrum((1 + j) ** -p, n, gen)
    yield "linear", with_spectrum(1 - j / n, n, gen)
    yield "MP", torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    yield "clients", client_sum(n, 100, gen)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--blocks", type=str, default="16,32")
    p.add_argument("--tols", type=str, default="1e-4", help="comma-separated; several calibrate the estimate")
    args = p.parse_args()
    k, gen = args.k, torch.Generator().manual_seed(0)
    tols = [float(t) for t in args.tols.split(",")]
    print("| spectrum | s_k/s_k+1 | s_2k/s_k | block | tol | Krylov dim | steps | estimate | product error "
          "| error / estimate | S error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = []
    for name, M in spectra(args.n, k, gen):
        U, S, Vh = torch.linalg.svd(M)
        T = (U[:, :k] * S[:k]) @ Vh[:k]
        for b in (int(x) for x in args.blocks.split(",")):
            for tol in tols:
                res = LR.krylov_svd(LR.DenseOperator(M.float()[None]), k, tol=tol, block=b, max_dim=args.n,
                                    generators=[torch.Generator().manual_seed(1)])
                Uk, Sk, Vk = res.U[0].double(), res.S[0].double(), res.V[0].double()
                err = (((Uk * Sk) @ Vk.t() - T).norm() / T.norm()).item()
                s_err = ((Sk - S[:k]).norm() / S[:k].norm()).item()
                est = res.estimates[0]
                worst.append((max(err, s_err) / tol, name, b, tol))
                flag = "" if res.converged[0] else " (not converged)"
                print(f"| {name} | {S[k - 1] / S[k]:.4f} | {S[2 * k - 1] / S[k - 1]:.3f} | {b} | {tol:.0e} | "
                      f"{res.dims[0]}{flag} | {res.dims[0] // b} | {est:.1e} | {err:.1e} | {err / est:.2f} | "
                      f"{s_err:.1e} |", flush=True)
    worst.sort(reverse=True)
    print("\nlargest max(product error, S error) / tol:",
          ", ".join(f"{r:.2f} ({name}, b={b}, tol={tol:.0e})" for r, name, b, tol in worst[:3]))


if __name__ == "__main__":
    main()
