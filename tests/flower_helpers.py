"""Shared set-up of the Flower tests: quiet environment, a small instruction dataset, configs, an in-process Grid."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch

from fedlora.integrations.flower.config import QUIET_ENV

# Before flwr or ray is imported anywhere (flwr reads some at import); inherited by every process started.
for _key, _value in QUIET_ENV.items():
    os.environ[_key] = _value

from flwr.app import Context, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlora import simulation  # noqa: E402
from fedlora.strategies import registry  # noqa: E402
from fedlora.simulation.config import SimConfig  # noqa: E402

from .conftest import rel_err  # noqa: E402
from .test_simulation import write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower"


def write_clients_jsonl(path: Path, num_clients: int = 3, per_client: int = 8) -> Path:
    """Short instruction records of one length (they fit seq_len 48 with the byte tokenizer): test_simulation's."""
    return write_jsonl(path, num_clients, per_client)


def run_settings(dataset: Path, output_dir: Path, strategy: str = "flexlora", **kw) -> dict:
    """A two-round job on the tiny random Llama, ranks 4/8/16, every client every round, no evaluation."""
    settings = dict(model="tiny-random-llama", dataset=str(dataset), strategy=strategy, rounds=2,
                    clients_per_round=3, local_steps=3, batch_size=2, seq_len=48, lr=0.02, heldout_fraction=0.2,
                    rank_distribution="list", client_ranks=[4, 8, 16], eval_every=0, progress=False,
                    output_dir=str(output_dir))
    settings.update(kw)
    return settings


def saved_strategy(out: Path):
    """The fedlora strategy a Flower run saved in ``out``."""
    cfg = json.loads((out / "config.json").read_text())
    strategy = registry.lookup(cfg["strategy"])()
    strategy.load(out / "strategy.safetensors")
    return strategy


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_global(flower_strategy, simulated_strategy, tol: float = 1e-5) -> float:
    """Every module's global delta agrees (||diff|| / ||ref|| < tol); returns the worst relative error."""
    got, want = flower_strategy.global_deltas(), simulated_strategy.global_deltas()
    assert got.keys() == want.keys()
    worst = 0.0
    for name in want:
        assert want[name].norm() > 0, name
        worst = max(worst, rel_err(got[name], want[name]))
    assert worst < tol, worst
    return worst


def assert_identical_global(flower_strategy, simulated_strategy) -> None:
    """Every module's global delta equals the reference bit for bit.

    For runs whose arithmetic is the same operation for operation: each node trains its
    client alone, single-threaded, as simulate's sequential mode does with threads=1, and
    the server aggregates single-threaded too. IEEE-754 arithmetic is deterministic, so
    the same operations on the same operands in the same order give the same bits; any
    difference is a real divergence (other data, seeds, factors sent or aggregation).
    """
    got, want = flower_strategy.global_deltas(), simulated_strategy.global_deltas()
    assert got.keys() == want.keys()
    for name in want:
        assert want[name].norm() > 0, name
        diff = (got[name].double() - want[name].double()).norm() / want[name].double().norm()
        assert torch.equal(got[name], want[name]), f"{name}: relative difference {diff.item():.2e}"


def simulated(settings: dict, output_dir: Path, threads: int | None = None):
    """``fedlora simulate`` of the same job (written elsewhere).

    threads: torch's CPU threads for it, to match the nodes'. The reduction order of
    a matmul depends on them, and a few Adam steps turn that rounding into ~5e-5
    relative differences, so like is compared with like.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return simulation.simulate(SimConfig.from_dict(dict(settings, output_dir=str(output_dir))))
    finally:
        torch.set_num_threads(before)


class LocalGrid(Grid):
    """Flower's Grid without a runtime: messages go straight to a ClientApp, one Context per node.

    drop: node ids whose messages never get a reply (a lost node).
    tamper: (message, reply) -> reply, applied to every reply (a buggy or hostile node).
    hold: node ids whose profile replies are held back (a node whose ClientApp starts slowly)
        until :meth:`release` is called: then the next pull delivers them.
    """

    def __init__(self, app, num_nodes: int, node_config=None, drop=(), tamper=None, hold=()):
        if TaskIdentity._run_id is None:  # a real Grid's runtime sets these
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.drop, self.tamper, self.hold = app, set(drop), tamper, set(hold)
        self.contexts = {}
        for k in range(num_nodes):
            config = {"partition-id": k, "num-partitions": num_nodes, **(node_config or {}).get(k, {})}
            self.contexts[1000 + k] = Context(run_id=1, node_id=1000 + k, node_config=config, state=RecordDict(),
                                              run_config={})
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}  # pushed message id -> its reply, until pulled
        self._held: dict[str, Message] = {}

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def _reply(self, msg: Message) -> Message | None:
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as a real Grid's push does
        self.sent.append(msg)
        if msg.metadata.dst_node_id in self.drop:
            return None
        try:
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # what the runtime does with a ClientApp's exception
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        return self.tamper(msg, reply) if self.tamper else reply

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            reply = self._reply(msg)
            ids.append(msg.metadata.message_id)
            if reply is not None:
                held = msg.metadata.dst_node_id in self.hold and msg.metadata.message_type == MessageType.QUERY
                (self._held if held else self._replies)[msg.metadata.message_id] = reply
        return ids

    def release(self, node_id: int) -> None:
        """The held node's ClientApp has started: its held replies are delivered at the next pull."""
        self.hold.discard(node_id)
        for message_id in [m for m, r in self._held.items() if r.metadata.src_node_id == node_id]:
            self._replies[message_id] = self._held.pop(message_id)

    def pull_messages(self, message_ids):
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            reply = self._reply(msg)
            if reply is not None:
                replies.append(reply)
        return replies


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
