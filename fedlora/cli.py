"""The `fedlora` command line."""
from __future__ import annotations

import argparse
import sys


def _simulate(args: argparse.Namespace, overrides: list[str]) -> int:
    import logging

    from fedlora.simulation.config import SimConfig
    from fedlora.simulation import simulate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = SimConfig.load(args.config, overrides)
    except (ValueError, OSError) as exc:
        print(f"fedlora simulate: {exc}", file=sys.stderr)
        return 2
    try:
        result = simulate(cfg)
    except ValueError as exc:  # a setting, file or checkpoint the run cannot use: one line naming it
        print(f"fedlora simulate: {exc}", file=sys.stderr)
        return 2
    last = result.metrics[-1] if result.metrics else {}
    print(f"done: {len(result.metrics)} rounds, metrics {result.output_dir / 'metrics.jsonl'}, "
          f"plot {result.output_dir / 'metrics.png'}, adapter {result.adapter_dir}")
    if "eval_heldout_ppl" in last:
        print(f"final held-out perplexity {last['eval_heldout_ppl']:.3f}"
              + (f", unseen clients {last['eval_unseen_ppl']:.3f}" if "eval_unseen_ppl" in last else ""))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    """A grid of simulate runs (--config), or the tables and plots of a finished one rebuilt (--report)."""
    import logging

    from fedlora.simulation.benchmark import Grid, run_grid
    from fedlora.simulation.benchmark_report import REPORT_FILES, write_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.report is not None:
            paths = write_report(args.report, metric=args.metric)
        else:
            grid = Grid.load(args.config, output_dir=args.output_dir)
            if args.metric is not None:
                grid.metric = args.metric
            if args.no_progress:
                grid.progress = False
            print(f"benchmark: {len(grid.cells())} cells ({len(grid.runs())} runs) into {grid.output_dir}", flush=True)
            run_grid(grid)  # writes the report when every cell has finished
            paths = {k: grid.output_dir / name for k, name in REPORT_FILES.items()}
            paths = {k: path for k, path in paths.items() if path.is_file()}
    except (ValueError, OSError) as exc:
        print(f"fedlora benchmark: {exc}", file=sys.stderr)
        return 2
    print("report: " + ", ".join(str(p) for p in paths.values()))
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
    sim = sub.add_parser(
        "simulate",
        help="federated LoRA fine-tuning with heterogeneous client ranks (default: SmolLM2-135M x Shakespeare, FlexLoRA)",
        description="Any setting of fedlora.simulation.config.SimConfig can follow as --key value "
                    "(lists comma-separated, e.g. --rank_levels 4,8,16; --strategy_options.max_rank 8).",
    )
    sim.add_argument("--config", help="TOML file with settings (flat, or under [simulate])")
    sim.set_defaults(func=_simulate)
    bench = sub.add_parser(
        "benchmark", help="a grid of simulate runs (rules x rank distributions x seeds ...) with tables and plots",
        description="--config GRID.toml runs every cell of the grid (resumable: a rerun continues where it "
                    "stopped); --report DIR rebuilds results.csv, results.md, curves.png and bars.png from DIR's "
                    "finished cells. A grid file has [simulate] (shared settings), [grid] (setting -> list of "
                    "values; strategy may also be bucket, homogeneous-max) and [benchmark] (output_dir, metric).")
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="the grid file (TOML)")
    what.add_argument("--report", metavar="DIR", help="rebuild the report of the benchmark in DIR")
    bench.add_argument("--output-dir", help="where the cells go (default: [benchmark] output_dir of the grid)")
    bench.add_argument("--metric", help="the tables' and plots' metric, e.g. eval_heldout_ppl, eval_unseen_loss")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars (one line per cell and round)")
    bench.set_defaults(func=_benchmark)
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
