"""`fedlora simulate` under bad clients (an upload at a rank it was not sent, a finite but enormous
update, a product that overflows float32: each is rejected with a reason, the state stays finite and
equals a run without that client's update) and damaged checkpoints (the newest intact one is resumed
and the run ends where an uninterrupted one ends, or the error names every file). Tiny random Llama."""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from fedlora.data import shakespeare, sharegpt
from fedlora.federated import ClientUpdate
from fedlora.simulation import simulate
from fedlora.simulation.checkpoints import CheckpointError
from fedlora.simulation.config import SimConfig
from fedlora.simulation.run import check_same_run, data_fingerprint
from fedlora.strategies import FLoRA, FlexLoRA

from .fl_helpers import random_update
from .test_data_sharegpt import write_sharegpt
from .test_simulation import (TINY, assert_same_state, read_metrics, resume_cfg, synthetic_data, without_wall_time,
                              write_jsonl)


def _run(tmp_path, hook, strategy="flexlora", **kw):
    cfg = dict(model=TINY, rounds=2, clients_per_round=4, local_steps=2, lr=1e-2, rank_levels=[2, 4],
               strategy=strategy, eval_every=0, output_dir=str(tmp_path), progress=False, **kw)
    return simulate(cfg, data=synthetic_data(), update_hook=hook)


def _spoil(client, edit):
    def hook(update):
        return edit(update) if update.client_id == client else update
    return hook


def _higher_rank(update):
    shapes = {n: (b.shape[0], a.shape[1]) for n, (a, b, _) in update.modules.items()}
    return random_update(update.client_id, 2 * update.rank, shapes, n=update.num_examples)


def _times(factor_a, factor_b):
    def edit(update):
        mods = {n: (a * factor_a, b * factor_b, al) for n, (a, b, al) in update.modules.items()}
        return ClientUpdate(update.client_id, update.num_examples, update.rank, mods, update.use_rslora,
                            update.metrics)
    return edit


def _dropped(client):
    """The reference: the same run where ``client``'s update never arrives."""
    def hook(update):
        if update.client_id == client:
            raise RuntimeError("dropped for the reference run")
        return update
    return hook


@pytest.mark.parametrize("strategy, edit, reason", [
    ("flexlora", _higher_rank, "the server sent this client"),
    ("flora", _higher_rank, "the server sent this client"),
    ("hetlora", _times(1.0, 1e6), "the round's median"),
    ("fedavg", _times(1e20, 1e20), "could overflow float32"),
    ("flora", _times(1e20, 1e20), "could overflow float32"),
])
def test_a_bad_client_is_rejected_and_the_state_equals_the_run_without_it(strategy, edit, reason, tmp_path):
    extra = {"strategy_options": {"heterogeneous": "bucket"}} if strategy == "fedavg" else {}
    res = _run(tmp_path / "bad", _spoil("c1", edit), strategy, **extra)
    ref = _run(tmp_path / "ref", _dropped("c1"), strategy, **extra)
    for got, want in zip(read_metrics(tmp_path / "bad"), read_metrics(tmp_path / "ref"), strict=True):
        assert reason in got["rejected"]["c1"] and got["state_changed"]
        assert got["accepted"] == want["accepted"] == ["c0", "c2", "c3"]
        assert got["train_loss"] == want["train_loss"] and math.isfinite(got["train_loss"])
    deltas, ref_deltas = res.strategy.global_deltas(), ref.strategy.global_deltas()
    for name in deltas:
        assert torch.isfinite(deltas[name]).all() and torch.equal(deltas[name], ref_deltas[name])


# ------------------------------------------------------------- checkpoints
def _cfg(out, **kw):
    return resume_cfg(out, "flora") | {"eval_every": 0, **kw}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 3-round run: what every recovered or resumed run must end at."""
    return simulate(_cfg(tmp_path_factory.mktemp("full")), data=synthetic_data())


def _stopped_after(out: Path, rounds_done: int):
    simulate(_cfg(out), data=synthetic_data(), stop_after=rounds_done)
    return out / "checkpoints"


def _assert_ends_like(result, full):
    assert_same_state(result.strategy, full.strategy)
    assert without_wall_time(result.metrics) == without_wall_time(full.metrics)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "state.json"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, full_run, tmp_path, caplog):
    ckpt = _stopped_after(tmp_path, 2)
    latest = ckpt / "round-0002" / "strategy.safetensors"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:-100])
    elif damage == "garbage":
        latest.write_bytes(b"\x00" * 64)
    elif damage == "missing":
        latest.unlink()
    else:
        (ckpt / "round-0002" / "state.json").write_text('{"next_round": 2, "metr')
    with caplog.at_level("WARNING", logger="fedlora.simulate"):
        resumed = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "round-0002" in warning and "resuming from" in warning and "round-0001 (after round 1)" in warning
    _assert_ends_like(resumed, full_run)


def test_no_intact_checkpoint_fails_naming_every_file(tmp_path, capsys):
    ckpt = _stopped_after(tmp_path, 2)
    for folder in ("round-0001", "round-0002"):
        (ckpt / folder / "strategy.safetensors").write_bytes(b"nope")
    with pytest.raises(CheckpointError) as err:
        simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    message = str(err.value)
    assert message.startswith("cannot resume: no intact checkpoint: ")
    assert str(ckpt / "round-0002" / "strategy.safetensors") in message
    assert str(ckpt / "round-0001" / "strategy.safetensors") in message
    assert "\n" not in message


def test_a_missing_latest_pointer_recovers_the_newest_intact_round(full_run, tmp_path, caplog):
    ckpt = _stopped_after(tmp_path, 2)
    (ckpt / "latest").unlink()
    with caplog.at_level("WARNING", logger="fedlora.simulate"):
        resumed = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    assert any("latest is missing" in r.getMessage() for r in caplog.records)
    _assert_ends_like(resumed, full_run)


def test_a_state_that_disagrees_with_its_metadata_is_refused(tmp_path):
    ckpt = _stopped_after(tmp_path, 1)
    strategy = FLoRA()
    strategy.load(ckpt / "round-0001" / "strategy.safetensors")
    name = next(iter(strategy.module_shapes))
    state = strategy.state_dict()
    bad_shape = dict(state, tensors=dict(state["tensors"], **{f"{name}.dense": torch.zeros(3, 5)}))
    with pytest.raises(ValueError, match=rf"state disagrees with its metadata: {name}\.dense has shape \[3, 5\]"):
        FLoRA().load_state_dict(bad_shape)
    missing = dict(state, tensors={k: v for k, v in state["tensors"].items() if k != f"{name}.B"})
    with pytest.raises(ValueError, match=rf"{name}\.B is missing"):
        FLoRA().load_state_dict(missing)
    nan = dict(state, tensors=dict(state["tensors"], **{f"{name}.A": state["tensors"][f"{name}.A"] * math.nan}))
    with pytest.raises(ValueError, match="holds non-finite values"):
        FLoRA().load_state_dict(nan)
    stranger = dict(state, tensors=dict(state["tensors"], **{"model.layers.9.mlp.A": torch.zeros(2, 3)}))
    with pytest.raises(ValueError, match=r"tensors of modules the state does not have: \['model.layers.9.mlp.A'\]"):
        FLoRA().load_state_dict(stranger)
    coerced = dict(state, meta=dict(state["meta"], round="1"))
    with pytest.raises(ValueError, match="state round must be an integer, got str '1'"):
        FLoRA().load_state_dict(coerced)
    flex = FlexLoRA()
    flex.init_global({"m": (6, 5)})
    flex_state = flex.state_dict()
    flex_state["tensors"]["m.S"] = torch.zeros(2)  # U and V keep K = 0: S must too
    with pytest.raises(ValueError, match=r"m\.S has shape \[2\]"):
        FlexLoRA().load_state_dict(flex_state)
    # through a resume: the damaged latest round is skipped with that reason
    bad = FLoRA()
    bad.load(ckpt / "round-0001" / "strategy.safetensors")
    bad._tensors[f"{name}.A"] = bad._tensors[f"{name}.A"][:, :3].contiguous()
    bad.save(ckpt / "round-0001" / "strategy.safetensors")
    with pytest.raises(CheckpointError, match=rf"round-0001/strategy.safetensors: state disagrees .*{name}\.A"):
        simulate(_cfg(tmp_path, resume=True), data=synthetic_data())


def test_leftovers_of_an_interrupted_save_are_removed_on_the_next_start(full_run, tmp_path):
    ckpt = _stopped_after(tmp_path, 2)
    (ckpt / ".tmp-abc123").mkdir()
    (ckpt / ".tmp-abc123" / "strategy.safetensors").write_bytes(b"half")
    (ckpt / ".latest.x1.tmp").write_bytes(b"round-00")
    resumed = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "round-0002", "round-0003"]
    _assert_ends_like(resumed, full_run)


def test_resume_with_nothing_to_resume_says_so_on_one_line(full_run, tmp_path, capsys):
    first = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    assert "fedlora simulate: nothing to resume in " + str(tmp_path) + " (no checkpoint): starting at round 1" \
        in capsys.readouterr().out
    _assert_ends_like(first, full_run)
    again = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    out = capsys.readouterr().out
    assert f"fedlora simulate: nothing to resume: {tmp_path} has finished its 3 rounds" in out
    assert "round 1/3 |" not in out  # no round ran again
    _assert_ends_like(again, full_run)


def test_a_finished_run_is_extended_when_only_rounds_grew(tmp_path, tmp_path_factory):
    simulate(_cfg(tmp_path), data=synthetic_data())
    extended = simulate(_cfg(tmp_path, rounds=5, resume=True), data=synthetic_data())
    longer = simulate(_cfg(tmp_path_factory.mktemp("five"), rounds=5), data=synthetic_data())
    _assert_ends_like(extended, longer)
    with pytest.raises(ValueError, match=r"checkpoint is at round 5, past rounds = 4"):
        simulate(_cfg(tmp_path, rounds=4, resume=True), data=synthetic_data())


def test_a_moved_run_folder_resumes(full_run, tmp_path):
    _stopped_after(tmp_path / "here", 1)
    (tmp_path / "here").rename(tmp_path / "there")
    resumed = simulate(_cfg(tmp_path / "there", resume=True), data=synthetic_data())
    _assert_ends_like(resumed, full_run)


def test_resuming_on_edited_data_is_refused_naming_the_file(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl")
    cfg = dict(model=TINY, dataset=str(data), rounds=2, clients_per_round=2, local_steps=1, rank_levels=[2, 4],
               eval_every=0, eval_generate_examples=0, output_dir=str(tmp_path / "run"), progress=False)
    simulate(cfg, stop_after=1)
    data.write_text(data.read_text().replace("Repeat", "Echo", 1))
    with pytest.raises(ValueError, match=rf"cannot resume .*: the data file {re.escape(str(data))} is not the "
                                         r"content the run trained on"):
        simulate(dict(cfg, resume=True))


def _write_play(path: Path, roles=("ALPHA", "BETA"), word="sea") -> None:
    """A play in the package's format (an act heading, then speaker headings and speeches): 2 roles x 8 lines."""
    text = ["ACT I.", "", "SCENE I. A road.", ""]
    for i in range(8):
        for role in roles:
            text += [f"{role}.", f"{role.title()} speaks of the {word} {i}.", ""]
    path.write_text("\n".join(text), encoding="latin-1")


def test_resuming_after_the_builtin_data_package_changed_is_refused_naming_it(tmp_path, monkeypatch):
    """dataset = "shakespeare": the package's files are the run's data. The same content installed elsewhere
    resumes; an edited or an added play is refused, naming the package folder and the files."""
    texts = tmp_path / "site-packages" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    _write_play(texts / "alpha_gut.txt")
    _write_play(texts / "beta_gut.txt", ("GAMMA", "DELTA"), "land")
    monkeypatch.setattr(shakespeare, "texts_dir", lambda: texts)
    cfg = dict(model=TINY, dataset="shakespeare", min_lines=2, seq_len=32, rounds=3, clients_per_round=2,
               local_steps=1, rank_levels=[2, 4], eval_every=0, eval_generate_examples=0,
               output_dir=str(tmp_path / "run"), progress=False)
    simulate(cfg, stop_after=1)
    state = json.loads((tmp_path / "run" / "checkpoints" / "round-0001" / "state.json").read_text())
    assert state["data"] == {"builtin": "shakespeare", "where": str(texts), "sha256": {
        name: hashlib.sha256((texts / name).read_bytes()).hexdigest() for name in ("alpha_gut.txt", "beta_gut.txt")}}

    elsewhere = shutil.copytree(texts, tmp_path / "other-venv" / "texts")  # the same package, reinstalled
    monkeypatch.setattr(shakespeare, "texts_dir", lambda: elsewhere)
    assert len(simulate(dict(cfg, resume=True), stop_after=1).metrics) == 2

    _write_play(elsewhere / "beta_gut.txt", ("GAMMA", "DELTA"), "sky")
    with pytest.raises(ValueError, match=re.escape(
            f"cannot resume {tmp_path / 'run'}: the built-in dataset 'shakespeare' ({elsewhere}) is not the content "
            "the run trained on (its package changed): changed beta_gut.txt")):
        simulate(dict(cfg, resume=True))
    shutil.copy(texts / "beta_gut.txt", elsewhere / "beta_gut.txt")
    _write_play(elsewhere / "gamma_gut.txt")
    with pytest.raises(ValueError, match=re.escape("(its package changed): added gamma_gut.txt")):
        simulate(dict(cfg, resume=True))


def test_the_sharegpt_package_file_is_part_of_the_run_identity(tmp_path, monkeypatch):
    path = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    write_sharegpt(path)
    monkeypatch.setattr(sharegpt, "sharegpt_path", lambda: path)
    cfg = SimConfig.from_dict(dict(model=TINY, dataset="sharegpt", num_clients=4, output_dir=str(tmp_path / "run")))
    before = data_fingerprint(cfg, None)
    assert before == {"builtin": "sharegpt", "where": str(tmp_path),
                      "sha256": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}}
    state = {"config": cfg.to_dict(), "data": before, "next_round": 1}
    check_same_run(state, {"config": cfg.to_dict(), "data": data_fingerprint(cfg, None)}, cfg, tmp_path)  # same

    path.write_bytes(path.read_bytes().replace(b"Answer 1.0", b"Answer 9.0"))
    now = {"config": cfg.to_dict(), "data": data_fingerprint(cfg, None)}
    with pytest.raises(ValueError, match=re.escape(
            f"the built-in dataset 'sharegpt' ({tmp_path}) is not the content the run trained on (its package "
            f"changed): changed {path.name}")):
        check_same_run(state, now, cfg, tmp_path)
    # a checkpoint written before built-in data was fingerprinted cannot be checked: refused, saying so
    with pytest.raises(ValueError, match=re.escape("the checkpoint holds no fingerprint of the built-in dataset "
                                                   f"'sharegpt' ({tmp_path})")):
        check_same_run(dict(state, data=None), now, cfg, tmp_path)
