"""Settings and data files are parsed strictly: a value of the wrong type or out of range is one line
naming the setting, the value and what is allowed (exit 2 from the CLI, before any model is loaded),
never converted into something plausible. TOML files, --key value overrides and dicts alike."""
from __future__ import annotations

import re

import pytest

from fedlora.cli import main
from fedlora.data import read_jsonl
from fedlora.simulation import setup
from fedlora.simulation.config import SimConfig

from .test_simulation import tiny_model_toml, write_jsonl

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

BAD_VALUES = [  # (setting, TOML value, message)
    ("use_rslora", '"false"', "use_rslora must be true or false, got str 'false'"),
    ("resume", '"no"', "resume must be true or false, got str 'no'"),
    ("progress", "1", "progress must be true or false, got int 1"),
    ("rounds", "3.0", "rounds must be an integer, got float 3.0"),
    ("rounds", "0", r"rounds must be >= 1, got 0"),
    ("seq_len", "true", "seq_len must be an integer, got bool True"),
    ("lr", "inf", "lr must be a finite number, got inf"),
    ("lr", "nan", "lr must be a finite number, got nan"),
    ("lr", "-0.1", "lr must be > 0, got -0.1"),
    ("lr", '"1e-3"', "lr must be a number, got str '1e-3'"),
    ("momentum", "1.0", r"momentum must be in \[0, 1\), got 1"),
    ("weight_decay", "-1e-4", "weight_decay must be >= 0, got -0.0001"),
    ("lora_dropout", "1", r"lora_dropout must be in \[0, 1\), got 1"),
    ("dirichlet_alpha", "0.0", "dirichlet_alpha must be > 0, got 0"),
    ("heldout_fraction", "1.5", r"heldout_fraction must be in \[0, 1\), got 1.5"),
    ("clients_per_round", "2.5", r"clients_per_round \(a fraction\) must be in \(0, 1\), got 2.5"),
    ("clients_per_round", "0", r"clients_per_round \(a count\) must be >= 1, got 0"),
    ("num_clients", "-1", "num_clients must be >= 0, got -1"),
    ("rank_levels", "[4, 8.0]", r"rank_levels\[1\] must be an integer, got float 8.0"),
    ("rank_levels", "[4, 0]", r"rank_levels\[1\] must be >= 1, got 0"),
    ("rank_levels", "[]", "rank_levels must not be empty"),
    ("target_modules", '"q_proj"', "target_modules must be a list, got str 'q_proj'"),
    ("target_modules", '["q_proj", 3]', r"target_modules\[1\] must be a string, got int 3"),
    ("strategy", '"fedsgd"', "strategy must be one of .*; got 'fedsgd'"),
    ("model", "7", "model must be a string, got int 7"),
    ("seed", "-3", "seed must be >= 0, got -3"),
]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every settings error must come before it."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")
    monkeypatch.setattr(setup, "load_model", boom)


@pytest.mark.parametrize("name, value, message", BAD_VALUES)
def test_bad_toml_settings_exit_2_with_one_line_before_any_model_loads(name, value, message, tmp_path, capsys,
                                                                       no_model):
    toml = tmp_path / "run.toml"
    toml.write_text(f"[simulate]\n{name} = {value}\n")
    assert main(["simulate", "--config", str(toml), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedlora simulate: config: ")
    assert re.search(message, err), err


@pytest.mark.parametrize("name, value, message", BAD_VALUES)
def test_bad_dict_settings_are_refused_too(name, value, message):
    with pytest.raises(ValueError, match=message):
        SimConfig.from_dict({name: tomllib.loads(f"v = {value}")["v"]})


@pytest.mark.parametrize("args, message", [
    (["--use_rslora", "yes"], "--use_rslora must be true, false, 1 or 0, got 'yes'"),
    (["--use_rslora", "True"], "--use_rslora must be true, false, 1 or 0, got 'True'"),
    (["--resume", "no"], "--resume must be true, false, 1 or 0, got 'no'"),
    (["--rounds", "3.0"], "--rounds must be an integer, got '3.0'"),
    (["--rounds", "1e3"], "--rounds must be an integer, got '1e3'"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--lr", "fast"], "--lr must be a number, got 'fast'"),
    (["--momentum", "1"], r"momentum must be in \[0, 1\), got 1"),
    (["--client_ranks", "4,8.5", "--rank_distribution", "list"], "--client_ranks must be an integer, got '8.5'"),
    (["--rank_levels", "[" * 5000 + "]" * 5000], "--rank_levels is JSON nested too deeply"),
])
def test_bad_command_line_settings_exit_2_with_one_line(args, message, tmp_path, capsys, no_model):
    assert main(["simulate", *args, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_command_line_booleans_and_numbers_that_spell_their_type():
    cfg = SimConfig.load(None, ["--use_rslora", "1", "--progress", "false", "--resume", "0", "--lr", "1",
                                "--clients_per_round", "0.5", "--rounds", "+4"])
    assert (cfg.use_rslora, cfg.progress, cfg.resume) == (True, False, False)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.rounds == 4
    assert cfg.clients_per_round == 0.5


def test_a_toml_file_that_is_not_utf8_names_the_file(tmp_path, capsys, no_model):
    toml = tmp_path / "run.toml"
    toml.write_bytes(b"rounds = 3\nmodel = \"\xff\xfe\"\n")
    assert main(["simulate", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedlora simulate: config: {toml}: ") and "utf-8" in err and err.count("\n") == 1


def test_a_rank_larger_than_a_layer_is_an_error_naming_the_layer(tmp_path, capsys):
    # the tiny Llama: hidden 32, 2 of 4 heads for keys/values: v_proj is 16 x 32, rank 24 cannot be its update's
    args = ["simulate", "--config", str(tiny_model_toml(tmp_path / "tiny.toml")), "--dataset",
            str(write_jsonl(tmp_path / "d.jsonl")), "--rank_levels", "4,24", "--output_dir", str(tmp_path / "out"),
            "--progress", "false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "config: rank_levels has rank 24, larger than layer model.layers.0.self_attn.v_proj's smaller side 16 " \
           "(16 x 32); allowed: 1..16" in err and err.count("\n") == 1
    assert main([*args[:-4], "--rank_levels", "4", "--export_rank", "20", *args[-4:]]) == 2
    assert "config: export_rank has rank 20, larger than layer" in capsys.readouterr().err


# ------------------------------------------------------------------ data files
def test_invalid_utf8_in_a_data_file_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", num_clients=1, per_client=3)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"Repeat", b"Rep\xc3\x28at")
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"{path}:3: not valid UTF-8 \(byte \d+ of the line\)"):
        read_jsonl(path)


def test_a_bad_line_in_a_data_file_names_file_and_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", num_clients=1, per_client=3)
    path.write_text(path.read_text() + '{"instruction": ' + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=rf"{path}:4: JSON nested too deeply"):
        read_jsonl(path)
    path.write_text('{"instruction": "a", "output": 3}\n')
    assert main(["simulate", "--config", str(tiny_model_toml(tmp_path / "tiny.toml")), "--dataset", str(path),
                 "--output_dir", str(tmp_path / "out"), "--progress", "false"]) == 2
    assert f"{path}:1: field 'output' must be a string" in capsys.readouterr().err


def test_flower_settings_are_strict_too():
    pytest.importorskip("flwr")
    from fedlora.integrations.flower import load_run_config

    with pytest.raises(ValueError, match="round-timeout-s must be a number, got str '9'"):
        load_run_config({"round-timeout-s": "9"})
    with pytest.raises(ValueError, match="min-nodes must be an integer, got float 2.5"):
        load_run_config({"min-nodes": 2.5})
    with pytest.raises(ValueError, match="node-start-timeout-s must be > 0, got 0"):
        load_run_config({"node-start-timeout-s": 0})
    with pytest.raises(ValueError, match="use_rslora must be true, false, 1 or 0, got 'yes'"):
        load_run_config({"use-rslora": "yes"})
