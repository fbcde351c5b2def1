"""fedlora on Flower's real runtimes (CPU, loopback only, tiny random Llama).

* the simulation engine (Ray, ``run_simulation`` in this process): 3 nodes of ranks
  4/8/16, 2 rounds, FlexLoRA and FLoRA: the global adapter equals ``fedlora simulate``'s
  (and ``flwr run examples/flower`` in a SuperLink's simulation runtime, as a user runs it);
* the deployment engine: ``flower-superlink`` and two ``flower-supernode`` processes on
  127.0.0.1, the example app started with ``flwr run``: the same result as simulate;
  a SuperNode killed mid-round is reported missing and the round goes on.
(A ClientApp that raises mid-round: tests/test_flower.py.)

Every process started here is stopped (its process group) in a fixture's teardown.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="needs the flower extra: pip install -e '.[flower]'")
pytest.importorskip("ray", reason="needs the flower extra: pip install -e '.[flower]'")

from .flower_helpers import (  # noqa: E402  (sets the quiet Flower environment first)
    EXAMPLE,
    ROOT,
    assert_identical_global,
    read_metrics,
    run_settings,
    saved_strategy,
    simulated,
    write_clients_jsonl,
)

from fedlora.simulation.config import SimConfig  # noqa: E402
from fedlora.integrations.flower import QUIET_ENV, FlowerSettings, client_app, load_run_config, server_app  # noqa: E402

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

BIN = Path(sys.executable).parent


# ------------------------------------------------------------ simulation engine
@pytest.fixture
def ray_simulation(monkeypatch, tmp_path):
    """run_simulation(...) on this machine's CPUs, one torch thread per node.

    Ray hands this process's sys.path to its workers (as PYTHONPATH, also left in this
    process's environment): without the checkout's root on it, so that the workers'
    transformers and bitsandbytes never find kernels/ as a top-level ``kernels``
    (DESIGN.md); PYTHONPATH is restored after.
    """
    from flwr.simulation import run_simulation

    saved = os.environ.get("PYTHONPATH")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != ROOT])
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # flwr writes an id file there, even offline

    def run(cfg: SimConfig, num_nodes: int = 3):
        # One CPU per actor: Ray sets OMP_NUM_THREADS=1 in it, so torch trains each node on one thread.
        # The ServerApp runs in this process: it aggregates on one thread too (see assert_identical_global).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_simulation(server_app(cfg, FlowerSettings(node_wait_s=60, node_start_timeout_s=120,
                                                          round_timeout_s=120)),
                           client_app(cfg), num_supernodes=num_nodes,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": 2}})
        finally:
            torch.set_num_threads(threads)

    yield run
    if saved is None:
        os.environ.pop("PYTHONPATH", None)  # Ray's backend puts sys.path there for its workers
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_clients_jsonl(tmp_path_factory.mktemp("data") / "clients.jsonl")


@pytest.mark.parametrize("strategy", ["flexlora", "flora"])
def test_simulation_engine_equals_simulate(strategy, dataset, tmp_path, ray_simulation):
    """3 nodes of ranks 4/8/16, 2 rounds: the global update equals simulate's to the last bit.

    Like is compared with like: a node trains its client alone on one thread, as simulate's
    sequential mode with threads=1 does. Against the batched mode the clients' matmuls have
    other shapes, which some CPUs' kernels sum in another order, and a few Adam steps amplify
    that rounding to ~1e-5 with no bound that follows from the arithmetic (batched against
    sequential in-process: tests/test_simulation.py).
    """
    settings = run_settings(dataset, tmp_path / "flower", strategy)
    ray_simulation(SimConfig.from_dict(settings))
    reference = simulated(dict(settings, mode="sequential"), tmp_path / "sim", threads=1)
    assert_identical_global(saved_strategy(tmp_path / "flower"), reference.strategy)
    metrics = read_metrics(tmp_path / "flower")
    assert [m["accepted"] for m in metrics] == [["user0", "user1", "user2"]] * 2
    assert [m["ranks"] for m in metrics] == [[4, 8, 16]] * 2
    assert [m["bytes_up"] for m in metrics] == [m["bytes_up"] for m in reference.metrics]
    assert (tmp_path / "flower" / "adapter" / "adapter_config.json").is_file()


# ----------------------------------------------------------- deployment engine
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loopback:
    """A SuperLink (and SuperNodes) on 127.0.0.1, insecure, with their own FLWR_HOME and logs."""

    def __init__(self, root: Path, simulation: bool = False):
        self.root, self.port = root, free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env.update(QUIET_ENV, FLWR_HOME=str(root / "flwr-home"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                        OMP_NUM_THREADS="1")  # nodes train on one torch thread, as simulated(..., threads=1)
        (root / "flwr-home").mkdir(parents=True, exist_ok=True)
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n")
        self.procs: dict[str, subprocess.Popen] = {}
        self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation",
                                  *(["--simulation"] if simulation else [])])
        self._wait_healthy()

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # its own group: stopped with its children
        log.close()

    def _wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.log('superlink')[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=0.5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("flower-superlink did not become healthy")

    def start_node(self, k: int, n: int) -> None:
        self._start(f"node{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                 "--host", "127.0.0.1", "--port", str(free_port()),
                                 "--node-config", f"partition-id={k} num-partitions={n}"])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def close(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            if name in self.procs:
                self.stop(name)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run([str(BIN / "flwr"), *args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    def start_run(self, overrides: dict, *extra: str) -> str:
        values = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]  # JSON scalars are TOML scalars here
        out = self.flwr("run", str(EXAMPLE), "loopback", "--format", "json",
                        *[a for v in values for a in ("--run-config", v)], *extra)
        return json.loads(out)["run-id"]

    def status(self, run_id: str) -> dict:
        runs = json.loads(self.flwr("ls", "loopback", "--run-id", run_id, "--format", "json"))["runs"]
        return runs[0] if runs else {"status": "unknown"}

    def wait_run(self, run_id: str, out: Path, timeout: float = 150) -> dict:
        """Wait for the run's adapter in ``out`` (written last), then for flwr to call the run finished."""
        deadline, next_check = time.monotonic() + timeout, time.monotonic() + 15
        while not (out / "adapter").is_dir():
            assert time.monotonic() < deadline, f"run {run_id} unfinished after {timeout} s:\n" + \
                self.log("superlink")[-3000:]
            assert self.procs["superlink"].poll() is None, self.log("superlink")[-3000:]
            if time.monotonic() > next_check:  # fail fast on a failed run
                run, next_check = self.status(run_id), time.monotonic() + 15
                # the adapter may have been written while `flwr ls` ran (a second or more on a busy machine)
                assert not run["status"].startswith("finished") or (out / "adapter").is_dir(), \
                    (run, self.log("superlink")[-3000:])
            time.sleep(0.2)
        while not (run := self.status(run_id))["status"].startswith("finished") and time.monotonic() < deadline:
            time.sleep(0.5)
        return run


def example_reference(overrides: dict, out: Path):
    """``fedlora simulate`` of the example app's job with ``overrides``, as the app reads its settings.

    The example's clients have examples of different lengths, which simulate's batched
    mode pads to a common length across clients: other matmul shapes, other rounding,
    which Adam's first steps amplify (~1e-4 here). A node trains its client alone, as
    simulate's sequential mode does, and equals it to the last bit; so that is the
    reference. (The Ray test above uses clients of equal lengths and the batched mode.)
    """
    config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = load_run_config({**config, **overrides}, base_dir=EXAMPLE)[0]
    return simulated(dict(cfg.to_dict(), mode="sequential", progress=False), out, threads=1)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    link = Loopback(tmp_path_factory.mktemp("loopback"))
    try:
        for k in range(2):
            link.start_node(k, 2)
        yield link
    finally:
        link.close()


def test_deployment_engine_on_loopback_equals_simulate(deployment, tmp_path):
    # The example's data has 3 clients; 2 nodes hold the first 2 (num-clients=2 keeps simulate to the same 2).
    out = tmp_path / "flower"
    overrides = {"rounds": 2, "local-steps": 2, "num-clients": 2, "output-dir": str(out)}
    run_id = deployment.start_run(overrides)
    run = deployment.wait_run(run_id, out)
    assert run["status"] == "finished:completed", run
    # What `flwr log` shows of the run (the stream `flwr run` without --stream leaves to the user): fedlora's
    # first line says how to follow the run, and rounds count from 1 as Flower's own [ROUND 1/2] lines do.
    log = deployment.flwr("log", run_id, "loopback", "--show")
    fedlora_lines = [line for line in log.splitlines() if "fedlora: " in line]
    assert f"follow this run with `flwr log {run_id} [SUPERLINK]`" in fedlora_lines[0], log[-3000:]
    assert log.count("follow this run with") == 1  # once: not again through another handler
    assert "[ROUND 1/2]" in log and any("round 1: 2 of 2 nodes sampled" in line for line in fedlora_lines)
    reference = example_reference(overrides, tmp_path / "sim")
    # Nodes and the ServerApp run single-threaded (OMP_NUM_THREADS=1), as the sequential reference does.
    assert_identical_global(saved_strategy(out), reference.strategy)
    metrics = read_metrics(out)
    assert [m["accepted"] for m in metrics] == [["repeater", "shouter"]] * 2
    assert [(m["ranks"], m["bytes_up"]) for m in metrics] == [(r["ranks"], r["bytes_up"]) for r in reference.metrics]
    nodes = json.loads((out / "nodes.json").read_text())["nodes"]
    assert sorted(n["client_id"] for n in nodes.values()) == ["repeater", "shouter"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_deployment_engine_supernode_killed_mid_round(deployment, tmp_path):
    out = tmp_path / "flower"
    # A generous round timeout: the live node's ClientApp may start slowly on a busy machine, and the
    # round stops waiting for the killed node once it has left the federation (DepartureAwareGrid).
    run_id = deployment.start_run({"rounds": 1, "local-steps": 2, "num-clients": 2, "round-timeout-s": 300.0,
                                   "output-dir": str(out)})
    try:
        deadline = time.monotonic() + 120
        while not (out / "progress.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        progress = json.loads((out / "progress.json").read_text())
        assert progress["round"] == 1 and set(progress["waiting_for"]) == {"repeater", "shouter"}
        # Round 1's work has just been sent; a node needs seconds to start its ClientApp: node 1 never answers.
        deployment.stop("node1")
        run = deployment.wait_run(run_id, out)
    finally:
        if "node1" not in deployment.procs:
            deployment.start_node(1, 2)  # leave the fixture's deployment as it was
    assert run["status"] == "finished:completed", run
    (record,) = read_metrics(out)
    assert record["accepted"] == ["repeater"] and record["state_changed"] and record["rejected"] == {}
    assert set(record["missing"]) == {"shouter"}
    assert record["missing"]["shouter"].startswith(f"node {progress['waiting_for']['shouter']}")


# ------------------------------------------- flwr run, simulation runtime (Ray)
def test_flwr_run_example_in_the_simulation_runtime_equals_simulate(tmp_path):
    """`flwr run examples/flower` as a user runs it (here against a SuperLink of our own): FLoRA, 3 nodes."""
    link = Loopback(tmp_path / "sim-link", simulation=True)
    out = tmp_path / "flower"
    overrides = {"strategy": "flora", "rounds": 2, "local-steps": 2, "output-dir": str(out)}
    try:  # one CPU per virtual node: one torch thread each
        run = link.wait_run(link.start_run(overrides, "--federation-config",
                                           "num-supernodes=3 client-resources-num-cpus=1"), out)
    finally:
        link.close()
    assert run["status"] == "finished:completed", run
    reference = example_reference(overrides, tmp_path / "sim")
    assert_identical_global(saved_strategy(out), reference.strategy)  # single-threaded both sides, as above
    metrics = read_metrics(out)
    assert [m["accepted"] for m in metrics] == [["repeater", "shouter", "speller"]] * 2
    assert [m["ranks"] for m in metrics] == [[4, 8, 16]] * 2
    assert metrics[1]["bytes_down_global"] > 0  # FLoRA's global update went to the nodes
