"""The `fedlora` command line."""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """A short tour of the ops on random data, each checked against a float64 reference."""
    import torch

    import fedlora
    from fedlora.ops import lora_delta, lowrank_svd, segmented_lora

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


def _simulate(args: argparse.Namespace, overrides: list[str]) -> int:
    import logging

    from fedlora.federated.config import SimConfig
    from fedlora.federated.simulation import simulate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = SimConfig.load(args.config, overrides)
    except (ValueError, OSError) as exc:
        print(f"fedlora simulate: {exc}", file=sys.stderr)
        return 2
    result = simulate(cfg)
    last = result.metrics[-1] if result.metrics else {}
    print(f"done: {len(result.metrics)} rounds, metrics {result.output_dir / 'metrics.jsonl'}, "
          f"plot {result.output_dir / 'metrics.png'}, adapter {result.adapter_dir}")
    if "eval_heldout_ppl" in last:
        print(f"final held-out perplexity {last['eval_heldout_ppl']:.3f}"
              + (f", unseen clients {last['eval_unseen_ppl']:.3f}" if "eval_unseen_ppl" in last else ""))
    return 0


def _flower(args: argparse.Namespace) -> int:
    """Helpers for running fedlora on Flower (see README, "Running fedlora on Flower")."""
    from fedlora.integrations.flower import deploy

    if args.flower_command == "env":
        print("\n".join(deploy.env_lines()))
    elif args.flower_command == "commands":
        print("\n".join(deploy.deployment_commands(args.app, args.superlink, nodes=args.nodes, fleet_port=args.port,
                                                  node_port=args.node_port, connection=args.connection,
                                                  insecure=not args.tls, certificates=args.certificates)))
    else:
        address = deploy.LOCAL_SIMULATION if args.simulation else args.address
        if address is None:
            print("fedlora flower connection: give --address HOST:PORT or --simulation", file=sys.stderr)
            return 2
        try:
            path = deploy.write_connection(args.name, address, insecure=args.insecure,
                                           root_certificates=args.root_certificates,
                                           num_supernodes=args.num_supernodes if args.simulation else None,
                                           default=args.default)
        except ValueError as exc:
            print(f"fedlora flower connection: {exc}", file=sys.stderr)
            return 2
        print(f"SuperLink connection {args.name!r} ({address}) written to {path}; "
              f"use it with: flwr run APP {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the batched multi-rank LoRA ops once on random data")
    demo.add_argument("--dim", type=int, default=512)
    demo.add_argument("--tokens", type=int, default=1024)
    demo.add_argument("--clients", type=int, default=8, choices=range(1, 9), metavar="1..8")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    sim = sub.add_parser(
        "simulate",
        help="federated LoRA fine-tuning with heterogeneous client ranks (default: SmolLM2-135M x Shakespeare, FlexLoRA)",
        description="Any setting of fedlora.federated.config.SimConfig can follow as --key value "
                    "(lists comma-separated, e.g. --rank_levels 4,8,16; --strategy_options.max_rank 8).",
    )
    sim.add_argument("--config", help="TOML file with settings (flat, or under [simulate])")
    sim.set_defaults(func=_simulate)
    flower = sub.add_parser("flower", help="run fedlora on Flower: deployment commands and SuperLink connections")
    flower.set_defaults(func=_flower)
    fsub = flower.add_subparsers(dest="flower_command", required=True)
    fsub.add_parser("env", help="print the exports that keep Flower, its runtime and Ray off the network")
    cmds = fsub.add_parser("commands", help="print the SuperLink, SuperNode and flwr commands of a deployment")
    cmds.add_argument("--app", default="examples/flower", help="the Flower app folder")
    cmds.add_argument("--superlink", default="127.0.0.1", help="host the SuperNodes reach the SuperLink at")
    cmds.add_argument("--port", type=int, default=9093, help="the SuperLink's port (Fleet and Control API)")
    cmds.add_argument("--nodes", type=int, default=2, help="SuperNodes, one per training client")
    cmds.add_argument("--node-port", type=int, default=9094, help="first SuperNode's local runtime API port")
    cmds.add_argument("--connection", default="fedlora", help="name of the SuperLink connection")
    cmds.add_argument("--tls", action="store_true", help="TLS with certificates in --certificates")
    cmds.add_argument("--certificates", default="certificates", help="folder with ca.crt, server.pem, server.key")
    conn = fsub.add_parser("connection", help="add a SuperLink connection to Flower's config ($FLWR_HOME/config.toml)")
    conn.add_argument("name")
    conn.add_argument("--address", help="the SuperLink's HOST:PORT")
    conn.add_argument("--insecure", action="store_true", help="no TLS (loopback or a trusted network only)")
    conn.add_argument("--root-certificates", help="CA certificate that signed the SuperLink's")
    conn.add_argument("--simulation", action="store_true", help="a local simulation SuperLink that flwr starts")
    conn.add_argument("--num-supernodes", type=int, default=3, help="virtual SuperNodes of a --simulation")
    conn.add_argument("--default", action="store_true", help="make it flwr's default connection")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "simulate":
        return args.func(args, extra)
    if extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
