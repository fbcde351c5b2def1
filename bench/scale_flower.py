"""The scale measurement of ``bench/scale.py`` on Flower's simulation engine (Ray, virtual SuperNodes).

    python -m bench.scale_flower [--nodes 10,100,1000] [--per-round 10] [--rounds 3]
                                 [--out bench/results/cpu-scale-flower]

One virtual node per training client (ShareGPT IID over threads, no unseen
clients, so N nodes hold the N clients); the same tiny random Llama and local
training as ``bench.scale``; Ray with 2 CPUs and one CPU per ClientApp actor.
Each N runs in a fresh process. Measured per N:

- total: seconds of ``run_simulation`` (Ray start, node discovery: the server
  asks every node for its profile once, the rounds, the export);
- round: the median wall time of the rounds after the first, as the fedlora strategy records
  them (round 0 also holds the profile query to every node and each Ray actor's first set-up
  of model and data: shown apart);
- peak RSS: the largest sum of RSS over this process and all its descendants
  (Ray's daemons and actors), sampled every 0.2 s.

Ratios are against the smallest N of the same invocation. Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.scale import TINY, header_lines, machine_meta, run_children, write_results

ROOT = Path(__file__).resolve().parents[1]


class TreeRSS:
    """The peak of the summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc, self.interval, self.peak_mb, self._stop = psutil.Process(), interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a process that ended between listing and reading
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._sample())

    def __enter__(self):
        self.peak_mb = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure_one(nodes: int, per_round: int, rounds: int) -> dict:
    from fedlora.integrations.flower import QUIET_ENV

    os.environ.update(QUIET_ENV)  # before flwr and ray are imported
    # Ray's workers get this process's sys.path: keep the checkout's root off it (DESIGN.md, kernels/).
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    from flwr.simulation import run_simulation

    from fedlora.integrations.flower import FlowerSettings, client_app, server_app
    from fedlora.simulation.config import SimConfig

    with tempfile.TemporaryDirectory(prefix="fedlora-scale-flower-") as tmp:
        os.environ["FLWR_HOME"] = str(Path(tmp) / "flwr-home")
        cfg = SimConfig(model=TINY, dataset="sharegpt", partition="iid", num_clients=nodes, unseen_fraction=0.0,
                        clients_per_round=per_round, rounds=rounds, local_steps=2, batch_size=2, seq_len=64,
                        eval_every=0, eval_base=False, strategy="flexlora", rank_levels=[4, 8, 16, 32],
                        output_dir=str(Path(tmp) / "out"), progress=False)
        settings = FlowerSettings(node_wait_s=1800, node_start_timeout_s=1800, round_timeout_s=1800)
        start = time.perf_counter()
        with TreeRSS() as rss:
            run_simulation(server_app(cfg, settings), client_app(cfg), num_supernodes=nodes,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": 2}})
        total = time.perf_counter() - start
        metrics = [json.loads(x) for x in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    times = [m["wall_time_s"] for m in metrics]
    later = times[1:] or times  # round 0 also waits for every actor's first set-up (model and data)
    return {"nodes": nodes, "per_round": per_round, "rounds": rounds, "total_s": round(total, 3),
            "round0_s": times[0], "round_s_median": round(statistics.median(later), 4), "round_s_all": times,
            "rounds_done": len(metrics), "accepted": [len(m["accepted"]) for m in metrics],
            "peak_tree_rss_mb": round(rss.peak_mb, 1)}


def _markdown(rows: list[dict], meta: dict) -> str:
    ref = rows[0]
    lines = [*header_lines("fedlora on Flower's simulation engine: cost against the number of virtual nodes", meta,
                           f"torch {meta['torch']}, flwr {meta['flwr']}, ray {meta['ray']}"),
             "- Ray with 2 CPUs, one CPU (one torch thread) per ClientApp actor; one virtual node per training "
             "client (ShareGPT IID over threads); tiny random Llama (d=64, 2 layers, vocabulary 260), FlexLoRA",
             f"- per round: {ref['per_round']} nodes x 2 local steps x 2 sequences x 64 tokens; "
             f"{ref['rounds']} rounds, no evaluation",
             "- total includes Ray's start, the server's one profile query to every node, the rounds and the "
             "export; peak RSS sums this process and every descendant (Ray daemons and actors)",
             "- each N in a fresh process; ratios against N = " + str(ref["nodes"]) + " of this run", "",
             "| nodes N | total s | x | round 0 s (node discovery and actor set-up included) | "
             "later rounds s (median) | x | "
             "peak RSS of the process tree MB | x |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['total_s']:.1f} | {r['total_s'] / ref['total_s']:.2f} | "
                     f"{r['round0_s']:.1f} | "
                     f"{r['round_s_median']:.3f} | {r['round_s_median'] / ref['round_s_median']:.2f} | "
                     f"{r['peak_tree_rss_mb']:.0f} | {r['peak_tree_rss_mb'] / ref['peak_tree_rss_mb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="10,100,1000")
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one N may take")
    parser.add_argument("--out", default="bench/results/cpu-scale-flower")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(measure_one(args.one, args.per_round, args.rounds)), flush=True)
        return 0
    load = os.getloadavg()  # a shared machine inflates absolute times; the ratios are the claim
    rows, failed = run_children("bench.scale_flower", [int(x) for x in args.nodes.split(",")], args, args.timeout)
    import flwr
    import ray

    meta = {**machine_meta("python -m bench.scale_flower " + " ".join(argv if argv is not None else sys.argv[1:]),
                           load), "flwr": flwr.__version__, "ray": ray.__version__, "failed": failed}
    text = _markdown(rows, meta) if rows else "# no N finished\n"
    if failed:
        text += "\n" + "\n".join(f"- N = {n}: {why}" for n, why in failed.items()) + "\n"
    write_results(args.out, rows, meta, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
