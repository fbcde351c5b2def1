"""Time the lowrank_svd methods against R / min(m, n) to set the "auto" rule.

    python bench/measure_auto_server.py [--m 1024 --n 1024 --k 64 --reps 3]

One layer, ranks drawn from {4, 8, 16, 32, 64} until R reaches the target, PEFT
scaling 16 / r, fp32 Gaussian factors (independent clients: a flat spectrum, the
slow case for krylov). Prints one line per (R / min(m, n), method) with the
best-of-reps wall time, what "auto" picks, and krylov's Krylov dimension;
bench/NOTES_server.md records the figures and the rule taken from them.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from fedlora import AdapterBank
from fedlora.ops import lowrank_svd

METHODS = ("dense", "factored", "krylov")


def bank_with_total_rank(m: int, n: int, R: int, rng: random.Random) -> AdapterBank:
    ranks = []
    while sum(ranks) < R:
        ranks.append(min(rng.choice((4, 8, 16, 32, 64)), R - sum(ranks)))
    return AdapterBank.create(n, m, ranks, [16.0] * len(ranks), init="gaussian")


def best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratios", type=str, default="0.1,0.25,0.5,0.75,0.95,1.5,2.5")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, m={args.m} n={args.n} k={args.k}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        R = max(args.k, int(ratio * min(args.m, args.n)))
        bank = bank_with_total_rank(args.m, args.n, R, rng)
        auto: dict = {}
        lowrank_svd(bank, rank=args.k, info=auto)
        for method in METHODS:
            if method == "factored" and R >= min(args.m, args.n):
                continue
            info: dict = {}
            seconds = best_time(lambda: lowrank_svd(bank, rank=args.k, method=method, info=info), args.reps)
            extra = ""
            if method == "krylov":
                layer = info["krylov"][0]
                extra = f"  {layer['operator']} operator, d = {layer['dim']}, converged {layer['converged']}"
            print(f"R/min={ratio:5.2f} R={R:5d} {method:9s} {seconds:8.3f} s{extra}"
                  f"{'   <- auto' if auto['method'] == method else ''}", flush=True)


if __name__ == "__main__":
    main()
