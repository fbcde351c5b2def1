"""FedSA-LoRA: A shared and averaged (float64 statement), B personal: kept on the client's disk across
rounds (PersonalStore), never sent in either direction unless global_B="average"."""
import pytest
import torch

from fedlora.bank import lora_scaling
from fedlora.federated.update import ClientUpdate
from fedlora.simulation.personal import PersonalStore, with_personal, withhold
from fedlora.simulation.round import factor_bytes, outgoing_update, upload_bytes
from fedlora.strategies import FedSALoRA

from .fl_helpers import SHAPES, data_weights, rel, trained_updates

NAMES = list(SHAPES)
TOL64 = 1e-12  # float64 weighted sums of a few terms


def _row_average64(ups, name, R, factor, old):
    """Row i of A (column i of s B) averaged over the clients that trained it, weights renormalised."""
    p = data_weights(ups)
    out = old.double().clone()
    for i in range(R):
        held = [(u, pk) for u, pk in zip(ups, p) if u.modules[name][0].shape[0] > i]
        if not held:
            continue
        total = sum(pk for _, pk in held)
        if factor == "A":
            out[i] = sum(pk / total * u.modules[name][0][i].double() for u, pk in held)
        else:
            out[:, i] = sum(pk / total * lora_scaling(u.modules[name][2], u.modules[name][0].shape[0])
                            * u.modules[name][1][:, i].double() for u, pk in held)
    return out


@pytest.mark.parametrize("global_B", ["none", "average"])
def test_A_is_the_row_wise_average_and_B_is_never_distributed(global_B):
    s = FedSALoRA(global_B=global_B, dtype=torch.float64)
    s.init_global(SHAPES, rank=6)
    assert s.personal == ("B",) and s.uploaded_at(0) == (("A",) if global_B == "none" else ("A", "B"))
    for t, ranks in enumerate([[6, 3, 2], [4, 4], [2, 3]]):  # the last round leaves rows 3..5 untouched
        before = {k: v.clone() for k, v in s._tensors.items()}
        ups = trained_updates(s, ranks, seed=t, dtype=torch.float64)
        s.aggregate(ups)
        for n in NAMES:
            assert rel(s._tensors[f"{n}.A"], _row_average64(ups, n, 6, "A", before[f"{n}.A"])) < TOL64
            if global_B == "average":
                want = _row_average64(ups, n, 6, "B", before[f"{n}.B"])
                assert rel(s._tensors[f"{n}.B"], want) < TOL64
                assert rel(s.global_delta(n), want @ s._tensors[f"{n}.A"].double()) < TOL64
            else:
                assert not s._tensors[f"{n}.B"].any() and not s.global_delta(n).any()
        if t == 2:  # no client of the round trained rows 3..5: they keep their values exactly
            assert all(torch.equal(s._tensors[f"{n}.A"][3:], before[f"{n}.A"][3:]) for n in NAMES)
    for n, (a, b, _) in s.distribute(4, "c0").items():  # the server hands out A only; B is the client's
        assert torch.equal(a, s._tensors[f"{n}.A"][:4]) and not b.any()


def test_store_keeps_the_newest_two_rounds_and_loads_what_came_before(tmp_path):
    store = PersonalStore(tmp_path)
    B = {t: {n: {"B": torch.full((SHAPES[n][0], 4), float(t))} for n in NAMES} for t in (0, 2, 5)}
    for t in (0, 2, 5):
        store.save("client/1 é", t, B[t])
    assert store.rounds("client/1 é") == [2, 5] and store.load("client/1 é", before_round=2) is None
    got = store.load("client/1 é", before_round=5)  # a resumed round 5 restarts from round 2's B
    assert all(torch.equal(got[n]["B"], B[2][n]["B"]) for n in NAMES)
    assert torch.equal(store.load("client/1 é", 6)[NAMES[0]]["B"], B[5][NAMES[0]]["B"])
    assert store.folder("client/1 é").parent == tmp_path and store.load("other", 9) is None
    # a file of another client under this client's name is refused, not used
    (store.folder("x") / "round-0003.safetensors").parent.mkdir(parents=True)
    (store.folder("x") / "round-0003.safetensors").write_bytes((store.folder("client/1 é") / "round-0005.safetensors")
                                                              .read_bytes())
    with pytest.raises(ValueError, match="holds client 'client/1 é' round 5, expected 'x' round 3"):
        store.load("x", 4)


def test_a_client_starts_from_its_own_B_and_sends_only_A(tmp_path):
    s = FedSALoRA()
    s.init_global(SHAPES, rank=4)
    store = PersonalStore(tmp_path)
    start = with_personal(s.distribute(4, "c0", alpha=8.0), "c0", 0, s.personal, store, SHAPES)
    assert all(not b.any() for _, b, _ in start.values())  # new to the run: B = 0 (PEFT's init)
    (trained,) = trained_updates(s, [4], seed=1)
    sent = outgoing_update(trained, 0, s.personal, s.uploaded_at(0), store)
    assert all(not b.any() and torch.equal(a, trained.modules[n][0]) for n, (a, b, _) in sent.modules.items())
    assert upload_bytes(sent, s.uploaded_at(0)) == sum(4 * 4 * d_in for _, d_in in SHAPES.values())
    assert factor_bytes(start, s.personal) == upload_bytes(sent, s.uploaded_at(0))  # A down, A up
    s.aggregate([sent])
    again = with_personal(s.distribute(4, "c0", alpha=8.0), "c0", 1, s.personal, store, SHAPES)
    for n, (a, b, _) in again.items():  # round 1: the new shared A, its own B from round 0
        assert torch.equal(b, trained.modules[n][1]) and torch.equal(a, s._tensors[f"{n}.A"])
    with pytest.raises(ValueError, match=r"client 'c0': its stored B of .* has shape \(48, 4\), but it trains"):
        with_personal(s.distribute(2, "c0", alpha=4.0), "c0", 1, s.personal, store, SHAPES)
    with pytest.raises(ValueError, match="needs a PersonalStore"):
        with_personal(start, "c0", 1, s.personal, None, SHAPES)


def test_withhold_zeroes_only_the_named_factor():
    (u,) = trained_updates(_fresh(), [2], seed=2)
    out = withhold(u, ["B"])
    assert isinstance(out, ClientUpdate) and out.client_id == u.client_id and out.num_examples == u.num_examples
    for n, (a, b, alpha) in out.modules.items():
        assert torch.equal(a, u.modules[n][0]) and not b.any() and b.shape == u.modules[n][1].shape
    assert withhold(u, []) is u


def _fresh():
    s = FedSALoRA()
    s.init_global(SHAPES, rank=4)
    return s


def test_options_and_state(tmp_path):
    with pytest.raises(ValueError, match="global_B must be 'none' or 'average'"):
        FedSALoRA(global_B="mean")
    s = _fresh()
    s.aggregate(trained_updates(s, [4, 2], seed=3))
    s.save(tmp_path / "s.safetensors")
    t = FedSALoRA()
    t.load(tmp_path / "s.safetensors")
    assert all(torch.equal(v, t._tensors[k]) for k, v in s._tensors.items())


def test_a_server_optimizer_steps_the_shared_A_only():
    s = FedSALoRA(dtype=torch.float64, server_opt="avgm", server_lr=0.5, server_momentum=0.0)
    s.init_global(SHAPES, rank=4)
    before = {k: v.clone() for k, v in s._tensors.items()}
    ups = trained_updates(s, [4, 4, 2], seed=4, dtype=torch.float64)
    s.aggregate(ups)
    for n in NAMES:  # x_1 = x_0 + 0.5 (average - x_0) for A; B stays the zeros it was
        avg = _row_average64(ups, n, 4, "A", before[f"{n}.A"])
        assert rel(s._tensors[f"{n}.A"], before[f"{n}.A"] + 0.5 * (avg - before[f"{n}.A"])) < TOL64
        assert not s._tensors[f"{n}.B"].any()
