"""Data and model errors: one line and exit 2, found before the model loads; a bug keeps its traceback."""
from __future__ import annotations

import json

import pytest

from fedlora.cli import main

from .test_simulation import write_jsonl


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr("fedlora.simulation.setup.load_model", refuse)


def write_bad_line(path):
    write_jsonl(path, num_clients=2, per_client=3)
    lines = path.read_text().splitlines()
    lines.insert(2, '{"instruction": "three", "output": 3}')
    path.write_text("\n".join(lines) + "\n")
    return path


CASES = {
    "missing dataset": (lambda tmp: ["--dataset", str(tmp / "nowhere.jsonl")],
                        "dataset: '{tmp}/nowhere.jsonl' is not 'shakespeare', 'sharegpt', nor an existing"),
    "bad JSONL line": (lambda tmp: ["--dataset", str(write_bad_line(tmp / "bad.jsonl"))],
                       "dataset: {tmp}/bad.jsonl:3: field 'output' must be a string"),
    "missing client field": (lambda tmp: ["--dataset", str(write_jsonl(tmp / "d.jsonl")), "--client_field", "user"],
                             "dataset: field 'user' is missing from 48 record(s)"),
    "unknown model": (lambda tmp: ["--model", "meta-llama/Llama-3-8B"],
                      "model 'meta-llama/Llama-3-8B': unknown model spec 'meta-llama/Llama-3-8B'"),
    "bad target module": (lambda tmp: ["--model", "tiny-random-llama", "--target_modules", "q_proj,qkv_proj"],
                          "model 'tiny-random-llama': target_modules ['qkv_proj'] match no linear layer of the model; "
                          "it has ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', "
                          "'v_proj']"),
    "rank above a layer": (lambda tmp: ["--model", "tiny-random-llama", "--rank_levels", "4,128"],
                           "config: rank_levels has rank 128, larger than layer model.layers.0.self_attn.q_proj's "
                           "smaller side 64"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_input_errors_are_one_line_before_the_model_loads(case, tmp_path, capsys, no_model_load):
    args, expected = CASES[case]
    data = ["--dataset", str(write_jsonl(tmp_path / "ok.jsonl"))]
    rc = main(["simulate", "--model", "tiny-random-llama", *data, *args(tmp_path),
               "--output_dir", str(tmp_path / "out"), "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("fedlora simulate: " + expected.format(tmp=tmp_path)), err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the user's inputs become one line: an error of fedlora's own keeps its traceback."""
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("fedlora.simulation.run.make_strategy", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["simulate", "--model", "tiny-random-llama", "--dataset", str(write_jsonl(tmp_path / "d.jsonl")),
              "--output_dir", str(tmp_path / "out"), "--progress", "false", "--rank_levels", "2,4"])


def test_a_dirichlet_partition_needs_its_category_field(tmp_path, capsys, no_model_load):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(8)))
    assert main(["simulate", "--model", "tiny-random-llama", "--dataset", str(data), "--partition", "dirichlet",
                 "--output_dir", str(tmp_path / "out"), "--progress", "false"]) == 2
    assert "dataset: field 'category' is missing from 8 record(s)" in capsys.readouterr().err
