"""The registry: names -> rules, strategy_options checked against the rule before it is built."""
import pytest

from fedlora.simulation.config import SimConfig
from fedlora.simulation.setup import make_strategy
from fedlora.strategies import FedAvg, FlexLoRA, Strategy, registry

SHAPES = {"m.q_proj": (16, 12)}


def test_every_registered_rule_is_a_strategy_under_its_own_name():
    assert set(registry.names()) >= {"fedavg", "ffalora", "hetlora", "flexlora", "flora"}
    for name in registry.names():
        cls = registry.lookup(name)
        assert issubclass(cls, Strategy) and cls.name == name


def test_create_passes_options_and_run_settings():
    s = registry.create("flexlora", {"max_rank": 3}, seed=7, use_rslora=True)
    assert isinstance(s, FlexLoRA) and (s.max_rank, s.seed, s.use_rslora) == (3, 7, True)
    assert isinstance(registry.create("fedavg", {"heterogeneous": "bucket"}), FedAvg)


def test_unknown_strategy_and_option_are_value_errors_naming_them():
    with pytest.raises(ValueError, match=r"unknown strategy 'fedprox'; known: fedavg"):
        registry.lookup("fedprox")
    with pytest.raises(ValueError, match=r"\['max_rnak'\] are not options of flexlora; it takes: .*max_rank"):
        registry.create("flexlora", {"max_rnak": 3})
    with pytest.raises(ValueError, match=r"config: strategy_options \['seed'\] are not options of flora"):
        SimConfig(strategy="flora", strategy_options={"seed": 1}).validate()  # a run setting, not an option


def test_rank_rules_are_hooks_of_the_rule():
    # FedAvg trains everyone at one rank: the smallest, and refuses a mix unless bucket mode.
    assert FedAvg().global_rank([8, 4, 16]) == 4 and FlexLoRA().global_rank([8, 4, 16]) == 16
    with pytest.raises(ValueError, match="config: FedAvg averages A and B separately"):
        make_strategy(SimConfig(strategy="fedavg"), SHAPES, [4, 8])
    bucket = make_strategy(SimConfig(strategy="fedavg", strategy_options={"heterogeneous": "bucket"}), SHAPES, [4, 8])
    assert bucket.module_ranks == {"m.q_proj": 4}


def test_a_bad_option_value_is_a_settings_error_before_anything_loads():
    with pytest.raises(ValueError, match=r"config: strategy_options of hetlora: prune_gamma must be in \(0, 1\), got 2"):
        SimConfig(strategy="hetlora", strategy_options={"prune_gamma": 2}).validate()
    with pytest.raises(ValueError, match=r"config: strategy_options of fedavg: heterogeneous must be 'refuse' or 'bucket'"):
        SimConfig(strategy="fedavg", strategy_options={"heterogeneous": "yes"}).validate()
