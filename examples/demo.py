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


def demo(args: argparse.Namespace) -> int:
    """A short tour of the ops on random data, each checked against a float64 reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
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
    ref, row = [], 0
    for i, n in enumerate(seg_lens):
        A, B = (t.detach().double().cpu() for t in bank.factors(i))
        ref.append(bank.scalings[i].item() * x.detach().double().cpu()[row:row + n] @ A.t() @ B.t())
        row += n
    ref = torch.cat(ref)
    err = ((y.detach().double().cpu() - ref).norm() / ref.norm()).item()
    print(f"segmented_lora fwd+bwd, one pass for all clients: {elapsed * 1e3:.1f} ms, rel. error vs float64 {err:.1e}")

    weights = [float(n) for n in seg_lens]
    dense = sum(w / sum(weights) * s * (B.double() @ A.double()) for w, s, (A, B) in
                zip(weights, bank.scalings.tolist(), ((t.detach().cpu() for t in f) for f in factors)))
    dw = lora_delta(bank, [w / sum(weights) for w in weights])
    err = ((dw.double().cpu() - dense).norm() / dense.norm()).item()
    print(f"lora_delta  sum_i w_i s_i B_i A_i  [{d}x{d}] from R={bank.total_rank}: rel. error {err:.1e}")
    for method in ("factored", "dense"):
        start = time.perf_counter()
        U, S, V = lowrank_svd(bank, [w / sum(weights) for w in weights], rank=16, method=method)
        elapsed = time.perf_counter() - start
        print(f"lowrank_svd rank 16, {method:8s}: {elapsed * 1e3:7.1f} ms  top singular values "
              + " ".join(f"{v:.4f}" for v in S[:4].tolist()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=8, choices=range(1, 9), metavar="1..8")
    parser.add_argument("--seed", type=int, default=0)
    return demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
