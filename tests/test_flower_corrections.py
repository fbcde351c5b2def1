"""Server optimizers, FedProx and SCAFFOLD on Flower (in-process Grid) against ``fedlora simulate``:
the same global result and bytes; each node keeps its own c_k in its context; a malformed Delta c_k
rejects that node's upload with a reason and the round goes on."""
from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="needs the flower extra: pip install -e '.[flower]'")

from .flower_helpers import LocalGrid, assert_same_global, run_settings, simulated, write_clients_jsonl  # noqa: E402

import torch  # noqa: E402
from flwr.app import Message, MessageType  # noqa: E402

from fedlora.integrations.flower import client_app, run_server  # noqa: E402
from fedlora.integrations.flower.wire import CONTROLS, controls_record, decode_controls, decode_train  # noqa: E402
from fedlora.simulation.config import SimConfig  # noqa: E402

from .test_flower import FAST  # noqa: E402

RUNS = {
    # HetLoRA with its rank self-pruning on: a node's c_k follows its shrinking rank
    "hetlora-scaffold-prox-adam": ("hetlora", dict(scaffold=True, prox_mu=0.05, rounds=4, strategy_options={
        "server_opt": "adam", "server_lr": 0.05, "prune_gamma": 0.5, "prune_lambda": 0.5})),
    "ffalora-scaffold-avgm": ("ffalora", dict(scaffold=True, strategy_options={"server_opt": "avgm"})),
    # RoLoRA: B rounds and A rounds, each moving its own factor's c and moments
    "rolora-scaffold-prox-adam": ("rolora", dict(scaffold=True, prox_mu=0.1, rounds=3, strategy_options={
        "server_opt": "adam", "server_lr": 0.05})),
    # FedSA-LoRA: c on the shared A only (B stays with each client)
    "fedsalora-scaffold-adagrad": ("fedsalora", dict(scaffold=True, rank_distribution="homogeneous", strategy_options={
        "server_opt": "adagrad", "server_lr": 0.05})),
    "flexlora-prox-yogi": ("flexlora", dict(prox_mu=0.1, strategy_options={"server_opt": "yogi",
                                                                             "server_lr": 0.1})),
    "flora-prox-avgm": ("flora", dict(prox_mu=0.1, strategy_options={"server_opt": "avgm", "server_lr": 0.8})),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_clients_jsonl(tmp_path_factory.mktemp("data") / "clients.jsonl")


def _flower(settings, **grid_kw):
    cfg = SimConfig.from_dict(settings)
    grid = LocalGrid(client_app(cfg), 3, **grid_kw)
    return run_server(grid, cfg, FAST), grid


@pytest.mark.parametrize("run", list(RUNS))
def test_flower_equals_simulate(run, dataset, tmp_path):
    strategy, extra = RUNS[run]
    settings = run_settings(dataset, tmp_path / "flower", strategy, **extra)
    wrapper, grid = _flower(settings)
    reference = simulated(settings, tmp_path / "sim")
    if strategy == "fedsalora":  # no global product (each client keeps its B): the shared A
        for name in reference.strategy.module_shapes:
            got, want = wrapper.strategy._tensors[f"{name}.A"], reference.strategy._tensors[f"{name}.A"]
            assert (got - want).norm() / want.norm() < 1e-5, name
    else:
        assert_same_global(wrapper.strategy, reference.strategy)
    for got, want in zip(wrapper.history, reference.metrics, strict=True):
        for key in ("clients", "trained_ranks", "accepted", "rejected", "bytes_up", "bytes_down"):
            assert got[key] == want[key], key
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    if strategy == "hetlora":  # the clients pruned their ranks after round 2: c_k is cut to the new rank
        assert wrapper.history[-1]["trained_ranks"] == [2, 4, 8]
    # the server's c (and the optimizer's moments) in the saved state match simulate's
    for key, value in reference.strategy._tensors.items():
        if key.startswith(("scaffold.", "server_opt.")):
            assert torch.allclose(wrapper.strategy._tensors[key], value, rtol=1e-4, atol=1e-6), key
    if settings.get("scaffold"):
        # every node keeps its own c_k (the server never holds it), and c goes down with the factors
        kept = [decode_controls(c.state) for c in grid.contexts.values()]
        assert all(k is not None and all(t.norm() > 0 for pair in k.values() for t in pair if t is not None)
                   for k in kept)
        train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
        assert all(decode_train(m.content).controls is not None for m in train)


def test_a_malformed_control_change_rejects_the_node(dataset, tmp_path):
    def tamper(msg, reply):
        if msg.metadata.message_type != MessageType.TRAIN:
            return reply
        node, round_idx = msg.metadata.dst_node_id, decode_train(msg.content).round
        delta = decode_controls(reply.content)
        if round_idx == 0 and node == 1001:  # one rank too many
            delta = {n: (a, torch.cat([b, b[:, :1]], dim=1)) for n, (a, b) in delta.items()}
        elif round_idx == 0 and node == 1002:  # a NaN
            delta = {n: (a, b * float("nan")) for n, (a, b) in delta.items()}
        elif round_idx == 1 and node == 1000:  # none at all
            del reply.content[CONTROLS]
            return reply
        else:
            return reply
        reply.content[CONTROLS] = controls_record(delta)
        return Message(reply.content, reply_to=msg)

    settings = run_settings(dataset, tmp_path, "hetlora", scaffold=True,
                            strategy_options={"self_prune": False})
    wrapper, _ = _flower(settings, tamper=tamper)
    first, second = wrapper.history
    assert first["accepted"] == ["user0"] and first["state_changed"]
    # refused from its declared shape before it is read (wire), or by the strategy's control_problem
    assert "the rank sent" in first["rejected"]["user1"] or "(the rank it was sent)" in first["rejected"]["user1"]
    assert "is not finite" in first["rejected"]["user2"]
    assert second["accepted"] == ["user1", "user2"]
    assert "no control variate change (SCAFFOLD)" in second["rejected"]["user0"]
