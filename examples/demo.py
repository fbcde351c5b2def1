"""A short tour of fedlora's ops on random data, each checked against a float64 reference.

    python examples/demo.py [--dim 512] [--tokens 1024] [--clients 8] [--seed 0]     (or: make demo)
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import fedlora
from fedlora.ops import lora_delta, lowrank_svd, segmented_lora


# Relative error bounds against float64: fp32 sums of d products carry about sqrt(d) * 6e-8 (1.4e-6 at
# d = 512), so 1e-4 leaves a wide margin on the CPU; on CUDA, Triton's fp32 dot may run in tf32 (10-bit
# mantissa, unit roundoff 4.9e-4), hence 1e-3 there (the same bounds as tests/conftest.py).
def tolerance(device: str) -> float:
    return 1e-3 if device == "cuda" else 1e-4


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.detach().double().cpu() - want).norm() / want.norm()).item()


class Checks:
    """Prints one PASS/FAIL line per check and counts the failures."""

    def __init__(self, tol: float):
        self.tol, self.failed, self.total = tol, 0, 0

    def __call__(self, what: str, err: float) -> None:
        ok = err < self.tol  # NaN fails too
        self.total += 1
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {what}: rel. error vs float64 {err:.1e} (bound {self.tol:.0e})")


def demo(args: argparse.Namespace) -> int:
    """A short tour of the ops on random data, each checked against a float64 reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check = Checks(tolerance(device))
    gen = torch.Generator().manual_seed(args.seed)
    ranks = [4, 8, 16, 32, 64, 8, 4, 16][: args.clients]
    d = args.dim
    factors = [(torch.randn(r, d, generator=gen) / d**0.5, torch.randn(d, r, generator=gen) / r**0.5) for r in ranks]
    bank = fedlora.AdapterBank.from_factors(factors, [16 / r for r in ranks]).to(device)
    seg_lens = [args.tokens // len(ranks)] * len(ranks)
    seg_lens[-1] += args.tokens - sum(seg_lens)
    x = torch.randn(args.tokens, d, generator=gen).to(device).requires_grad_()
    print(f"device={device}  d={d}  clients={len(ranks)} ranks={ranks}  tokens={args.tokens}")

    segmented_lora(x, bank, seg_lens).sum().backward()  # warm-up: first-call set-up stays out of the timing
    x.grad = None
    start = time.perf_counter()
    y = segmented_lora(x, bank, seg_lens)
    y.square().sum().backward()
    elapsed = time.perf_counter() - start
    # float64 reference: segment i is s_i x_i A_i^T B_i^T; d(sum y^2)/dx_i = 2 y_i (s_i B_i A_i)
    ref_y, ref_dx, row = [], [], 0
    x64 = x.detach().double().cpu()
    for i, n in enumerate(seg_lens):
        A, B = (t.detach().double().cpu() for t in bank.factors(i))
        delta = bank.scalings[i].item() * (B @ A)
        ref_y.append(x64[row:row + n] @ delta.t())
        ref_dx.append(2 * ref_y[-1] @ delta)
        row += n
    print(f"segmented_lora fwd+bwd, one pass for all clients: {elapsed * 1e3:.1f} ms")
    check("segmented_lora output", rel_err(y, torch.cat(ref_y)))
    check("segmented_lora gradient of the input", rel_err(x.grad, torch.cat(ref_dx)))

    weights = [float(n) / sum(seg_lens) for n in seg_lens]
    dense = sum(w * s * (B.double() @ A.double()) for w, s, (A, B) in
                zip(weights, bank.scalings.tolist(), ((t.detach().cpu() for t in f) for f in factors)))
    check(f"lora_delta sum_i w_i s_i B_i A_i [{d}x{d}] from R={bank.total_rank}", rel_err(lora_delta(bank, weights),
                                                                                      dense))
    top = torch.linalg.svdvals(dense)[:16]
    # the factored SVD needs R < min(d_out, d_in): fewer stacked ranks than the layer's side
    for method in ("factored", "dense") if bank.total_rank < d else ("dense",):
        start = time.perf_counter()
        U, S, V = lowrank_svd(bank, weights, rank=16, method=method)
        elapsed = time.perf_counter() - start
        print(f"lowrank_svd rank 16, {method}: {elapsed * 1e3:.1f} ms")
        check(f"lowrank_svd ({method}) top-16 singular values", rel_err(S, top))
    print(f"{check.total - check.failed} of {check.total} checks passed" if not check.failed else
          f"{check.failed} of {check.total} checks FAILED")
    return 1 if check.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=8, choices=range(1, 9), metavar="1..8")
    parser.add_argument("--seed", type=int, default=0)
    return demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
