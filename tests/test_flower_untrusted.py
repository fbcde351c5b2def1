"""One bad Flower node never stops the federation: every reply or profile a node can send that is
malformed, coerced, absurd or at a rank it was not sent costs that node its round (or its place),
with a short reason, and the run goes on for everyone else (in-process Grid, tiny random Llama)."""
from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("flwr", reason="needs the flower extra: pip install -e '.[flower]'")

from .flower_helpers import LocalGrid, run_settings, write_clients_jsonl  # noqa: E402  (quiet Flower env first)

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord  # noqa: E402
from flwr.app import RecordDict  # noqa: E402

import fedlora.federated.update as update_module  # noqa: E402

from fedlora.simulation.config import SimConfig  # noqa: E402
from fedlora.federated.update import ClientUpdate  # noqa: E402
from fedlora.integrations.flower import FlowerSettings, client_app, run_server  # noqa: E402
from fedlora.integrations.flower.wire import (  # noqa: E402
    CONTROLS,
    METRICS,
    PROFILE,
    UPDATE,
    decode_controls,
    decode_profile,
    decode_reply,
    decode_train,
    encode_reply,
    guarded,
)

from .fl_helpers import random_update  # noqa: E402
from .test_untrusted_updates import _join, _split, _with_field, _with_header_text  # noqa: E402

FAST = FlowerSettings(node_wait_s=1.0, node_start_timeout_s=1.0, round_timeout_s=30.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_clients_jsonl(tmp_path_factory.mktemp("data") / "clients.jsonl")


def _blob(reply: Message) -> bytes:
    return reply.content[UPDATE]["update"].data


def _with_blob(reply: Message, blob: bytes) -> Message:
    reply.content[UPDATE] = ArrayRecord({"update": Array(dtype="uint8", shape=(len(blob),), stype="fedlora.update",
                                                         data=blob)})
    return reply


def _non_string_metadata(blob):
    table, body = _split(blob)
    table["__metadata__"]["fedlora.update"] = json.loads(table["__metadata__"]["fedlora.update"])
    return _join(table, body)


def _float8(blob):
    update = ClientUpdate.from_bytes(blob)
    name = sorted(update.modules)[0]
    a, b, alpha = update.modules[name]
    update.modules[name] = (a.to(torch.float8_e4m3fn), b, alpha)
    return update.to_bytes()


def _higher_rank(blob):  # a node sent rank 8 uploads rank 16 factors
    update = ClientUpdate.from_bytes(blob)
    shapes = {n: (b.shape[0], a.shape[1]) for n, (a, b, _) in update.modules.items()}
    return random_update(update.client_id, 16, shapes, n=update.num_examples).to_bytes()


# (round, node) -> how the reply is spoiled, and the reason it must be rejected with
SPOILED = {
    (0, 1001): (lambda r: _with_blob(r, _with_field(_blob(r), "num_examples", "Infinity")),
                "num_examples must be an integer, got float inf"),
    (0, 1002): (lambda r: _with_blob(r, _with_field(_blob(r), "metrics", "[1.5, 2.5]")),
                "metrics must be a mapping, got list"),
    (1, 1001): (lambda r: _with_blob(r, _non_string_metadata(_blob(r))), "metadata must map names to strings"),
    (1, 1002): (lambda r: _with_blob(r, _with_header_text(_blob(r), lambda t: "[" * 50_000 + "]" * 50_000)),
                "nested too deeply"),
    (2, 1001): (lambda r: _with_blob(r, _float8(_blob(r))), "has dtype F8_E4M3"),
    (2, 1002): (lambda r: _with_blob(r, _with_field(_blob(r), "num_examples", "1e999")),
                "num_examples must be an integer, got float inf"),
    (3, 1001): (lambda r: _metrics(r, {"num-examples": [1.0, 2.0]}), "metrics num-examples must be an integer"),
    (3, 1002): (lambda r: _metrics(r, {"num-examples": math.inf}), "metrics num-examples must be an integer"),
    (4, 1001): (lambda r: _with_blob(r, _higher_rank(_blob(r))),
                "rank 16 differs from the rank 8 the server sent this client (refused before reading any tensor)"),
    (4, 1002): (lambda r: _with_blob(r, _with_field(_blob(r), "use_rslora", '"false"')),
                "use_rslora must be true or false, got str 'false'"),
}


def _metrics(reply, values):
    reply.content[METRICS] = MetricRecord(values)
    return reply


def test_every_malformed_reply_is_one_nodes_rejection_and_the_run_goes_on(dataset, tmp_path):
    def tamper(msg, reply):
        if msg.metadata.message_type != MessageType.TRAIN:
            return reply
        spoil = SPOILED.get((decode_train(msg.content).round, msg.metadata.dst_node_id))
        return spoil[0](reply) if spoil else reply

    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora", rounds=5))
    wrapper = run_server(LocalGrid(client_app(cfg), 3, tamper=tamper), cfg, FAST)
    assert len(wrapper.history) == 5
    clients = {1001: "user1", 1002: "user2"}
    for record in wrapper.history:
        assert record["accepted"] == ["user0"] and record["state_changed"] and record["missing"] == {}
        for node, cid in clients.items():
            reason = record["rejected"][cid]
            # SPOILED is keyed by the train message's round index (from 0); records count rounds from 1
            assert SPOILED[(record["round"] - 1, node)][1] in reason, (record["round"], reason)
            assert len(reason) < 400
    assert all(torch.isfinite(d).all() for d in wrapper.strategy.global_deltas().values())


def _profile_with(**values):
    def tamper(msg, reply):
        if msg.metadata.message_type == MessageType.QUERY and msg.metadata.dst_node_id == 1002:
            record = reply.content[PROFILE]
            for key, value in values.items():
                record[key] = value
        return reply
    return tamper


@pytest.mark.parametrize("values, reason", [
    ({"rank": 2**60}, "profile rank must be in [1, "),
    ({"rank": math.inf}, "profile rank must be an integer, got float inf"),
    ({"rank": "8"}, "profile rank must be an integer, got str '8'"),
    ({"num-examples": 7.5}, "profile num-examples must be an integer, got float 7.5"),
    ({"module-shapes": json.dumps({"model.layers.0.self_attn.q_proj": [2**60, 64]})},
     "module-shapes['model.layers.0.self_attn.q_proj'] must be in [1, 1048576]"),
    ({"module-shapes": "[" * 50_000 + "]" * 50_000}, "profile module-shapes is JSON nested too deeply"),
    ({"client-id": 3}, "profile client-id must be a string, got int 3"),
])
def test_an_absurd_profile_leaves_that_node_out_and_the_run_goes_on(values, reason, dataset, tmp_path):
    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora", rounds=1))
    wrapper = run_server(LocalGrid(client_app(cfg), 3, tamper=_profile_with(**values)), cfg, FAST)
    assert list(wrapper.node_errors) == [1002] and reason in wrapper.node_errors[1002]
    (record,) = wrapper.history
    assert record["accepted"] == ["user0", "user1"] and record["state_changed"]


def test_guarded_turns_any_exception_into_a_reason():
    def explode(_):
        raise RecursionError("maximum recursion depth exceeded")
    assert guarded(explode, None) == (None, "RecursionError: maximum recursion depth exceeded")
    assert guarded(decode_reply, RecordDict())[1] == "the message has no 'fedlora.update' record (it has [])"
    message = Message(RecordDict({PROFILE: ConfigRecord({"client-id": "x"})}), dst_node_id=1,
                      message_type=MessageType.QUERY)
    profile, reason = guarded(decode_profile, message)
    assert profile is None and reason.startswith("malformed profile: no ['client-index'")
    good = encode_reply(random_update("c", 2))
    assert guarded(decode_reply, good)[0].client_id == "c"


# The tiny random Llama's adapted layers (q_proj 64 x 64, v_proj 32 x 64 in two layers), as the server derives them
MODEL_SHAPES = {f"model.layers.{i}.self_attn.{p}": s for i in range(2) for p, s in (("q_proj", (64, 64)),
                                                                                    ("v_proj", (32, 64)))}
# A node of another (bigger) model: the same layer names, other shapes
OTHER_MODEL = json.dumps({name: [2 * d_out, 2 * d_in] for name, (d_out, d_in) in MODEL_SHAPES.items()})


def _profile_of(node_id, **values):
    def tamper(msg, reply):
        if msg.metadata.message_type == MessageType.QUERY and msg.metadata.dst_node_id == node_id:
            for key, value in values.items():
                reply.content[PROFILE][key] = value
        return reply
    return tamper


def test_a_profile_of_another_model_is_left_out_even_when_it_arrives_first(dataset, tmp_path, caplog):
    cfg = SimConfig.from_dict(run_settings(dataset, tmp_path, "flexlora", rounds=1))
    # node 1000 answers first (LocalGrid delivers profiles in node order): it must not define the run's shapes
    with caplog.at_level("INFO", logger="fedlora.flower"):
        wrapper = run_server(LocalGrid(client_app(cfg), 3, tamper=_profile_of(1000, **{"module-shapes": OTHER_MODEL})),
                             cfg, FAST)
    assert "module shapes from model tiny-random-llama: 4 adapted layers" in caplog.text
    assert list(wrapper.node_errors) == [1000]
    assert wrapper.node_errors[1000] == ("its model's adapted modules differ from the run's 4: 4 of other shapes "
                                         "(e.g. model.layers.0.self_attn.q_proj: [128, 128], the run's [64, 64])")
    assert wrapper.strategy.module_shapes == MODEL_SHAPES
    (record,) = wrapper.history
    assert record["accepted"] == ["user1", "user2"] and record["state_changed"]


@pytest.mark.parametrize("server_model, why", [
    ("only-on-the-nodes", "(ValueError: unknown model spec"),
    ("not-converted.gguf", "(its config is not at hand without converting the GGUF file first)"),
])
def test_without_the_models_config_on_the_server_the_first_profile_defines_the_shapes(
        server_model, why, dataset, tmp_path, caplog, monkeypatch):
    """The fall-back (a model only the nodes hold; a GGUF file the server has not converted): said in a log
    line; the first usable profile decides, here a hostile one."""
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "not-converted.gguf").write_bytes(b"GGUF, never read by the server")
    node_cfg = SimConfig.from_dict(run_settings(dataset, tmp_path / "node", "flexlora", rounds=1))
    server_cfg = SimConfig.from_dict(run_settings(dataset, tmp_path / "server", "flexlora", rounds=1,
                                                  model=str(tmp_path / server_model)))
    with caplog.at_level("WARNING", logger="fedlora.flower"):
        wrapper = run_server(LocalGrid(client_app(node_cfg), 3,
                                       tamper=_profile_of(1000, **{"module-shapes": OTHER_MODEL})), server_cfg, FAST)
    assert f"cannot derive the adapted module shapes of model {tmp_path / server_model} on the server {why}" \
        in caplog.text
    assert "the first usable node profile defines them" in caplog.text
    assert sorted(wrapper.node_errors) == [1001, 1002]
    assert all("4 of other shapes (e.g. model.layers.0.self_attn.q_proj: [64, 64], the run's [128, 128])" in reason
               for reason in wrapper.node_errors.values())


def _no_tensor_read(*_):
    raise AssertionError("a tensor was read before the table was checked against the limits")


@pytest.mark.parametrize("edit, reason", [
    (lambda u: random_update(u.client_id, 16, MODEL_SHAPES),
     "model.layers.0.self_attn.q_proj: rank 16 differs from the rank 8 the server sent this client"),
    (lambda u: random_update(u.client_id, 8, {**MODEL_SHAPES, "model.layers.0.self_attn.q_proj": (64, 2**12)}),
     "model.layers.0.self_attn.q_proj: factors of shapes A [8, 4096], B [64, 8]; the model's layer needs "
     "A [r, 64] and B [64, r]"),
    (lambda u: random_update(u.client_id, 8, {**MODEL_SHAPES, "lm_head": (260, 64)}),
     "the update names module 'lm_head', which the run does not adapt"),
])
def test_a_reply_beyond_the_models_shapes_or_the_rank_sent_is_refused_before_any_tensor_is_read(
        edit, reason, monkeypatch):
    limits = {name: (d_out, d_in, 8) for name, (d_out, d_in) in MODEL_SHAPES.items()}
    honest = random_update("c", 8, MODEL_SHAPES)
    monkeypatch.setattr(update_module, "_load_tensors", _no_tensor_read)
    with pytest.raises(ValueError, match=re.escape(reason)):
        decode_reply(encode_reply(edit(honest)), limits)
    monkeypatch.undo()
    assert decode_reply(encode_reply(honest), limits).modules.keys() == MODEL_SHAPES.keys()
    # a smaller rank (HetLoRA's self-pruning) is within the bound
    pruned = random_update("c", 4, MODEL_SHAPES)
    assert decode_reply(encode_reply(pruned), limits).rank == 4


@pytest.mark.parametrize("key, shape, reason", [
    ("model.layers.0.self_attn.q_proj.control_A", (16, 64), "has shape [16, 64]; expected [r, 64] with 1 <= r <= 8"),
    ("model.layers.0.self_attn.v_proj.control_B", (64, 8), "has shape [64, 8]; expected [32, r] with 1 <= r <= 8"),
    ("lm_head.control_A", (8, 64), "module 'lm_head' is not one the run adapts"),
])
def test_a_control_variate_beyond_the_models_shapes_is_refused_before_it_is_read(key, shape, reason, monkeypatch):
    limits = {name: (d_out, d_in, 8) for name, (d_out, d_in) in MODEL_SHAPES.items()}
    content = RecordDict({CONTROLS: ArrayRecord({key: Array(torch.ones(shape).numpy())})})
    monkeypatch.setattr(Array, "numpy", _no_tensor_read)
    with pytest.raises(ValueError, match=re.escape(reason)):
        decode_controls(content, limits)
    monkeypatch.undo()
    fine = RecordDict({CONTROLS: ArrayRecord({"model.layers.0.self_attn.v_proj.control_B":
                                              Array(torch.ones(32, 8).numpy())})})
    assert decode_controls(fine, limits)["model.layers.0.self_attn.v_proj"][1].shape == (32, 8)
