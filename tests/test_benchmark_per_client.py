"""`fedlora benchmark --per-client DIR`: each finished run restored from its final checkpoint and scored by
client rank (base, global, what each client receives), per_client.json, and the report's table."""
from __future__ import annotations

import json

import pytest

from fedlora.cli import main

from .test_benchmark import one_round_grid


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perclient")
    toml = one_round_grid(tmp, '["flexlora", "homogeneous-max", "local-only"]')
    toml.write_text(toml.read_text().replace("[benchmark]", 'rank_distribution = ["uniform"]\n\n[benchmark]'))
    assert main(["benchmark", "--config", str(toml), "--no-progress"]) == 0
    return tmp / "bench"


def _run(bench, name):
    folder = bench / "cells" / f"strategy-{name}__rank_distribution-uniform"
    metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return folder, metrics, json.loads((folder / "base_eval.json").read_text())


def test_scores_from_the_checkpoint_equal_the_runs_own_evaluation(bench, capsys):
    assert main(["benchmark", "--per-client", str(bench)]) == 0  # budget: the runs' eval_max_examples (4)
    for name in ("flexlora", "homogeneous-max"):
        folder, metrics, base = _run(bench, name)
        scored = json.loads((folder / "per_client.json").read_text())
        assert scored["max_examples"] == 4 and scored["examples"] == 4 and scored["rounds"] == 1
        cell = scored["cells"][folder.name]
        # The same model (restored through resume's path), the same examples in the same batches, the same
        # per-example sums: simulate's final evaluation to the bit.
        assert cell["global"]["loss"] == metrics[-1]["eval_heldout_loss"]
        assert cell["base"]["loss"] == base["eval_heldout_loss"]
        # the unseen clients' examples too, spread the same way: the run's own unseen evaluation to the bit
        assert scored["unseen"]["global"]["loss"] == metrics[-1]["eval_unseen_loss"]
        assert scored["unseen"]["base"]["loss"] == base["eval_unseen_loss"]
        if name == "flexlora":  # its run's ranks are the column's: the run's own breakdown, exactly
            assert cell["global"]["by_rank"] == metrics[-1]["eval_heldout_by_rank"]
            assert cell["base"]["by_rank"] == base["eval_heldout_by_rank"]
            flex = cell
    folder, metrics, _ = _run(bench, "local-only")
    local = json.loads((folder / "per_client.json").read_text())["cells"][folder.name]
    # no global model; what each client receives is its own adapter, as the run scored it (same examples, same
    # client-by-client passes, the factors it stored after its last round)
    assert "global" not in local and local["received"]["loss"] == metrics[-1]["eval_heldout_loss"]
    local_unseen = json.loads((folder / "per_client.json").read_text())["unseen"]
    assert "global" not in local_unseen and local_unseen["base"]["loss"] == metrics[-1]["eval_unseen_loss"]
    assert local["received"]["by_rank"] == metrics[-1]["eval_heldout_by_rank"]
    homo = json.loads((_run(bench, "homogeneous-max")[0] / "per_client.json").read_text())["cells"]
    homo = homo["strategy-homogeneous-max__rank_distribution-uniform"]
    # homogeneous-max trained everyone at rank 4 but is grouped by the uniform distribution's ranks, as flexlora is
    assert {r: (g["clients"], g["tokens"]) for r, g in homo["global"]["by_rank"].items()} == \
        {r: (g["clients"], g["tokens"]) for r, g in flex["global"]["by_rank"].items()} and len(flex["global"]["by_rank"]) == 2
    # FedAvg hands every client the global factors at rank 4: what it receives is the global model, computed as a
    # low-rank adapter instead of a dense delta: fp32 rounding (2^-24 relative per operation) of logits of size
    # O(10) moves a mean token loss of O(5) nats by far less than 1e-5 of it.
    assert homo["received"]["loss"] == pytest.approx(homo["global"]["loss"], rel=1e-5)
    md = (bench / "results.md").read_text()
    table = md.split("Held-out perplexity by client rank after the last round, ranks: uniform")[1].split("###")[0]
    for row in ("| base model |", "| flexlora: global model |", "| flexlora: what the client receives |",
                "| homogeneous-max: global model |", "| local-only: what the client receives |"):
        assert row in table and "–" not in table.split(row)[1].split("\n")[0], row
    assert "Scored on up to 4 held-out examples" in md
    # the summary: every rule's final held-out and unseen perplexity, and each one minus bucket on the same seed
    summary = md.split("Held-out perplexity after the last round, scored by --per-client")[1].split("###")[0]
    flex_ppl = json.loads((_run(bench, "flexlora")[0] / "per_client.json").read_text())
    flex_ppl = flex_ppl["cells"][_run(bench, "flexlora")[0].name]["global"]["ppl"]
    assert f"| flexlora | {flex_ppl:.3f} |" in summary  # (no bucket in this grid: no paired difference)
    assert "| local-only |" in summary
    assert "Unseen perplexity after the last round" in md
    capsys.readouterr()
    assert main(["benchmark", "--per-client", str(bench)]) == 0  # scored already with this budget: skipped
    assert capsys.readouterr().out.count("there already for this budget") == 3


def test_a_larger_budget_scores_again_and_bad_arguments_are_refused(bench, capsys):
    assert main(["benchmark", "--per-client", str(bench), "--max-examples", "6"]) == 0
    folder = _run(bench, "flexlora")[0]
    scored = json.loads((folder / "per_client.json").read_text())
    assert scored["max_examples"] == 6 and scored["examples"] == 6
    cell = scored["cells"][folder.name]
    assert sum(g["tokens"] for g in cell["received"]["by_rank"].values()) == scored["tokens"]
    assert "Scored on up to 6 held-out examples" in (bench / "results.md").read_text()
    assert main(["benchmark", "--report", str(bench), "--max-examples", "6"]) == 2
    assert "--max-examples goes with --per-client" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["benchmark", "--per-client", str(bench), "--max-examples", "0"])
    assert main(["benchmark", "--per-client", str(bench / "cells")]) == 2
