"""`fedlora benchmark`: grid expansion, baselines, the report rebuilt from cells, a killed grid resumed."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedlora.simulation.benchmark import BASELINES, Grid, cell_name
from fedlora.simulation.benchmark_report import load_cells, write_report


def grid_dict(**axes):
    return {"simulate": {"model": "tiny-random-llama", "rounds": 2, "rank_levels": [2, 4]},
            "grid": axes or {"strategy": ["flexlora", "bucket", "homogeneous-max"],
                             "rank_distribution": ["uniform", "heavy_tail"], "seed": [0, 1]},
            "benchmark": {"output_dir": "OUT", "metric": "eval_unseen_loss"}}


def test_grid_expands_every_combination_in_order_with_baselines_resolved(tmp_path):
    grid = Grid.from_dict(grid_dict(), output_dir=tmp_path)
    cells = grid.cells()
    assert len(cells) == 3 * 2 * 2 and grid.metric == "eval_unseen_loss"
    assert [c.values for c in cells[:3]] == [
        {"strategy": "flexlora", "rank_distribution": "uniform", "seed": 0},
        {"strategy": "flexlora", "rank_distribution": "uniform", "seed": 1},
        {"strategy": "flexlora", "rank_distribution": "heavy_tail", "seed": 0}]
    assert cells[0].name == "strategy-flexlora__rank_distribution-uniform__seed-0"
    by_name = {c.name: c for c in cells}
    bucket = by_name["strategy-bucket__rank_distribution-heavy_tail__seed-1"]
    assert (bucket.config.strategy, bucket.config.strategy_options, bucket.config.rank_distribution,
            bucket.config.seed) == ("fedavg", {"heterogeneous": "bucket"}, "heavy_tail", 1)
    assert bucket.rule == "bucket" and bucket.config.resume and bucket.config.rounds == 2
    assert bucket.config.output_dir == str(tmp_path / "cells" / bucket.name)
    top = [c for c in cells if c.rule == "homogeneous-max"]
    assert all(c.config.strategy == "fedavg" and c.config.rank_distribution == "homogeneous" for c in top)
    # homogeneous-max does not depend on the rank distribution: one run per seed serves both columns.
    assert {c.name: c.run for c in top} == {
        f"strategy-homogeneous-max__rank_distribution-{d}__seed-{s}":
            f"strategy-homogeneous-max__rank_distribution-uniform__seed-{s}"
        for d in ("uniform", "heavy_tail") for s in (0, 1)}
    assert len(grid.runs()) == 12 - 2
    assert set(BASELINES) == {"bucket", "homogeneous-max", "local-only"}


def test_grid_over_other_fields_and_odd_values(tmp_path):
    grid = Grid.from_dict({"simulate": {"model": "tiny-random-llama"},
                           "grid": {"rank_levels": [[4, 8], [2, 16]], "lr": [1e-3], "quantization": ["none", "nf4"]}},
                          output_dir=tmp_path)
    cells = grid.cells()
    assert [c.config.rank_levels for c in cells] == [[4, 8], [4, 8], [2, 16], [2, 16]]
    assert cells[1].name == "rank_levels-4_8__lr-0.001__quantization-nf4" and cells[1].config.quantization == "nf4"
    assert cell_name({}) == "single" and len(Grid.from_dict({}, output_dir=tmp_path).cells()) == 1


@pytest.mark.parametrize("data, message", [
    ({"grid": {"strategy": ["flexlora"]}, "extra": {}}, r"unknown table\(s\) \['extra'\]"),
    ({"grid": {"stratgy": ["flexlora"]}}, "'stratgy' is not a simulate setting"),
    ({"grid": {"seed": 3}}, "seed must be a non-empty list"),
    ({"grid": {"seed": []}}, "seed must be a non-empty list"),
    ({"grid": {"seed": [1, 1]}}, "seed lists a value twice"),
    ({"simulate": {"seed": 1}, "grid": {"seed": [2]}}, r"\['seed'\] set in both"),
    ({"simulate": {"output_dir": "x"}}, "'output_dir' is the benchmark's to set"),
    ({"benchmark": {"metrc": "x"}}, "unknown \\[benchmark\\] setting"),
    ({"grid": {"strategy": ["flexlora", "nonsense"]}}, "cell strategy-nonsense: config: strategy must be one of"),
    ({"grid": {"rank_levels": [[1, 2], "1_2"]}, "simulate": {}}, "get the same folder name"),
])
def test_grid_rejects_bad_files_with_a_reason(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        Grid.from_dict(data, output_dir=tmp_path)


def test_grid_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "g.toml"
    bad.write_text("[grid\n")
    with pytest.raises(ValueError, match="grid file .*g.toml"):
        Grid.load(bad)


# ---------------------------------------------------------------- the report, from cells alone

def fake_cell(root: Path, grid: Grid, cells, losses: list[float], base_loss: float, bytes_up: int):
    """A finished run folder as simulate + run_cells leave it (metrics.jsonl, base_eval.json, cell.json)."""
    folder = Path(cells[0].config.output_dir)
    folder.mkdir(parents=True)
    lines = [{"round": r, "eval_heldout_loss": v, "eval_heldout_ppl": math.exp(v), "eval_unseen_loss": v + 1,
              "eval_unseen_ppl": math.exp(v + 1), "bytes_up": bytes_up, "bytes_down": 2 * bytes_up,
              "total_bytes_up": bytes_up * r, "total_bytes_down": 2 * bytes_up * r, "wall_time_s": 0.5,
              "clients": ["a", "b"], "ranks": [2, 4], "client_train_loss": {"a": v + 0.1, "b": v + 0.2},
              "spectrum": {"model.layers.0.q_proj": [4.0, 2.0, 2.0, v], "model.layers.1.q_proj": [1.0, 1.0, 0.0, 0.0]}}
             for r, v in enumerate(losses, start=1)]  # simulate counts rounds from 1
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (folder / "base_eval.json").write_text(json.dumps({"eval_heldout_loss": base_loss,
                                                       "eval_heldout_ppl": math.exp(base_loss)}))
    (folder / "cell.json").write_text(json.dumps({
        "name": cells[0].run, "labels": [{"cell": c.name, "values": c.values} for c in cells],
        "config": json.loads(cells[0].config.to_json()), "round_time_s": 1.0}))


def test_report_is_rebuilt_from_finished_cells(tmp_path):
    grid = Grid.from_dict(grid_dict(strategy=["flexlora", "bucket", "homogeneous-max"],
                                    rank_distribution=["uniform", "heavy_tail"], seed=[0, 1, 2]), output_dir=tmp_path)
    rng = np.random.default_rng(0)
    final = {}
    runs = grid.runs()
    for k, (run, cells) in enumerate(runs.items()):
        if run.endswith("seed-2") and "bucket__rank_distribution-heavy_tail" in run:
            continue  # an unfinished cell: no cell.json, so not in the report
        losses = sorted(rng.uniform(1, 3, size=3).tolist(), reverse=True)
        fake_cell(tmp_path, grid, cells, losses, base_loss=4.0, bytes_up=1000 * (1 + k % 3))
        for c in cells:
            final[c.name] = losses[-1]
    (tmp_path / "grid.json").write_text(json.dumps({"metric": "eval_heldout_loss",
                                                    "cells": [c.name for c in grid.cells()]}))
    paths = write_report(tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["cell"] for r in rows] == [c.name for c in grid.cells() if c.name in final]  # grid order
    for r in rows:
        assert float(r["final_eval_heldout_loss"]) == pytest.approx(final[r["cell"]], rel=1e-12)
        assert float(r["base_eval_heldout_loss"]) == 4.0 and r["rounds"] == "3"
    md = paths["md"].read_text()
    # Every mean ± std in the table equals numpy's over the seeds of that rule and distribution.
    best = {}
    for dist in ("uniform", "heavy_tail"):
        for rule in ("flexlora", "bucket", "homogeneous-max"):
            vals = [v for n, v in final.items() if n.startswith(f"strategy-{rule}__rank_distribution-{dist}__")]
            text = f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" + ("" if len(vals) == 3 else " (2 of 3 seeds)")
            assert text in md
            best.setdefault(dist, []).append((np.mean(vals), text))
    table = md.split("### eval_heldout_loss after the last round")[1].split("###")[0]
    for dist, entries in best.items():
        assert f"**{min(entries)[1]}**" in table  # the lowest mean of each column is bold
    assert md.count("**") == 2 * 2 * 2  # one bold entry per column in the two metric tables
    # Paired by seed: flexlora minus bucket (bucket's heavy_tail seed 2 is missing, so 2 pairs there).
    paired = md.split("each rule minus bucket on the same seed")[1].split("###")[0]
    for dist, seeds in (("uniform", (0, 1, 2)), ("heavy_tail", (0, 1))):
        diffs = [final[f"strategy-flexlora__rank_distribution-{dist}__seed-{s}"]
                 - final[f"strategy-bucket__rank_distribution-{dist}__seed-{s}"] for s in seeds]
        wins = sum(d < 0 for d in diffs)
        assert f"{np.mean(diffs):+.3f} ± {np.std(diffs, ddof=1):.3f} ({wins}/{len(diffs)} better)" in paired
    assert "Base model before training: 4.000" in md
    for key in ("curves", "bars", "spectrum"):
        assert paths[key].stat().st_size > 10_000  # a rendered PNG, not an empty figure
    # Rank breakdown: clients "a" (rank 2) and "b" (rank 4) lose v + 0.1 and v + 0.2 in every round; the
    # second half of 3 rounds is rounds 1 and 2; flexlora's mean over its cells' rounds 1, 2:
    flex = [c for c in load_cells(tmp_path) if c.rule == "flexlora"]
    second_half = [m["eval_heldout_loss"] for c in flex for m in c.metrics[1:]]
    row = md.split("by their rank")[1].split("\n| flexlora | ")[1].split("\n")[0]
    assert row == f"{np.mean(second_half) + 0.1:.3f} | {np.mean(second_half) + 0.2:.3f} |"
    # Effective rank exp(H(s / sum s)): [1, 1, 0, 0] -> 2; averaged with the other module's.
    from fedlora.simulation.benchmark_analysis import effective_rank

    def entropy_rank(s):
        p = np.array([x for x in s if x > 0]) / sum(s)
        return float(np.exp(-(p * np.log(p)).sum()))

    assert effective_rank([1.0, 1.0, 0.0, 0.0]) == pytest.approx(2.0, rel=1e-12)
    assert effective_rank([5.0, 5.0, 5.0]) == pytest.approx(3.0, rel=1e-12) and math.isnan(effective_rank([0.0]))
    last = flex[0].metrics[-1]["eval_heldout_loss"]
    assert flex[0].metrics[-1]["spectrum"]["model.layers.0.q_proj"][-1] == last
    assert "Effective rank of the final global update" in md
    again = write_report(tmp_path)  # rebuilding from the same cells gives the same tables
    assert again["md"].read_text() == md and again["csv"].read_text() == paths["csv"].read_text()


def test_report_breaks_held_out_ppl_down_by_client_rank(tmp_path):
    grid = Grid.from_dict(grid_dict(strategy=["flexlora", "bucket", "homogeneous-max"], rank_distribution=["uniform"],
                                    seed=[0, 1]), output_dir=tmp_path)
    rng = np.random.default_rng(1)
    ppl = {}
    for run, cells in grid.runs().items():
        fake_cell(tmp_path, grid, cells, [2.0, 1.5], base_loss=4.0, bytes_up=1000)
        if run == "strategy-bucket__rank_distribution-uniform__seed-1":
            continue  # a cell recorded before the breakdown existed
        path = Path(cells[0].config.output_dir) / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        ppl[run] = {r: float(rng.uniform(2, 9)) for r in ("2", "4")}
        lines[-1]["eval_heldout_by_rank"] = {r: {"loss": math.log(v), "ppl": v, "clients": 1, "tokens": 10}
                                             for r, v in ppl[run].items()}
        path.write_text("".join(json.dumps(m) + "\n" for m in lines))
    md = write_report(tmp_path)["md"].read_text()
    table = md.split("### Held-out perplexity by client rank, ranks: uniform (final")[1].split("###")[0]
    name = "strategy-{}__rank_distribution-uniform__seed-{}".format
    flex = [[ppl[name("flexlora", s)][r] for s in (0, 1)] for r in ("2", "4")]
    assert (f"| flexlora | {np.mean(flex[0]):.3f} ± {np.std(flex[0], ddof=1):.3f} | "
            f"{np.mean(flex[1]):.3f} ± {np.std(flex[1], ddof=1):.3f} |") in table
    bucket = ppl[name("bucket", 0)]
    assert f"| bucket | {bucket['2']:.3f} | {bucket['4']:.3f} |" in table  # seed 1 has no breakdown
    assert "| homogeneous-max | – | – |" in table  # every client trains at rank 4: nothing to group by
    paired = md.split("each rule minus bucket on the same seed\n")[-1].split("###")[0]
    diffs = [ppl[name("flexlora", 0)][r] - bucket[r] for r in ("2", "4")]  # only seed 0 has a pair
    assert ("| flexlora | " + " | ".join(f"{d:+.3f} ({int(d < 0)}/1 better)" for d in diffs) + " |") in paired
    assert "homogeneous-max trains every client at the largest rank" in md


def test_base_evaluation_is_shared_by_runs_of_the_same_model_data_and_seed(tmp_path):
    from fedlora.simulation.benchmark import reuse_base_eval

    grid = Grid.from_dict(grid_dict(strategy=["flexlora", "flora"], seed=[0, 1]), output_dir=tmp_path)
    flex0, flex1, flora0, flora1 = grid.cells()
    done = Path(flex0.config.output_dir)
    done.mkdir(parents=True)
    (done / "config.json").write_text(flex0.config.to_json())
    by_rank = {"2": {"loss": 3.0, "ppl": math.exp(3.0), "clients": 1, "tokens": 5}}
    (done / "base_eval.json").write_text(json.dumps({"eval_heldout_loss": 3.5, "wall_time_s": 9.0,
                                                     "eval_heldout_by_rank": by_rank}))
    assert reuse_base_eval(flora0.config) == flex0.run  # another rule, the same model, data and seed
    copied = json.loads((Path(flora0.config.output_dir) / "base_eval.json").read_text())
    assert copied == {"eval_heldout_loss": 3.5, "wall_time_s": 9.0, "eval_heldout_by_rank": by_rank,
                      "shared_from": flex0.run}
    # Under another rank distribution the clients are grouped by other ranks: the breakdown is not copied.
    other = Grid.from_dict(grid_dict(strategy=["flora"], rank_distribution=["heavy_tail"], seed=[0]),
                           output_dir=tmp_path).cells()[0]
    assert reuse_base_eval(other.config) == flex0.run
    assert "eval_heldout_by_rank" not in json.loads((Path(other.config.output_dir) / "base_eval.json").read_text())
    # The folder holds this run now (its config), so simulate continues it instead of refusing a foreign folder.
    from fedlora.simulation.outputs import prepare_output_dir

    assert json.loads((Path(flora0.config.output_dir) / "config.json").read_text())["strategy"] == "flora"
    assert prepare_output_dir(flora0.config) == Path(flora0.config.output_dir)
    assert reuse_base_eval(flora1.config) is None  # another seed: another partition and evaluation set
    assert not (Path(flora1.config.output_dir) / "base_eval.json").exists()
    assert reuse_base_eval(flora0.config) is None  # it has one already


def test_a_cell_that_cannot_run_is_listed_and_the_grid_goes_on(tmp_path, capsys):
    from fedlora.cli import main

    # FedEx-LoRA needs one rank for every client: under uniform ranks 2 / 4 its cell cannot run.
    toml = one_round_grid(tmp_path, '["fedexlora", "flexlora"]')
    assert main(["benchmark", "--config", str(toml), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "1 cell(s) could not run" in err and "strategy-fedexlora" in err
    failed = json.loads((tmp_path / "bench" / "failed.json").read_text())
    assert list(failed) == ["strategy-fedexlora"] and "one rank" in failed["strategy-fedexlora"]
    rows = list(csv.DictReader((tmp_path / "bench" / "results.csv").open()))
    assert [r["rule"] for r in rows] == ["flexlora"]  # the other cell ran and is reported
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "## Cells that could not run" in md and "`strategy-fedexlora`" in md


def test_spectrum_modules_are_the_first_middle_and_last_layers():
    from fedlora.simulation.evaluation import spectrum_modules

    names = [f"model.layers.{i}.self_attn.{p}" for i in range(7) for p in ("q_proj", "v_proj")]
    assert spectrum_modules(names) == [names[0], names[1], names[6], names[7], names[12], names[13]]
    assert spectrum_modules(["lm_head"]) == ["lm_head"]


def test_report_refuses_what_is_not_a_benchmark(tmp_path):
    with pytest.raises(ValueError, match="no cells/ folder"):
        write_report(tmp_path)
    (tmp_path / "cells").mkdir()
    with pytest.raises(ValueError, match="no finished cell"):
        write_report(tmp_path)
    with pytest.raises(ValueError, match="metric must be one of"):
        write_report(tmp_path, metric="accuracy")
    assert load_cells(tmp_path) == []


# ---------------------------------------------------------------- a real 2-cell grid on the tiny model (CI runs it)

GRID_TOML = """
[simulate]
model = "tiny-random-llama"
dataset = "{data}"
partition = "iid"
num_clients = 6
rounds = 2
clients_per_round = 2
local_steps = 1
batch_size = 1
seq_len = 32
rank_levels = [2, 4]
eval_max_examples = 4
eval_generate_examples = 1
max_new_tokens = 4
eval_generate_every = 0
log_spectrum = 3
progress = false

[grid]
strategy = ["flexlora", "bucket"]

[benchmark]
output_dir = "{out}"
metric = "eval_unseen_loss"
"""


def one_round_grid(tmp_path: Path, strategies: str) -> Path:
    """GRID_TOML over ``strategies`` (a TOML list) for one round on a small ShareGPT file, into tmp_path/bench."""
    from .test_data_sharegpt import write_sharegpt

    data = tmp_path / "conversations.json"
    write_sharegpt(data)
    toml = tmp_path / "grid.toml"
    toml.write_text(GRID_TOML.format(data=data, out=tmp_path / "bench")
                    .replace('strategy = ["flexlora", "bucket"]', f"strategy = {strategies}")
                    .replace("rounds = 2", "rounds = 1"))
    return toml


def test_killed_grid_resumes_cell_by_cell_and_its_report_rebuilds(tmp_path, capsys):
    from fedlora.cli import main
    from fedlora.simulation import simulate
    from fedlora.simulation.benchmark import run_grid

    from .test_data_sharegpt import write_sharegpt

    data = tmp_path / "conversations.json"
    write_sharegpt(data)  # a ShareGPT file cut inside its last record, as the real package's
    out = tmp_path / "bench"
    toml = tmp_path / "grid.toml"
    toml.write_text(GRID_TOML.format(data=data, out=out))
    grid = Grid.load(toml)
    first, second = grid.cells()
    # Killed after the first cell and one round into the second:
    assert run_grid(grid, stop_after_runs=1) == [first.run]
    simulate(second.config, stop_after=1)
    first_record = (out / "cells" / first.run / "cell.json").read_bytes()
    assert not (out / "cells" / second.run / "cell.json").exists() and not (out / "results.md").exists()

    assert main(["benchmark", "--config", str(toml), "--no-progress"]) == 0
    assert "2 cells (2 runs)" in capsys.readouterr().out
    assert (out / "cells" / first.run / "cell.json").read_bytes() == first_record  # not run again
    metrics = [json.loads(x) for x in (out / "cells" / second.run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]  # continued inside the cell, each round once
    bases = [json.loads((out / "cells" / c.run / "base_eval.json").read_text()) for c in (first, second)]
    # The same base model on the same evaluation sets: every rule's curve starts at the same point.
    assert {k: v for k, v in bases[0].items() if k != "wall_time_s"} == \
        {k: v for k, v in bases[1].items() if k != "wall_time_s"}
    assert {"eval_heldout_loss", "eval_unseen_loss", "eval_unseen_rougeL"} <= set(bases[0])

    # Rouge-L (generation) only after the last round with eval_generate_every = 0; losses every round.
    assert ["eval_unseen_rougeL" in m for m in metrics] == [False, True]
    assert all("eval_unseen_loss" in m for m in metrics)
    for m in metrics:  # each client's own training loss, beside its rank
        assert list(m["client_train_loss"]) == m["clients"] and all(v > 0 for v in m["client_train_loss"].values())
    # The logged spectrum is that of the final global update (numpy's float64 SVD of the checkpoint's deltas).
    from fedlora.strategies import registry

    strategy = registry.create("fedavg", {"heterogeneous": "bucket"})
    ckpt = out / "cells" / second.run / "checkpoints"
    strategy.load(ckpt / (ckpt / "latest").read_text().strip() / "strategy.safetensors")
    deltas = strategy.global_deltas()
    assert set(metrics[-1]["spectrum"]) == set(deltas)  # 2 layers: the first, middle and last are all of them
    for name, values in metrics[-1]["spectrum"].items():
        want = np.linalg.svd(deltas[name].double().numpy(), compute_uv=False)[:3]
        # float64 SVD is backward stable: singular values agree to ~1e-15 of the largest.
        assert np.allclose(values, want, rtol=0, atol=1e-12 * want[0]) and want[0] > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["rule"] for r in rows] == ["flexlora", "bucket"] and [r["rounds"] for r in rows] == ["2", "2"]
    assert float(rows[1]["final_eval_unseen_loss"]) == pytest.approx(metrics[-1]["eval_unseen_loss"], rel=1e-12)
    built = {name: (out / name).read_bytes() for name in ("results.csv", "results.md")}
    for name in ("results.csv", "results.md", "curves.png", "bars.png"):
        (out / name).unlink()
    assert main(["benchmark", "--report", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in built} == built
    assert (out / "curves.png").is_file() and (out / "bars.png").is_file() and (out / "spectrum.png").is_file()
    assert "| flexlora | " in built["results.md"].decode().split("by their rank")[1]
    # the data's held-out set is its clients' held-out examples: every evaluation is broken down by rank
    assert all("eval_heldout_by_rank" in m for m in metrics) and "eval_heldout_by_rank" in bases[1]
    assert "| bucket | " in built["results.md"].decode().split("Held-out perplexity by client rank")[1]

    assert run_grid(grid) == []  # all finished: nothing runs
    toml.write_text(GRID_TOML.format(data=data, out=out).replace("rounds = 2", "rounds = 3"))
    assert main(["benchmark", "--config", str(toml), "--no-progress"]) == 2
    assert "finished with other settings" in capsys.readouterr().err


def test_a_grid_that_adds_a_distribution_labels_the_finished_shared_run_with_its_new_cell(tmp_path, monkeypatch):
    """homogeneous-max's run finished under a grid of uniform ranks only; a grid adding heavy_tail reuses it
    (nothing to run) and its cell.json then names both cells, so the report shows it in both columns."""
    from fedlora.simulation import benchmark

    def grid(dists):
        return Grid.from_dict(grid_dict(strategy=["homogeneous-max"], rank_distribution=dists, seed=[0]),
                              output_dir=tmp_path)

    (cell,) = grid(["uniform"]).cells()
    folder = Path(cell.config.output_dir)
    folder.mkdir(parents=True)
    (folder / "cell.json").write_text(json.dumps({
        "name": cell.run, "labels": [{"cell": "kept-from-another-grid", "values": {}},
                                     {"cell": cell.name, "values": cell.values}],
        "config": json.loads(cell.config.to_json()), "elapsed_s": 1.0}))
    monkeypatch.setattr(benchmark, "simulate", lambda config: pytest.fail("a finished run ran again"))
    monkeypatch.setattr(benchmark, "write_report", lambda *a, **k: None)
    assert benchmark.run_grid(grid(["uniform", "heavy_tail"])) == []
    labels = json.loads((folder / "cell.json").read_text())["labels"]
    assert [label["cell"] for label in labels] == [
        "kept-from-another-grid", cell.name, "strategy-homogeneous-max__rank_distribution-heavy_tail__seed-0"]
    assert labels[-1]["values"]["rank_distribution"] == "heavy_tail"
    before = (folder / "cell.json").read_bytes()
    benchmark.run_grid(grid(["uniform", "heavy_tail"]))  # labelled already: the file is left as it is
    assert (folder / "cell.json").read_bytes() == before
