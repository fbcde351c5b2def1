"""`fedlora simulate` with a rule whose clients keep a factor to themselves (FedSA-LoRA's B): the
personal store across rounds, resuming (also from a checkpoint older than the store's files), and the
personalised evaluation."""
import math
import shutil

import pytest
import torch

from fedlora.federated.update import atomic_write
from fedlora.simulation import simulate
from fedlora.simulation.personal import PersonalStore

from .test_evaluation_by_rank import mean_over_ranks, recombination_tol
from .test_simulation import resume_cfg, synthetic_data, without_wall_time


def _cfg(out, **kw):
    return resume_cfg(out, "fedsalora", eval_every=1, eval_max_examples=8, **kw)


def _latest_personal(out, clients):
    store = PersonalStore(out / "clients")
    return {c: store.load(c, 10**6) for c in clients}


def _same_personal(a, b):
    assert a.keys() == b.keys()
    for c in a:
        assert (a[c] is None) == (b[c] is None), c
        for name in a[c] or {}:
            assert torch.equal(a[c][name]["B"], b[c][name]["B"]), (c, name)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return simulate(_cfg(tmp_path_factory.mktemp("fedsa")), data=synthetic_data())


def test_clients_keep_their_B_and_the_personalised_models_are_evaluated(full_run):
    metrics = full_run.metrics
    ids = ["c0", "c1", "c2", "c3"]
    personal = _latest_personal(full_run.output_dir, ids)
    trained = {c for m in metrics for c in m["accepted"]}
    assert {c for c, v in personal.items() if v is not None} == trained
    shapes = full_run.strategy.module_shapes
    for m in metrics:
        # A up and A down only (fp32, r_k x d_in per module): B never travels
        A_bytes = sum(4 * full_run.client_ranks[c] * d_in for c in m["clients"] for _, d_in in shapes.values())
        assert m["bytes_up"] == m["bytes_down"] == A_bytes
        assert math.isfinite(m["eval_personal_heldout_loss"]) and m["eval_personal_clients"] == 4
        # the personalised models' loss by client rank: the same tokens as the global evaluation's breakdown
        groups = m["eval_personal_heldout_by_rank"]
        assert {r: g["tokens"] for r, g in groups.items()} == \
            {r: g["tokens"] for r, g in m["eval_heldout_by_rank"].items()}
        assert mean_over_ranks(groups) == pytest.approx(m["eval_personal_heldout_loss"], rel=recombination_tol(groups))
        assert not any(full_run.strategy.global_delta(n).any() for n in full_run.strategy.module_shapes)
    # the global model is the base model (no global B), the personalised ones learn
    assert len({m["eval_heldout_loss"] for m in metrics}) == 1
    assert metrics[-1]["eval_personal_heldout_loss"] < metrics[0]["eval_heldout_loss"]


def test_resume_restarts_every_client_from_its_own_B(full_run, tmp_path):
    first = simulate(_cfg(tmp_path), data=synthetic_data(), stop_after=1)
    assert len(first.metrics) == 1
    resumed = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    assert without_wall_time(resumed.metrics) == without_wall_time(full_run.metrics)
    for key, value in full_run.strategy.state_dict()["tensors"].items():
        assert torch.equal(resumed.strategy.state_dict()["tensors"][key], value), key
    ids = ["c0", "c1", "c2", "c3"]
    _same_personal(_latest_personal(tmp_path, ids), _latest_personal(full_run.output_dir, ids))


def test_resume_from_a_checkpoint_older_than_the_clients_files(full_run, tmp_path):
    """A crash after clients stored round 1's B but before round 1's checkpoint: the resumed round 1
    must start them from round 0's B, not from the files the crashed round left."""
    simulate(_cfg(tmp_path), data=synthetic_data(), stop_after=2)
    checkpoints = tmp_path / "checkpoints"
    shutil.rmtree(checkpoints / "round-0002")  # checkpoints count rounds from 1, the store's files from 0
    atomic_write(checkpoints / "latest", b"round-0001")
    resumed = simulate(_cfg(tmp_path, resume=True), data=synthetic_data())
    assert without_wall_time(resumed.metrics) == without_wall_time(full_run.metrics)
    ids = ["c0", "c1", "c2", "c3"]
    _same_personal(_latest_personal(tmp_path, ids), _latest_personal(full_run.output_dir, ids))
