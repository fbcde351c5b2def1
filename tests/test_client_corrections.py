"""FedProx's proximal term and SCAFFOLD's control variates inside the batched trainer: equal to the
per-client sequential computation, and to a float64 re-statement of each client's objective
(the terms written into the loss, stock torch optimizers); SCAFFOLD's option II and server update
against their formulas; simulate end to end (invariant, bytes, resume, config)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedlora.data.clients import IGNORE_INDEX, collate_clients
from fedlora.layers import segments
from fedlora.models import load_model
from fedlora.simulation import simulate
from fedlora.simulation.config import SimConfig
from fedlora.simulation.corrections import load_controls
from fedlora.simulation.personal import PersonalStore
from fedlora.simulation.round import control_shift_of, control_step
from fedlora.simulation.trainer import ExampleStream, FederatedModel, LocalPlan, train_clients
from fedlora.strategies import HetLoRA, registry

from .fl_helpers import SHAPES, rel
from .test_simulation import TARGETS, TINY, synthetic_clients, synthetic_data

RANKS, ALPHAS, STEPS = [2, 4, 8], [4.0, 4.0, 16.0], [3, 1, 2]  # clients drop out of the batch at different steps
LR, MU = 0.05, 10.0  # LR * MU < 1: the proximal pull is strong but stable


def _random_controls(shapes, ranks, gen, frozen_A=False, scale=0.3):
    return {n: (None if frozen_A else scale * torch.randn(r, d_in, generator=gen, dtype=torch.float64),
                scale * torch.randn(d_out, r, generator=gen, dtype=torch.float64))
            for n, (d_out, d_in) in shapes.items() for r in [ranks[n]]}


def _setup(dtype, frozen_A=False):
    """A tiny model, 3 clients' nonzero starting factors and SCAFFOLD controls (c and each c_k)."""
    model, tok = load_model(TINY, dtype=dtype, seed=0)
    fm = FederatedModel(model, TARGETS)
    gen = torch.Generator().manual_seed(7)
    starts = [{n: (torch.randn(r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5,
                   torch.randn(d_out, r, generator=gen, dtype=torch.float64) / r, a)
               for n, (d_out, d_in) in fm.module_shapes.items()} for r, a in zip(RANKS, ALPHAS)]
    sent = [_random_controls(fm.module_shapes, dict.fromkeys(fm.module_shapes, r), gen, frozen_A) for r in RANKS]
    own = [_random_controls(fm.module_shapes, dict.fromkeys(fm.module_shapes, r), gen, frozen_A) for r in RANKS]
    return fm, tok.pad_token_id, synthetic_clients(3), starts, sent, own


def _fedlora(dtype, optimizer, batched, prox_mu=MU, scaffold=True, frozen_A=False):
    fm, pad, clients, starts, sent, own = _setup(dtype, frozen_A)
    shifts = [control_shift_of(c, o, s) for c, o, s in zip(sent, own, starts)] if scaffold else None
    plan = LocalPlan(steps=STEPS, batch_size=2, lr=LR, lr_schedule="linear", optimizer=optimizer,
                     weight_decay=0.01 if optimizer == "adamw" else 0.0, batched=batched, train_A=not frozen_A,
                     prox_mu=prox_mu, controls=shifts)
    fm.load_clients([{n: (a.to(dtype), b.to(dtype), al) for n, (a, b, al) in s.items()} for s in starts])
    train_clients(fm, clients, [ExampleStream(c.train, seed=100 + k) for k, c in enumerate(clients)], plan, pad)
    trained = [{n: tuple(t.detach().clone() for t in f) for n, f in fm.live_factors(k).items()} for k in range(3)]
    return trained, plan, starts, sent, own


def _reference(k, optimizer, prox_mu=MU, scaffold=True, frozen_A=False):
    """Client k alone in float64: loss = its mean token loss + mu/2 ||theta - theta^0||^2 + <c - c_k, theta>,
    minimised by a stock torch optimizer; returns its trained factors."""
    fm, pad, clients, starts, sent, own = _setup(torch.float64, frozen_A)
    fm.load_clients([starts[k]])
    centre, shift = [], []  # per trained factor, in live_factors' order
    for name, (A, B) in fm.live_factors(0).items():
        c, o = sent[k][name], own[k][name]
        for key, p, c_p, o_p in (("A", A, c[0], o[0]), ("B", B, c[1], o[1])):
            if key == "A" and frozen_A:
                continue
            centre.append(p.detach().clone())
            shift.append(c_p - o_p)
    banks = fm.banks()
    for bank in banks:
        bank.requires_grad_(True)
        if frozen_A:
            bank.A.requires_grad_(False)
    leaves = [t for b in banks for t in ((b.B,) if frozen_A else (b.A, b.B))]
    opt = (torch.optim.SGD(leaves, lr=LR) if optimizer == "sgd"
           else torch.optim.AdamW(leaves, lr=LR, weight_decay=0.01))
    stream = ExampleStream(clients[k].train, seed=100 + k)
    fm.model.train()
    for s in range(STEPS[k]):
        batch = collate_clients([stream.take(2)], pad)
        with segments(fm.model, batch["seg_lens"].tolist(), [0]):
            logits = fm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
        live = [t for f in fm.live_factors(0).values() for t in ((f[1],) if frozen_A else f)]
        if prox_mu:
            loss = loss + prox_mu / 2 * sum(((p - c) ** 2).sum() for p, c in zip(live, centre))
        if scaffold:
            loss = loss + sum((p * d).sum() for p, d in zip(live, shift))
        loss.backward()
        opt.param_groups[0]["lr"] = LR * (1 - s / STEPS[k])
        opt.step()
        opt.zero_grad()
    return {n: tuple(t.detach().clone() for t in f) for n, f in fm.live_factors(0).items()}


def _worst(got, want, start=None) -> float:
    """The largest relative difference of the factors (of their changes from ``start`` when given)."""
    def change(f, name, i):
        return f[name][i] - (0 if start is None else start[name][i].to(f[name][i]))
    return max(rel(change(got, n, i), change(want, n, i)) for n in want for i in range(2)
               if want[n][i].requires_grad or start is None or not torch.equal(want[n][i], start[n][i]))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("frozen_A", [False, True], ids=["A_and_B", "B_only"])
def test_batched_corrections_equal_sequential(optimizer, frozen_A):
    batched, *_ = _fedlora(torch.float32, optimizer, batched=True, frozen_A=frozen_A)
    sequential, *_ = _fedlora(torch.float32, optimizer, batched=False, frozen_A=frozen_A)
    # the same arithmetic per client; only fp32 reduction orders of batched GEMMs differ (~1e-7)
    assert max(_worst(b, s) for b, s in zip(batched, sequential)) < 1e-5


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("prox_mu,scaffold", [(MU, False), (0.0, True), (MU, True)],
                         ids=["fedprox", "scaffold", "both"])
def test_corrections_equal_a_float64_restatement(optimizer, prox_mu, scaffold):
    got, plan, starts, sent, own = _fedlora(torch.float64, optimizer, batched=True, prox_mu=prox_mu,
                                            scaffold=scaffold)
    plain, *_ = _fedlora(torch.float64, optimizer, batched=True, prox_mu=0.0, scaffold=False)
    for k in range(3):
        want = _reference(k, optimizer, prox_mu, scaffold)
        # compared as changes from the start; fedlora's token loss is computed in fp32 (client_losses),
        # ~1e-7 relative in the loss gradients, which the few steps carry into the changes
        err = _worst(got[k], want, starts[k])
        assert err < 1e-5, (k, err)  # measured 1e-8 (SGD) to 2e-6 (Adam divides tiny gradients by their own size)
        if scaffold or STEPS[k] > 1:  # (a proximal term has no gradient at a client's first step, theta = theta^0)
            assert _worst(plain[k], want, starts[k]) > 100 * max(err, 1e-6)  # the terms matter at this tolerance


def test_scaffold_option_two_and_frozen_factors():
    got, plan, starts, sent, own = _fedlora(torch.float64, "sgd", batched=True, frozen_A=True)
    for k in range(3):
        delta, new_own = control_step(sent[k], own[k], starts[k], got[k], plan.lr_sum(k))
        lr_sum = sum(LR * (1 - s / STEPS[k]) for s in range(STEPS[k]))  # K * eta_l under the linear schedule
        for name, (c_A, c_B) in sent[k].items():
            want_B = own[k][name][1] - c_B + (starts[k][name][1] - got[k][name][1]) / lr_sum  # c_k^+, option II
            assert rel(new_own[name][1], want_B) < 1e-12
            assert rel(delta[name][1], want_B - own[k][name][1]) < 1e-12
            assert c_A is None and delta[name][0] is None and new_own[name][0] is None
            assert torch.equal(got[k][name][0], starts[k][name][0])  # A frozen: never moved


def test_server_control_update_and_refusals():
    s = HetLoRA(dtype=torch.float64, self_prune=False)
    s.init_global(SHAPES, rank=8)
    gen = torch.Generator().manual_seed(3)
    ranks = {"a": 2, "b": 8, "c": 5}
    deltas = {cid: _random_controls(SHAPES, dict.fromkeys(SHAPES, r), gen) for cid, r in ranks.items()}
    served = {cid: dict.fromkeys(SHAPES, r) for cid, r in ranks.items()}
    bad = {n: (a[:1], b) for n, (a, b) in deltas["c"].items()}
    nan = {n: (a, b * float("nan")) for n, (a, b) in deltas["c"].items()}
    assert "has shape (1, 40), expected (5, 40)" in s.control_problem(bad, served["c"], "AB")
    assert "not finite" in s.control_problem(nan, served["c"], "AB")
    assert "expected the modules" in s.control_problem({}, served["c"], "AB")
    assert "no work" in s.control_problem(deltas["c"], None, "AB")
    assert s.update_controls(deltas, served, num_clients=10, factors="AB") == {}
    for name, (d_out, d_in) in SHAPES.items():
        want_A, want_B = torch.zeros(8, d_in, dtype=torch.float64), torch.zeros(d_out, 8, dtype=torch.float64)
        for cid, r in ranks.items():
            want_A[:r] += deltas[cid][name][0] / 10
            want_B[:, :r] += deltas[cid][name][1] / 10
        c = s.server_controls({name: 8 for name in SHAPES}, "AB")[name]
        assert rel(c[0], want_A) < 1e-15 and rel(c[1], want_B) < 1e-15
        assert torch.equal(s.server_controls(dict.fromkeys(SHAPES, 3), "AB")[name][1], c[1][:, :3])
    refused = s.update_controls({"a": deltas["a"], "c": nan}, served, num_clients=10, factors="AB")
    assert list(refused) == ["c"]
    with pytest.raises(ValueError, match="num_clients"):
        s.update_controls(deltas, served, num_clients=2, factors="AB")


def _scaffold_run(tmp_path, name, stop_after=None, **kw):
    cfg = dict(model=TINY, rounds=3, clients_per_round=3, local_steps=2, batch_size=2, lr=1e-2,
               rank_levels=[2, 4, 8], strategy="hetlora", strategy_options={"self_prune": False}, progress=False,
               eval_every=0, eval_base=False, output_dir=str(tmp_path / name))
    cfg.update(kw)
    return simulate(cfg, data=synthetic_data(5), stop_after=stop_after)


SCAFFOLD_RUNS = {  # every rule that admits SCAFFOLD (the new ones as they land), one rank where it needs one
    name: {"rank_distribution": "homogeneous", "strategy_options": {}}
    for name in registry.names() if registry.lookup(name).admits_scaffold}
SCAFFOLD_RUNS["hetlora"] = {"strategy_options": {"self_prune": False}}  # mixed ranks: c_k padded into c
if "rolora" in SCAFFOLD_RUNS:  # c of one factor per round, beside a server optimizer
    SCAFFOLD_RUNS["rolora"]["strategy_options"] = {"server_opt": "avgm", "server_lr": 0.5}


@pytest.mark.parametrize("strategy", list(SCAFFOLD_RUNS))
def test_simulate_keeps_c_the_average_of_every_clients_c_k(strategy, tmp_path):
    """SCAFFOLD's invariant: with every Delta c_k accepted, c = (1/N) sum over all N clients of pad(c_k)."""
    kw = SCAFFOLD_RUNS[strategy]
    res = _scaffold_run(tmp_path, "scaffold", scaffold=True, prox_mu=0.1, strategy=strategy, **kw)
    store = PersonalStore(tmp_path / "scaffold" / "controls")  # where each client kept its own c_k
    controls = {c: load_controls(store, c, 3) for c in res.client_ranks}
    rule, N = res.strategy, len(res.client_ranks)
    assert N == 5 and all(c is not None for c in controls.values())  # 3 of 5 per round: each trained
    for name in rule.module_shapes:
        R = rule.module_ranks[name]
        c_A, c_B = rule.server_controls({name: R}, "AB")[name]
        want_A, want_B = torch.zeros_like(c_A), torch.zeros_like(c_B)
        for own in controls.values():
            a, b = own[name]
            if a is not None:
                want_A[: a.shape[0]] += a / N
            if b is not None:
                want_B[:, : b.shape[1]] += b / N
        sent_back = set().union(*(rule.uploaded_at(t) for t in range(3)))
        for factor, c, want in (("A", c_A, want_A), ("B", c_B, want_B)):
            if want.norm() == 0:  # a factor no round sends back (FFA-LoRA's A, FedSA-LoRA's B) keeps c = 0
                assert torch.equal(c, want) and factor not in sent_back
            else:  # fp32 sums of a few terms: rounding ~1e-7 relative
                assert rel(c, want) < 1e-5
        assert (c_A if sent_back == {"A"} else c_B).norm() > 0


def test_scaffold_bytes_and_resume(tmp_path):
    plain = _scaffold_run(tmp_path, "plain")
    both = _scaffold_run(tmp_path, "both", scaffold=True)
    for p, s in zip(plain.metrics, both.metrics):  # c down and Delta c_k up: the trained factors' size again
        assert s["bytes_down"] == 2 * p["bytes_down"] and s["bytes_up"] == 2 * p["bytes_up"]
    # stopped after round 0 and resumed: the clients' c_k come back from the checkpoint
    _scaffold_run(tmp_path, "stop", scaffold=True, stop_after=1)
    resumed = _scaffold_run(tmp_path, "stop", scaffold=True, resume=True)
    for key, value in both.strategy._tensors.items():
        assert torch.equal(resumed.strategy._tensors[key], value), key
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in both.metrics]


def test_config_refuses_scaffold_where_it_is_not_defined():
    with pytest.raises(ValueError, match="scaffold needs a rule .*fedavg, ffalora, hetlora.*flora's clients"):
        SimConfig(strategy="flora", scaffold=True).validate()
    for rule in ("flexlora", "fedsvd"):  # a new basis every round (FlexLoRA's and FedSVD's re-factorisation)
        with pytest.raises(ValueError, match=f"scaffold needs .*; {rule}'s clients"):
            SimConfig(strategy=rule, scaffold=True).validate()
    for bad in (-0.1, float("inf"), True):
        with pytest.raises(ValueError, match="config: prox_mu must be"):
            SimConfig(prox_mu=bad).validate()
    with pytest.raises(ValueError, match="scaffold must be true or false"):
        SimConfig(strategy="fedavg", scaffold="yes").validate()
    assert SimConfig.load(None, ["--strategy", "ffalora", "--scaffold", "true", "--prox_mu", "0.01"]).scaffold


def test_a_saved_c_is_checked_when_loaded(tmp_path):
    s = HetLoRA(self_prune=False)
    s.init_global(SHAPES, rank=4)
    gen = torch.Generator().manual_seed(5)
    delta = {n: tuple(t.float() for t in pair) for n, pair in _random_controls(SHAPES, dict.fromkeys(SHAPES, 4),
                                                                                gen).items()}
    s.update_controls({"a": delta}, {"a": dict.fromkeys(SHAPES, 4)}, num_clients=3, factors="AB")
    s.save(tmp_path / "s.safetensors")
    back = HetLoRA(self_prune=False)
    back.load(tmp_path / "s.safetensors")
    name = next(iter(SHAPES))
    assert torch.equal(back.server_controls({name: 4}, "AB")[name][1], delta[name][1] / 3)
    meta, tensors = s.state_dict().values()
    for key, value in ((f"scaffold.{name}.A", torch.zeros(3, SHAPES[name][1])),
                       ("scaffold.model.layers.9.q_proj.B", torch.zeros(48, 4))):
        with pytest.raises(ValueError, match="expected \\[4, 40\\]|not a control variate of this state's modules"):
            HetLoRA().load_state_dict({"meta": meta, "tensors": {**tensors, key: value}})


def test_scaffold_refuses_client_level_dp():
    from fedlora.federated import DPConfig

    s = HetLoRA(dp=DPConfig(clip_norm=1.0, noise_multiplier=0.5))
    s.init_global(SHAPES, rank=4)
    with pytest.raises(ValueError, match="carries each client's update without the DP noise"):
        s.server_controls(dict.fromkeys(SHAPES, 4), "AB")
