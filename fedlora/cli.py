"""The `fedlora` command line."""
from __future__ import annotations

import argparse
import json
import sys


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help layout, without breaking words at hyphens (a value like ShareGPT-format stays whole)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def simulate_help() -> str:
    """``fedlora simulate --help``: generated from SimConfig's fields (type, default, allowed values, what it does)."""
    from fedlora.simulation.config import SimConfig, allowed_values, settings_by_group, type_name

    parser = argparse.ArgumentParser(
        prog="fedlora simulate", usage="fedlora simulate [--config FILE] [--print-config] [--KEY VALUE ...]",
        formatter_class=_HelpFormatter,
        description="Federated LoRA fine-tuning with heterogeneous client ranks on one machine.\n"
                    "With no settings: SmolLM2-135M-Instruct on Shakespeare role clients, FlexLoRA, ranks 4/8/16/32.",
        epilog="Settings are applied in order: defaults, then --config FILE (TOML, flat or under [simulate]),\n"
               "then --key value (or --key=value; lists comma-separated; booleans true/false).\n"
               "`fedlora simulate --print-config > run.toml` writes every setting with its default.")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings")
    parser.add_argument("--print-config", action="store_true",
                        help="print the settings (defaults, --config, overrides) as TOML and exit")
    defaults = SimConfig()
    for group, fields in settings_by_group():
        section = parser.add_argument_group(group)
        for f in fields:
            default = getattr(defaults, f.name)
            shown = (",".join(map(str, default)) if isinstance(default, list) else
                     str(default).lower() if isinstance(default, bool) else default)
            allowed = allowed_values(f)
            text = f.metadata["doc"] + (f"; {allowed}" if allowed else "") + \
                (f" (default: {shown})" if shown not in ([], {}, "") else "")
            option = f"--{f.name}" + (".NAME" if str(f.type).startswith("dict") else "")
            section.add_argument(option, metavar="VALUE" if option.endswith(".NAME") else type_name(f),
                                 help=text.replace("%", "%%"))
    return parser.format_help()


def _simulate(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.help:
        print(simulate_help(), end="")
        return 0
    import logging

    from fedlora.simulation.config import InputError, SimConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes warns on import that its optional CPU kernels package is absent: not the user's concern.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        cfg = SimConfig.load(args.config, overrides)
    except (ValueError, OSError) as exc:
        print(f"fedlora simulate: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    from fedlora.simulation import simulate

    try:
        result = simulate(cfg)
    except InputError as exc:  # the user's settings, files or model: one line; anything else is a bug
        print(f"fedlora simulate: {exc}", file=sys.stderr)
        return 2
    last = next((m for m in reversed(result.metrics) if "eval_heldout_ppl" in m), {})
    rounds = len(result.metrics)
    print(f"done: {rounds} round{'' if rounds == 1 else 's'}, metrics {result.output_dir / 'metrics.jsonl'}, "
          f"plot {result.output_dir / 'metrics.png'}, adapter {result.adapter_dir}")
    if last:
        print(f"final held-out perplexity {last['eval_heldout_ppl']:.3f}"
              + (f", unseen clients {last['eval_unseen_ppl']:.3f}" if "eval_unseen_ppl" in last else ""))
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _benchmark(args: argparse.Namespace) -> int:
    """A grid of simulate runs (--config), the tables and plots of a finished one rebuilt (--report), or its
    runs' held-out loss by client rank scored from their final checkpoints (--per-client)."""
    import logging

    from fedlora.simulation.benchmark import Grid, run_grid
    from fedlora.simulation.benchmark_report import FAILED_FILE, REPORT_FILES, write_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.max_examples is not None and args.per_client is None:
            raise ValueError("--max-examples goes with --per-client DIR")
        if args.per_client is not None:
            from fedlora.simulation.benchmark_per_client import evaluate_benchmark

            evaluate_benchmark(args.per_client, args.max_examples)
            paths = write_report(args.per_client, metric=args.metric)
        elif args.report is not None:
            paths = write_report(args.report, metric=args.metric)
        else:
            grid = Grid.load(args.config, output_dir=args.output_dir)
            if args.metric is not None:
                grid.metric = args.metric
            if args.no_progress:
                grid.progress = False
            print(f"benchmark: {len(grid.cells())} cells ({len(grid.runs())} runs) into {grid.output_dir}", flush=True)
            run_grid(grid)  # writes the report when every cell has finished or cannot run
            paths = {k: grid.output_dir / name for k, name in REPORT_FILES.items()}
            paths = {k: path for k, path in paths.items() if path.is_file()}
    except (ValueError, OSError) as exc:
        print(f"fedlora benchmark: {exc}", file=sys.stderr)
        return 2
    print("report: " + (", ".join(str(p) for p in paths.values()) or "none yet (no finished cell)"))
    if args.config is not None:
        failed = json.loads((grid.output_dir / FAILED_FILE).read_text())
        if failed:
            print(f"fedlora benchmark: {len(failed)} cell(s) could not run (results.md lists why): "
                  + ", ".join(failed), file=sys.stderr)
            return 1
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
    # Only these three are parsed here; every other --key value is a SimConfig setting, and the help that
    # lists them is generated on demand (simulate_help), so `fedlora --help` imports no torch.
    sim = sub.add_parser(
        "simulate", add_help=False,
        help="federated LoRA fine-tuning with heterogeneous client ranks (default: SmolLM2-135M x Shakespeare, "
             "FlexLoRA); `fedlora simulate --help` lists every setting",
    )
    sim.add_argument("-h", "--help", action="store_true")
    sim.add_argument("--config")
    sim.add_argument("--print-config", "--print_config", action="store_true")
    sim.set_defaults(func=_simulate)
    bench = sub.add_parser(
        "benchmark", help="a grid of simulate runs (rules x rank distributions x seeds ...) with tables and plots",
        description="--config GRID.toml runs every cell of the grid (resumable: a rerun continues where it "
                    "stopped); --report DIR rebuilds results.csv, results.md, curves.png and bars.png from DIR's "
                    "finished cells; --per-client DIR [--max-examples N] scores each finished run's held-out "
                    "examples by client rank from its final checkpoint and adds the table to the report. A grid file has [simulate] (shared settings), [grid] (setting -> list of "
                    "values; strategy may also be a baseline: bucket, homogeneous-max, or local-only: no "
                    "federation, each client trains its own adapter and is scored on its own held-out examples; "
                    "unseen clients, who have none, on the base model) and [benchmark] (output_dir, metric).")
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="the grid file (TOML)")
    what.add_argument("--report", metavar="DIR", help="rebuild the report of the benchmark in DIR")
    what.add_argument("--per-client", metavar="DIR",
                      help="score each finished run of the benchmark in DIR from its final checkpoint: held-out "
                           "loss by client rank of the base model, the global model and the model each client "
                           "receives at its rank (per_client.json in each run's folder), then rebuild the report")
    bench.add_argument("--max-examples", type=_positive_int, metavar="N",
                       help="with --per-client: how many held-out examples to score (default: each run's "
                            "eval_max_examples)")
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
