"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) on every rule, against a float64
statement of Reddi et al.'s Algorithm 2 (and Hsu et al.'s server momentum) over several rounds."""
import pytest
import torch

from fedlora.bank import lora_scaling
from fedlora.federated import ClientUpdate
from fedlora.simulation.config import SimConfig
from fedlora.strategies import FedAvg, FFALoRA, FlexLoRA, FLoRA, HetLoRA, Strategy, registry

from .fl_helpers import SHAPES, best_rank64, rel, updates_for, weighted_delta64

NAMES = list(SHAPES)
KINDS = ["avgm", "adam", "yogi", "adagrad"]
HP = {"server_lr": 0.3, "server_momentum": 0.7, "beta1": 0.8, "beta2": 0.95, "tau": 0.05}
ROUNDS = 4
# float64 state against a float64 reference: the only differences are the order of float64
# additions (and an SVD for FlexLoRA), relative 1e-15 each over a few dozen operations.
TOL64 = 1e-10


def settings(kind):
    used = {"avgm": ("server_lr", "server_momentum")}.get(kind, ("server_lr", "beta1", "beta2", "tau"))
    return {k: v for k, v in HP.items() if k in used and not (kind == "adagrad" and k == "beta2")}


class Reddi:
    """Algorithm 2 of Reddi et al. (and FedAvgM), written out once more in float64, one tensor at a time."""

    def __init__(self, kind):
        self.kind, self.m, self.v = kind, {}, {}

    def step(self, key, delta):
        lr, tau = HP["server_lr"], HP["tau"]
        if self.kind == "avgm":
            self.m[key] = HP["server_momentum"] * self.m.get(key, 0.0) + delta
            return lr * self.m[key]
        b1, b2 = HP["beta1"], HP["beta2"]
        m_prev = self.m.get(key, torch.zeros_like(delta))
        v_prev = self.v.get(key, torch.full_like(delta, tau**2))  # v_{-1} = tau^2
        m = b1 * m_prev + (1 - b1) * delta
        if self.kind == "adam":
            v = b2 * v_prev + (1 - b2) * delta**2
        elif self.kind == "yogi":
            v = v_prev - (1 - b2) * delta**2 * torch.sign(v_prev - delta**2)
        else:
            v = v_prev + delta**2
        self.m[key], self.v[key] = m, v
        return lr * m / (v.sqrt() + tau)


def _rounds(ranks, shapes=SHAPES):
    return [updates_for(ranks, shapes, seed=10 + t, dtype=torch.float64) for t in range(ROUNDS)]


def _padded_average(ups, name, weights, R, factor):
    """sum_k w_k pad(A_k) or sum_k w_k s_k pad(B_k), written client by client."""
    d_out, d_in = SHAPES[name]
    out = torch.zeros((R, d_in) if factor == "A" else (d_out, R), dtype=torch.float64)
    for u, w in zip(ups, weights):
        a, b, alpha = u.modules[name]
        r = a.shape[0]
        if factor == "A":
            out[:r] += w * a
        else:
            out[:, :r] += w * lora_scaling(alpha, r) * b
    return out


def _data_weights(ups):
    n = [u.num_examples for u in ups]
    return [x / sum(n) for x in n]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule,ranks,factors", [
    (FedAvg, [4, 4, 4], ("A", "B")),
    (HetLoRA, [2, 6, 4], ("A", "B")),
    (FFALoRA, [6, 3, 6], ("B",)),
])
def test_factor_rules_follow_reddi_over_rounds(rule, ranks, factors, kind):
    kw = {"weighting": "examples"} if rule is HetLoRA else {}
    s = rule(server_opt=kind, dtype=torch.float64, **kw, **settings(kind))
    R = max(ranks)
    s.init_global(SHAPES, rank=R)
    ref = Reddi(kind)
    x = {f"{n}.{f}": s._tensors[f"{n}.{f}"].clone() for n in NAMES for f in ("A", "B")}
    for ups in _rounds(ranks):
        if rule is FFALoRA:  # A is the frozen shared one
            ups = [type(u)(u.client_id, u.num_examples, u.rank,
                           {n: (x[f"{n}.A"][: a.shape[0]].clone(), b, al) for n, (a, b, al) in u.modules.items()})
                   for u in ups]
        s.aggregate(ups)
        w = _data_weights(ups)
        for n in NAMES:
            for f in factors:
                target = _padded_average(ups, n, w, R, f)  # the rule alone: x~_t
                x[f"{n}.{f}"] = x[f"{n}.{f}"] + ref.step(f"{n}.{f}", target - x[f"{n}.{f}"])
    for key, want in x.items():
        assert rel(s._tensors[key], want) < TOL64, key
    if rule is FFALoRA:  # the frozen factor never moves
        assert all(torch.equal(s._tensors[f"{n}.A"], x[f"{n}.A"]) for n in NAMES)


@pytest.mark.parametrize("kind", KINDS)
def test_flora_steps_its_accumulated_update_in_weight_space(kind):
    s = FLoRA(server_opt=kind, dtype=torch.float64, **settings(kind))
    s.init_global(SHAPES)
    ref = Reddi(kind)
    D = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in NAMES}
    for t, ups in enumerate(_rounds([2, 5, 3])):
        s.aggregate(ups)
        for n in NAMES:  # x~_t - x_{t-1} is the round's weighted sum of products
            D[n] = D[n] + ref.step(n, weighted_delta64(ups, n))
            assert rel(s.global_delta(n), D[n]) < TOL64, (t, n)
        m_dense, m_A = s._tensors.get(f"server_opt.m.{NAMES[0]}.dense"), s._tensors.get(f"server_opt.m.{NAMES[0]}.A")
        if kind != "avgm":  # an elementwise step is dense from the first round, and so are m and v
            assert s._tensors[f"{NAMES[0]}.dense"].shape == SHAPES[NAMES[0]] and m_A is None
            assert s._tensors[f"server_opt.v.{NAMES[0]}"].shape == SHAPES[NAMES[0]]
        elif t < 2:  # linear: m = [mu m_(t-1) | Delta_t] stays stacked factors, rank 10 per round ...
            assert m_A.shape[0] == 10 * (t + 1) and m_dense.dim() == 1
        else:  # ... until it holds more numbers than a dense 48 x 40 matrix (30 * (48 + 40) > 1920): then
            # the stack is folded into a dense part and later rounds stack beside it
            assert m_A.shape[0] == 10 * (t - 2) and m_dense.shape == SHAPES[NAMES[0]]


@pytest.mark.parametrize("kind", KINDS)
def test_flexlora_steps_the_kept_top_k_in_weight_space(kind):
    s = FlexLoRA(server_opt=kind, dtype=torch.float64, **settings(kind))
    K = 6
    s.init_global(SHAPES, rank=K)
    ref = Reddi(kind)
    W = {n: torch.zeros(SHAPES[n], dtype=torch.float64) for n in NAMES}
    for ups in _rounds([2, 6, 3]):
        s.aggregate(ups)
        for n in NAMES:  # pseudo-gradient: the new weighted sum minus the kept top-K
            step = ref.step(n, weighted_delta64(ups, n) - W[n])
            W[n] = best_rank64(W[n] + step, K)
            assert rel(s.global_delta(n), W[n]) < TOL64, n
            assert s._tensors[f"{n}.S"].shape == (K,)


def _trained_from(strategy, round_idx, seed):
    """Three clients' updates as they would come back: each starts from ``strategy.distribute`` at rank 4
    and moves (seeded noise) only the factors the round trains (``trainable_at``: frozen ones stay put)."""
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for k in range(3):
        start = strategy.distribute(4, f"c{k}", alpha=8.0)
        mods = {}
        for name, (a, b, alpha) in start.items():
            moved = [t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                     if f in strategy.trainable_at(round_idx) else t for f, t in (("A", a), ("B", b))]
            mods[name] = (*moved, alpha)
        ups.append(ClientUpdate(f"c{k}", 5 + 3 * k, 4, mods))
    return ups


@pytest.mark.parametrize("name", registry.names())
def test_every_rule_admits_a_server_optimizer_or_refuses_it(name):
    """Every registered rule (the new ones as they land): with avgm at momentum 0 and lr 1 it is the rule
    alone, over three rounds; a rule without a pseudo-gradient refuses any server optimizer by name."""
    rule = registry.lookup(name)
    if rule.server_opt_space is None:
        with pytest.raises(ValueError, match=f"{name} does not admit a server optimizer"):
            registry.check_options(name, {"server_opt": "adam"})
        return
    plain, opt = registry.create(name), registry.create(name, {"server_opt": "avgm", "server_momentum": 0.0})
    for s in (plain, opt):
        s.init_global(SHAPES, rank=4)
    for t in range(3):
        for s in (plain, opt):
            assert s.aggregate(_trained_from(s, t, seed=t)).changed
    for n in NAMES:
        # fp32 state: the optimizer path adds and subtracts x_{t-1} (FlexLoRA: SVD of a stack with U S V^T
        # twice), relative rounding ~1e-7 per operation, amplified by the SVD's conditioning
        if plain.global_delta(n).any():
            assert rel(opt.global_delta(n), plain.global_delta(n)) < 1e-5, n
        else:  # no global product (FedSA-LoRA keeps B with the clients): the shared factor it steps
            assert rel(opt._tensors[f"{n}.A"], plain._tensors[f"{n}.A"]) < 1e-5, n
    assert any(k.startswith("server_opt.m.") for k in opt._tensors)


@pytest.mark.parametrize("rule,kw", [(HetLoRA, {"rank": 6}), (FLoRA, {}), (FlexLoRA, {"rank": 6})])
@pytest.mark.parametrize("kind", ["avgm", "adam"])
def test_state_and_moments_checkpoint_mid_run(rule, kw, kind, tmp_path):
    s = rule(server_opt=kind, **settings(kind))
    s.init_global(SHAPES, **kw)
    rounds = [updates_for([2, 6, 4], seed=t) for t in range(4)]
    for ups in rounds[:2]:
        s.aggregate(ups)
    s.save(tmp_path / "s.safetensors")
    resumed = rule()  # the state brings its optimizer and settings along, as it does its seed
    resumed.load(tmp_path / "s.safetensors")
    assert resumed.server_optimizer.settings() == s.server_optimizer.settings()
    assert any(k.startswith("server_opt.") for k in resumed._tensors)
    for ups in rounds[2:]:
        s.aggregate(ups)
        resumed.aggregate(ups)
    assert s._tensors.keys() == resumed._tensors.keys()
    for key in s._tensors:
        assert torch.equal(s._tensors[key], resumed._tensors[key]), key
    meta, tensors = s.state_dict().values()
    for bad in ({"server_opt": "nesterov"}, {**meta["server_opt"], "server_lr": -1.0}):
        with pytest.raises(ValueError, match="server_opt must be one of|server_lr must be > 0"):
            rule().load_state_dict({"meta": {**meta, "server_opt": bad}, "tensors": tensors})


@pytest.mark.parametrize("rule,kind", [(HetLoRA, "adam"), (FLoRA, "avgm"), (FlexLoRA, "yogi")])
def test_loaded_moments_are_checked(rule, kind):
    s = rule(server_opt=kind, **settings(kind))
    s.init_global(SHAPES, rank=4)
    s.aggregate(updates_for([2, 4]))
    meta, tensors = s.state_dict().values()
    moment = next(k for k in tensors if k.startswith("server_opt.m.") and tensors[k].dim() == 2)
    bad_shape = {**tensors, moment: torch.zeros(3, 3)}
    stray = {**tensors, "server_opt.m.model.layers.7.q_proj.A": torch.zeros(4, 40)}
    for bad in (bad_shape, stray):
        with pytest.raises(ValueError, match="state disagrees with its metadata: server_opt"):
            rule().load_state_dict({"meta": meta, "tensors": bad})
    with pytest.raises(ValueError, match="moments, but the state has no server optimizer"):
        rule().load_state_dict({"meta": {**meta, "server_opt": None}, "tensors": tensors})
    rule().load_state_dict({"meta": meta, "tensors": tensors})  # the intact state loads


def test_a_failed_round_keeps_the_moments(monkeypatch):
    s = FlexLoRA(server_opt="adam")
    s.init_global(SHAPES, rank=4)
    s.aggregate(updates_for([2, 4]))
    before = {k: v.clone() for k, v in s._tensors.items()}

    def broken(self, steps, updates):
        raise RuntimeError("SVD did not converge")
    monkeypatch.setattr(FlexLoRA, "_apply_step", broken)
    result = s.aggregate(updates_for([2, 4], seed=1))
    assert not result.changed
    assert s._tensors.keys() == before.keys()
    assert all(torch.equal(s._tensors[k], v) for k, v in before.items())


def test_options_are_checked_before_a_run():
    with pytest.raises(ValueError, match="server_opt must be one of"):
        FedAvg(server_opt="sgd")
    with pytest.raises(ValueError, match="server_momentum=0.5 has no effect with server_opt='adam'"):
        registry.check_options("fedavg", {"server_opt": "adam", "server_momentum": 0.5})
    with pytest.raises(ValueError, match="beta2=0.9 has no effect with server_opt='adagrad'"):
        registry.check_options("flexlora", {"server_opt": "adagrad", "beta2": 0.9})
    for bad in ({"server_lr": 0.0}, {"server_lr": True}, {"tau": -1.0}, {"beta1": 1.0}, {"server_lr": "1"}):
        with pytest.raises(ValueError):
            registry.check_options("flora", {"server_opt": "adam", **bad})
    with pytest.raises(ValueError, match="server_lr=0.5 has no effect with server_opt='none'"):
        registry.check_options("flora", {"server_lr": 0.5})
    registry.check_options("hetlora", {"server_opt": "yogi", "server_lr": 0.1, "tau": 1e-4})
    with pytest.raises(ValueError, match="config: .*server_opt must be one of"):
        SimConfig(strategy_options={"server_opt": "momentum"}).validate()
    SimConfig(strategy="flora", strategy_options={"server_opt": "avgm", "server_lr": 0.5}).validate()


def test_a_rule_without_a_pseudo_gradient_refuses_a_server_optimizer():
    class Replace(Strategy):  # keeps only the last client's factors: no x~_t - x_{t-1} to step along
        name = "replace_last"

        def _init_state(self):
            pass

        def _aggregate(self, updates, weights):
            pass

        def _distribute(self, ranks, alphas, client_id):
            return {}

    Replace()  # "none" is fine
    with pytest.raises(ValueError, match="replace_last does not admit a server optimizer.*flexlora"):
        Replace(server_opt="avgm")
