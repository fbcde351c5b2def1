"""A run's output folder: never two runs mixed in one folder, --overwrite, the resume line, the user's umask."""
from __future__ import annotations

import os
import stat

import pytest

from fedlora.cli import main
from fedlora.simulation import simulate
from fedlora.simulation.config import InputError

from .test_simulation import CLI_BASE, TINY, read_metrics, synthetic_data, tiny_model_toml, write_jsonl


def tiny_cfg(out, **kw) -> dict:
    return dict(dict(model=TINY, rounds=2, clients_per_round=2, local_steps=2, lr=1e-2, rank_levels=[2, 4],
                     strategy="flexlora", output_dir=str(out), progress=False), **kw)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a run loads its model: refusals must come before that (they cost nothing)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("fedlora.simulation.setup.load_model", refuse)


def cli_args(tmp_path, out, *extra) -> list[str]:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, num_clients=4, per_client=6)
    return ["simulate", "--config", str(tiny_model_toml(tmp_path / "sim.toml")), *CLI_BASE, "--rounds", "2",
            "--dataset", str(data), "--output_dir", str(out), *extra]


def test_a_new_run_into_a_folder_holding_another_run_is_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(cli_args(tmp_path, out)) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("fedlora.simulation.setup.load_model", refuse)
    assert main(cli_args(tmp_path, out, "--lr", "0.05")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert f"{out} already holds a flexlora run (2 of 2 rounds done)" in err
    for option in ("--resume true", "--output_dir", "--overwrite true"):
        assert option in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched


def test_overwrite_replaces_the_earlier_run_and_its_stale_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    simulate(tiny_cfg(out, rounds=3), data=synthetic_data())
    stale = out / "checkpoints" / "round-0003"
    assert stale.is_dir()
    result = simulate(tiny_cfg(out, overwrite=True), data=synthetic_data())
    assert [m["round"] for m in result.metrics] == [1, 2] == [m["round"] for m in read_metrics(out)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "round-0001", "round-0002"]
    assert not stale.exists()


def test_a_folder_that_holds_no_run_is_never_cleared(tmp_path, no_model_load):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(InputError, match="holds no fedlora run .* it is never cleared: choose another"):
            simulate(tiny_cfg(out, **flags), data=synthetic_data())
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(InputError, match="resume and overwrite exclude each other"):
        simulate(tiny_cfg("unused", resume=True, overwrite=True))


def test_a_resumed_run_says_from_which_round(tmp_path, capsys):
    out = tmp_path / "run"
    simulate(tiny_cfg(out, rounds=3), data=synthetic_data(), stop_after=1)
    capsys.readouterr()
    simulate(tiny_cfg(out, rounds=3, resume=True), data=synthetic_data())
    lines = capsys.readouterr().out.splitlines()
    assert f"fedlora simulate: resuming {out} at round 2 of 3 (rounds 1-1 restored from its checkpoint)" in lines
    assert [line.split(" |")[0] for line in lines if line.startswith("round ")] == ["round 2/3", "round 3/3"]


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so that modes that follow it cannot pass by coincidence."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_results_get_the_users_umask(tmp_path, umask_027):
    out = tmp_path / "run"
    simulate(tiny_cfg(out), data=synthetic_data())
    files = [p for p in out.rglob("*") if p.is_file()]
    folders = [out, *[p for p in out.rglob("*") if p.is_dir()]]
    assert {p.relative_to(out).as_posix() for p in files} >= {
        "metrics.jsonl", "metrics.png", "config.json", "base_eval.json", "checkpoints/latest",
        "checkpoints/round-0002/state.json", "checkpoints/round-0002/strategy.safetensors",
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    # what any new file or folder of the user gets under umask 027 (mkstemp/mkdtemp alone give 0600/0700)
    assert {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.relative_to(out).as_posix(): oct(0o640) for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == \
        {p.name: oct(0o750) for p in folders}
