"""fedlora on Flower without a Flower runtime: the strategy wrapper and the ClientApp over an in-process Grid.

Results against ``fedlora simulate``, the factors each node gets, malformed replies,
missing nodes, bytes accounting, the run config, the example app and the CLI helpers.
"""
from __future__ import annotations

import json
import logging
import math

import pytest

pytest.importorskip("flwr", reason="needs the flower extra: pip install -e '.[flower]'")

from .flower_helpers import (  # noqa: E402  (sets the quiet Flower environment first)
    EXAMPLE,
    LocalGrid,
    assert_same_global,
    run_settings,
    simulated,
    tensor_bytes,
    write_clients_jsonl,
)
from .conftest import rel_err  # noqa: E402

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, MessageType  # noqa: E402

from fedlora.cli import main  # noqa: E402
from fedlora.simulation.config import SimConfig  # noqa: E402
from fedlora.federated.update import ClientUpdate  # noqa: E402
from fedlora.integrations.flower import FlowerSettings, client_app, load_run_config, run_server  # noqa: E402
from fedlora.integrations.flower.wire import (  # noqa: E402
    UPDATE,
    decode_reply,
    decode_train,
    encode_reply,
    encode_train,
    global_arrays,
)
from fedlora.simulation.personal import PersonalStore  # noqa: E402
from fedlora.strategies import FLoRA  # noqa: E402
from fedlora.strategies.base import merge_parts  # noqa: E402

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

FAST = FlowerSettings(node_wait_s=1.0, node_start_timeout_s=1.0, round_timeout_s=30.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_clients_jsonl(tmp_path_factory.mktemp("data") / "clients.jsonl")


def flower_run(settings: dict, grid_kw: dict | None = None, before_train=None):
    """run_server over a LocalGrid of 3 nodes; returns (wrapper, grid)."""
    cfg = SimConfig.from_dict(settings)
    grid = LocalGrid(client_app(cfg, before_train=before_train), 3, **(grid_kw or {}))
    return run_server(grid, cfg, FAST), grid


RUNS = {"flexlora": {}, "flora": {}, "hetlora": {}, "ffalora": {}, "rolora": {}, "fedsvd": {}, "lorafair": {},
        "fedavg": {"strategy_options": {"heterogeneous": "bucket"}},
        "flora-nf4": {"quantization": "nf4"},  # FLoRA's global update beside a 4-bit base on every node
        # FedEx-LoRA needs one rank; its residual goes to the nodes as factors, beside a 4-bit base
        "fedexlora-nf4": {"quantization": "nf4", "client_ranks": [8, 8, 8]}}


@pytest.mark.parametrize("run", list(RUNS))
def test_in_process_run_equals_simulate(run, dataset, tmp_path):
    strategy, _, quantization = run.partition("-")
    if quantization:
        pytest.importorskip("bitsandbytes", reason="needs the quant extra")
    settings = run_settings(dataset, tmp_path / "flower", strategy, **RUNS[run])
    wrapper, _ = flower_run(settings)
    reference = simulated(settings, tmp_path / "sim")
    worst = assert_same_global(wrapper.strategy, reference.strategy)
    print(f"{run}: max relative difference of the global deltas {worst:.1e}")
    for got, want in zip(wrapper.history, reference.metrics, strict=True):
        for key in ("round", "clients", "ranks", "trained_ranks", "accepted", "rejected", "bytes_up", "bytes_down",
                    "bytes_down_global"):
            assert got[key] == want[key], key
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["missing"] == {} and got["state_changed"]
    assert (tmp_path / "flower" / "adapter" / "adapter_model.safetensors").is_file()


def test_hetlora_self_pruning_on_flower_equals_simulate(dataset, tmp_path):
    """Each node keeps its tail norm in its context and prunes as simulate's client would; the server then
    serves the node its pruned rank."""
    settings = run_settings(dataset, tmp_path / "flower", "hetlora", rounds=4,
                            strategy_options={"prune_gamma": 0.5, "prune_lambda": 0.5})
    wrapper, _ = flower_run(settings)
    reference = simulated(settings, tmp_path / "sim")
    assert any("self_pruned" in m for m in reference.metrics)
    for got, want in zip(wrapper.history, reference.metrics, strict=True):
        assert got.get("self_pruned") == want.get("self_pruned")
        assert got["trained_ranks"] == want["trained_ranks"] and got["accepted"] == want["accepted"]
    assert_same_global(wrapper.strategy, reference.strategy)


def test_factors_sent_match_each_nodes_rank(dataset, tmp_path):
    """Node 1 overrides its rank with node_config; every node gets (and trains) factors of its own rank."""
    settings = run_settings(dataset, tmp_path, "flexlora")
    wrapper, grid = flower_run(settings, {"node_config": {1: {"rank": 2}}})
    rank_of = {1000: 4, 1001: 2, 1002: 16}
    shapes = wrapper.strategy.module_shapes
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == 6  # 3 nodes x 2 rounds
    for msg in train:
        task = decode_train(msg.content)
        rank = rank_of[msg.metadata.dst_node_id]
        assert set(task.factors) == set(shapes)
        for name, (A, B, alpha) in task.factors.items():
            d_out, d_in = shapes[name]
            assert A.shape == (rank, d_in) and B.shape == (d_out, rank)
            assert alpha == 2.0 * rank  # simulate's default alpha
    assert [m["ranks"] for m in wrapper.history] == [[4, 2, 16]] * 2
    assert [m["trained_ranks"] for m in wrapper.history] == [[4, 2, 16]] * 2
    assert {p.client_id: p.rank for p in wrapper.profiles.values()} == {"user0": 4, "user1": 2, "user2": 16}


def _replace_update(instruction: Message, reply: Message, edit) -> Message:
    update = decode_reply(reply.content)
    edit(update)
    return Message(encode_reply(update), reply_to=instruction)


def test_malformed_replies_are_rejected_and_the_round_goes_on(dataset, tmp_path):
    def nan_B(update):
        name = sorted(update.modules)[0]
        A, B, alpha = update.modules[name]
        B = B.clone()
        B[0, 0] = float("nan")
        update.modules[name] = (A, B, alpha)

    def other_client(update):
        update.client_id = "user2"

    def tamper(msg, reply):
        round_idx = decode_train(msg.content).round if msg.metadata.message_type == MessageType.TRAIN else None
        node = msg.metadata.dst_node_id
        if round_idx == 0 and node == 1001:  # not safetensors at all
            reply.content[UPDATE] = ArrayRecord({"update": Array(dtype="uint8", shape=(5,), stype="fedlora.update",
                                                                 data=b"\x00garbage")})
        elif round_idx == 0 and node == 1002:  # well-formed, but a NaN in B: the strategy's validation says no
            reply = _replace_update(msg, reply, nan_B)
        elif round_idx == 1 and node == 1000:  # pretends to be another client
            reply = _replace_update(msg, reply, other_client)
        elif round_idx == 1 and node == 1001:  # no update record
            del reply.content[UPDATE]
        return reply

    wrapper, _ = flower_run(run_settings(dataset, tmp_path, "flexlora"), {"tamper": tamper})
    first, second = wrapper.history
    assert first["accepted"] == ["user0"] and first["state_changed"] and math.isfinite(first["train_loss"])
    assert set(first["rejected"]) == {"user1", "user2"} and first["missing"] == {}
    assert first["rejected"]["user1"].startswith("malformed reply from node 1001:")
    assert "non-finite" in first["rejected"]["user2"]
    assert second["accepted"] == ["user2"] and second["state_changed"]
    assert "node 1000 holds client 'user0' but sent an update of 'user2'" in second["rejected"]["user0"]
    assert "has no 'fedlora.update' record" in second["rejected"]["user1"]
    assert first["payload_bytes_up"] > 0 and second["payload_bytes_up"] > 0


def test_failed_and_lost_nodes_are_missing_and_the_round_goes_on(dataset, tmp_path):
    def crash(context, task):
        if context.node_config["partition-id"] == 1 and task.round == 1:
            raise RuntimeError("out of memory")

    wrapper, _ = flower_run(run_settings(dataset, tmp_path, "flora"), {"drop": {1002}}, before_train=crash)
    # Node 1002 never answers, not even the profile query: it is left out of the run with a reason.
    assert wrapper.node_errors == {1002: "no profile reply"}
    first, second = wrapper.history
    assert first["clients"] == ["user0", "user1"] and first["accepted"] == ["user0", "user1"]
    assert second["accepted"] == ["user0"] and second["state_changed"] and second["rejected"] == {}
    assert set(second["missing"]) == {"user1"}
    assert "node 1001 failed" in second["missing"]["user1"] and "out of memory" in second["missing"]["user1"]


def test_a_node_that_profiles_late_joins_the_next_round(dataset, tmp_path, caplog):
    """Node 1002's ClientApp starts slower than node_start_timeout_s: round 0 goes on without it; its
    profile arrives during round 0 (released when node 1000 trains) and it trains from round 1."""
    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora", rounds=3))
    grid = None

    def slow_start_ends(context, task):
        if context.node_id == 1000 and task.round == 0:
            grid.release(1002)

    grid = LocalGrid(client_app(cfg, before_train=slow_start_ends), 3, hold={1002})
    with caplog.at_level("WARNING", logger="fedlora.flower"):
        wrapper = run_server(grid, cfg, FAST)
    assert [m["clients"] for m in wrapper.history] == [["user0", "user1"], ["user0", "user1", "user2"],
                                                        ["user0", "user1", "user2"]]
    assert all(m["state_changed"] and not m["rejected"] and not m["missing"] for m in wrapper.history)
    assert wrapper.node_errors == {} and sorted(wrapper.profiles) == [1000, 1001, 1002]
    console = [r.getMessage() for r in caplog.records]
    assert "node 1002 left out: no profile reply within 1 s; it joins the first round after it answers" in console
    assert "node 1002 answered its profile query late; it joins from the next round" in console
    nodes = json.loads((tmp_path / "nodes.json").read_text())
    assert nodes["left_out"] == {} and nodes["nodes"]["1002"]["client_id"] == "user2"


def test_a_node_that_never_profiles_is_reported_on_the_console(dataset, tmp_path, caplog):
    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora", rounds=1))
    with caplog.at_level("WARNING", logger="fedlora.flower"):
        wrapper = run_server(LocalGrid(client_app(cfg), 3, hold={1001}), cfg, FAST)
    assert wrapper.node_errors == {1001: "no profile reply"}
    assert wrapper.history[0]["clients"] == ["user0", "user2"]
    console = [r.getMessage() for r in caplog.records]
    assert "fedlora on Flower: 1 node(s) left out of the run: node 1001: no profile reply" in console
    assert json.loads((tmp_path / "nodes.json").read_text())["left_out"] == {"1001": "no profile reply"}


def test_a_node_lost_after_its_profile_is_missing(dataset, tmp_path):
    class LoseNode(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
                self.drop = {1001}
            return super().push_messages(messages)

    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora", rounds=1))
    wrapper = run_server(LoseNode(client_app(cfg), 3), cfg, FAST)
    (record,) = wrapper.history
    assert record["accepted"] == ["user0", "user2"] and record["nodes"]["user1"] == 1001
    assert record["missing"] == {"user1": "node 1001: no reply (node lost, crashed, or slower than the round timeout)"}


def test_a_restarted_node_takes_its_client_back(dataset, tmp_path, caplog):
    """Node 1001 goes away after round 1; its client's SuperNode comes back as node 1003."""
    class Restart(LocalGrid):
        def get_node_ids(self):
            if len(self.sent) >= 6 and 1001 in self.contexts:  # 3 profiles + round 0's 3 train messages
                self.contexts[1003] = self.contexts.pop(1001)
                self.contexts[1003].node_id = 1003
            return super().get_node_ids()

    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora"))
    with caplog.at_level(logging.INFO, logger="fedlora"):
        wrapper = run_server(Restart(client_app(cfg), 3), cfg, FAST, run_id=42)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fedlora")]
    # The first line says how to follow a run that `flwr run` (without --stream) left in the background.
    assert "run 42" in lines[0] and "flwr log 42" in lines[0] and "flwr ls" in lines[0]
    # The node that dropped out is named in the log (the stream a user watches), with its client.
    assert any("round 2: node 1001 (client user1) left the federation" in line for line in lines), lines
    first, second = wrapper.history
    assert [first["round"], second["round"]] == [1, 2]  # as Flower's own [ROUND 1/2] lines count
    assert first["nodes"]["user1"] == 1001 and second["nodes"]["user1"] == 1003
    assert first["accepted"] == second["accepted"] == ["user0", "user1", "user2"]
    assert sorted(wrapper.profiles) == [1000, 1002, 1003] and wrapper.node_errors == {}


def test_a_round_stops_waiting_for_a_node_that_left(dataset, tmp_path):
    """Node 1001 leaves the federation (its SuperNode is stopped) right after round 0's work is pushed:
    no reply can come, so the round ends without waiting out its timeout (here: none, it would hang)."""
    class Leave(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
                self.drop = {1001}
                ids = super().push_messages(messages)
                self.contexts.pop(1001)
                return ids
            return super().push_messages(messages)

    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora", rounds=1))
    settings = FlowerSettings(node_wait_s=1.0, node_start_timeout_s=1.0, round_timeout_s=math.inf)
    wrapper = run_server(Leave(client_app(cfg), 3), cfg, settings)
    (record,) = wrapper.history
    assert record["accepted"] == ["user0", "user2"] and set(record["missing"]) == {"user1"}


def test_bytes_accounting(dataset, tmp_path):
    """Down: each node's factors at its rank (+ FLoRA's global parts after round 0); up: what it trains."""
    wrapper, grid = flower_run(run_settings(dataset, tmp_path, "flora"))
    shapes = wrapper.strategy.module_shapes
    factor_bytes = sum(4 * r * (d_out + d_in) for r in (4, 8, 16) for d_out, d_in in shapes.values())
    # FLoRA's global parts: the stack of 4 + 8 + 16 ranks, or the dense matrix it was folded into when larger
    global_bytes = sum(4 * min(28 * (d_out + d_in), d_out * d_in) for d_out, d_in in shapes.values())
    first, second = wrapper.history
    for record in (first, second):
        assert record["bytes_down"] == record["bytes_up"] == factor_bytes
    assert first["bytes_down_global"] == 0 and second["bytes_down_global"] == 3 * global_bytes
    assert second["total_bytes_down"] == second["total_bytes_up"] == 2 * factor_bytes
    # The payloads are the same arrays plus their headers (npy for arrays down, safetensors for updates up).
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    for record, msgs in ((first, train[:3]), (second, train[3:])):
        arrays = [a for m in msgs for a in m.content["fedlora.start"].values()]
        assert record["payload_bytes_down"] == sum(len(a.data) for a in arrays)
        overhead = record["payload_bytes_down"] - record["bytes_down"] - record["bytes_down_global"]
        assert 0 < overhead < 200 * len(arrays)
        assert 0 < record["payload_bytes_up"] - record["bytes_up"] < 4096 * 3

    ffa, _ = flower_run(run_settings(dataset, tmp_path / "ffa", "ffalora", rounds=1))
    (record,) = ffa.history
    B_bytes = sum(tensor_bytes(torch.empty(d_out, r)) for r in (4, 8, 16) for d_out, _ in shapes.values())
    assert record["bytes_up"] == B_bytes < record["bytes_down"]  # FFA-LoRA's A is frozen and never uploaded


def test_rolora_nodes_train_and_send_the_rounds_factor_only(dataset, tmp_path):
    wrapper, grid = flower_run(run_settings(dataset, tmp_path, "rolora"))
    shapes = wrapper.strategy.module_shapes
    train = [decode_train(m.content) for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert [(t.round, t.train_A, t.train_B) for t in train] == [(0, False, True)] * 3 + [(1, True, False)] * 3
    B_bytes = sum(tensor_bytes(torch.empty(d_out, r)) for r in (4, 8, 16) for d_out, _ in shapes.values())
    A_bytes = sum(tensor_bytes(torch.empty(r, d_in)) for r in (4, 8, 16) for _, d_in in shapes.values())
    first, second = wrapper.history
    assert (first["bytes_up"], second["bytes_up"]) == (B_bytes, A_bytes)
    assert first["accepted"] == second["accepted"] == ["user0", "user1", "user2"]  # frozen factors came back intact


@pytest.mark.parametrize("global_B", ["none", "average"])
def test_fedsalora_nodes_keep_their_B_and_match_simulate(global_B, dataset, tmp_path):
    """The server sends A only, each node keeps its B on its own disk (zeroed in its reply unless
    global_B="average"); the shared A, the global B and every client's B end as in simulate."""
    settings = run_settings(dataset, tmp_path / "flower", "fedsalora", rounds=3,
                            strategy_options={"global_B": global_B})
    replies = []

    def keep(msg, reply):
        if msg.metadata.message_type == MessageType.TRAIN:
            replies.append(decode_reply(reply.content))
        return reply

    wrapper, grid = flower_run(settings, {"tamper": keep})
    # B leaves a node only when the server takes it back
    assert len(replies) == 9
    assert all(b.any() == (global_B == "average") for u in replies for _, b, _ in u.modules.values())
    reference = simulated(settings, tmp_path / "sim")
    want = reference.strategy.state_dict()["tensors"]
    for key, value in wrapper.strategy.state_dict()["tensors"].items():
        assert rel_err(value, want[key]) < 1e-5 if want[key].any() else not value.any(), key
    flower_store = PersonalStore(tmp_path / "flower" / "clients" / "run-1")  # the LocalGrid's run id
    sim_store = PersonalStore(tmp_path / "sim" / "clients")
    for client in ("user0", "user1", "user2"):
        got, ref = flower_store.load(client, 3), sim_store.load(client, 3)
        assert got.keys() == ref.keys() and all(rel_err(got[n]["B"], ref[n]["B"]) < 1e-5 for n in ref)
    for got, ref in zip(wrapper.history, reference.metrics, strict=True):
        assert (got["bytes_up"], got["bytes_down"], got["accepted"]) == (ref["bytes_up"], ref["bytes_down"],
                                                                         ref["accepted"])
    shapes = wrapper.strategy.module_shapes
    A_bytes = sum(tensor_bytes(torch.empty(r, d_in)) for r in (4, 8, 16) for _, d_in in shapes.values())
    B_bytes = sum(tensor_bytes(torch.empty(d_out, r)) for r in (4, 8, 16) for d_out, _ in shapes.values())
    assert wrapper.history[0]["bytes_down"] == A_bytes
    assert wrapper.history[0]["bytes_up"] == A_bytes + (B_bytes if global_B == "average" else 0)
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert not any(key.endswith(".lora_B") for m in train for key in m.content["fedlora.start"])


# --------------------------------------------------------- config, example, CLI
def test_run_config_maps_to_simconfig(tmp_path):
    cfg, settings = load_run_config({"local-steps": 7, "rank_levels": "2,4", "client-ranks": "2,4,4",
                                     "rank-distribution": "list", "use-rslora": True, "lr": 0.5,
                                     "dataset": "data/x.jsonl", "strategy-options.max_rank": 8,
                                     "clients-per-round": 0.5, "min-nodes": 2, "round-timeout-s": 9},
                                    base_dir=tmp_path)
    assert (cfg.local_steps, cfg.rank_levels, cfg.client_ranks, cfg.use_rslora, cfg.lr) == (7, [2, 4], [2, 4, 4],
                                                                                             True, 0.5)
    assert cfg.dataset == str(tmp_path / "data" / "x.jsonl") and cfg.strategy_options == {"max_rank": 8}
    assert cfg.clients_per_round == 0.5
    assert (settings.min_nodes, settings.round_timeout_s, settings.node_wait_s) == (2, 9.0, 60.0)
    with pytest.raises(ValueError, match="unknown setting --no_such"):
        load_run_config({"no-such": 1})
    with pytest.raises(ValueError, match="strategy must be one of"):
        load_run_config({"strategy": "fedsgd"})


def test_example_app_config():
    from flwr.cli.config_utils import load_and_validate

    config, warnings = load_and_validate(EXAMPLE / "pyproject.toml")
    assert warnings == []
    assert "federations" not in config["tool"]["flwr"]  # flwr 1.41 would move it out and rewrite this file
    run_config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg, settings = load_run_config(run_config, base_dir=EXAMPLE)
    assert cfg.model == "tiny-random-llama" and cfg.client_ranks == [4, 8, 16] and cfg.lora_dropout == 0.0
    assert cfg.dataset == str(EXAMPLE / "data" / "clients.jsonl")
    assert settings.min_nodes == 0


def test_cli_flower_commands_and_connection(tmp_path, monkeypatch, capsys):
    assert main(["flower", "commands", "--nodes", "3", "--port", "9100"]) == 0
    out = capsys.readouterr().out
    assert "0.0.0.0" not in out
    assert "flower-superlink --insecure --host 127.0.0.1 --port 9100 --disable-runtime-dependency-installation" in out
    for k in range(3):
        assert f"--node-config 'partition-id={k} num-partitions=3'" in out
    assert "export FLWR_TELEMETRY_ENABLED=0" in out and "flwr run examples/flower fedlora --stream" in out
    assert "follow the run with `flwr log RUN_ID fedlora`, list runs with `flwr ls fedlora`" in out

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert main(["flower", "connection", "remote", "--address", "10.1.2.3:9093"]) == 2  # no TLS, not insecure
    assert main(["flower", "connection", "loop", "--address", "127.0.0.1:9100", "--insecure", "--default"]) == 0
    assert main(["flower", "connection", "sim3", "--simulation", "--num-supernodes", "3"]) == 0
    from flwr.cli.flower_config import read_superlink_connection

    loop = read_superlink_connection(None)  # the default
    assert (loop.name, loop.address, loop.insecure) == ("loop", "127.0.0.1:9100", True)
    sim = read_superlink_connection("sim3")
    assert sim.address == ":local:" and sim.options.num_supernodes == 3


def test_train_messages_name_the_factors_a_node_keeps_and_sends():
    factors = {"m": (torch.ones(2, 3), torch.zeros(4, 2), 4.0)}
    task = decode_train(encode_train(0, 1, "c0", factors, None, True, personal=("B",), upload=("A",)))
    assert (task.personal, task.upload) == (("B",), ("A",)) and task.factors["m"][1] is None
    assert torch.equal(task.factors["m"][0], factors["m"][0])
    for bad in ('["C"]', '"B"', '["B", "B"]', "[1]"):
        content = encode_train(0, 1, "c0", factors, None, True)
        content["fedlora.round"]["personal"] = bad
        with pytest.raises(ValueError, match="malformed train message: .*personal must be a JSON list"):
            decode_train(content)


def test_flora_global_parts_travel_as_stacks_until_they_outgrow_dense():
    """A node rebuilds FLoRA's global update from the parts sent: stacked factors for modules whose
    stack is still smaller than a dense matrix, the dense matrix (plus any newer stack) for the rest."""
    shapes = {"big": (64, 48), "small": (8, 6)}
    flora = FLoRA()
    flora.init_global(shapes)
    gen = torch.Generator().manual_seed(3)
    for ranks in ((2, 2), (1, 1)):  # round 0 folds 'small' (4 * 14 > 48) into dense; round 1 stacks 2 more
        updates = []
        for k, r in enumerate(ranks):
            modules = {n: (torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen), 2.0 * r)
                       for n, (d_out, d_in) in shapes.items()}
            updates.append(ClientUpdate(f"c{k}", 5 + k, r, modules))
        flora.aggregate(updates)
    parts = flora.client_base()
    assert parts["big"][0] is None and parts["big"][1].shape == (6, 48)
    assert parts["small"][0] is not None and parts["small"][1].shape[0] == 2
    content = encode_train(2, 3, "c0", flora.distribute(2, "c0"), global_arrays(parts), train_A=True)
    assert {"big.global_A", "small.global_A", "small.global_dense"} <= set(content["fedlora.start"])
    task = decode_train(content)
    assert "big.global_dense" not in content["fedlora.start"]
    rebuilt, want = merge_parts(task.global_parts), flora.global_deltas()
    for name in shapes:
        assert torch.equal(rebuilt[name], want[name]) and want[name].abs().max() > 0


def test_the_server_refuses_an_output_dir_holding_another_run(dataset, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"strategy": "flora", "rounds": 5}))
    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora"))

    class Untouched(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            raise AssertionError("the run started")

    with pytest.raises(ValueError, match=r"already holds a flora run \(0 of 5 rounds done\); use another output-dir, "
                                         r"or overwrite=true"):
        run_server(Untouched(client_app(cfg), 3), cfg, FAST)
    with pytest.raises(ValueError, match="resume is not available here"):
        run_server(Untouched(client_app(cfg), 3), SimConfig.from_dict(dict(run_settings(dataset, tmp_path / "new"),
                                                                          resume=True)), FAST)
