"""What a run shows: the plot's elements, progress bars only on a terminal, evaluation progress, the cap note."""
from __future__ import annotations

import io
import math

import pytest
from matplotlib.ticker import MaxNLocator

from fedlora.models import load_model
from fedlora.simulation import reporting, simulate
from fedlora.simulation.evaluation import evaluate_model, evaluation_size
from fedlora.simulation.trainer import FederatedModel

from .test_outputs import tiny_cfg
from .test_simulation import TARGETS, TINY, synthetic_clients, synthetic_data

BASE = {"eval_heldout_loss": 3.0, "eval_unseen_loss": 3.2, "eval_heldout_rougeL": 0.1, "eval_unseen_rougeL": 0.05}


def record(r: int, loss: float, rouge: bool = True) -> dict:
    out = {"round": r, "train_loss": loss + 0.1, "eval_heldout_loss": loss, "eval_unseen_loss": loss + 0.2}
    if rouge:
        out.update(eval_heldout_rougeL=0.2 + r / 10, eval_unseen_rougeL=0.1 + r / 10)
    return out


def lines_of(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_the_plot_shows_the_run_with_the_base_model_at_round_0():
    import matplotlib.pyplot as plt

    fig = reporting.metrics_figure([record(1, 2.5), record(2, 2.0)], BASE, "flexlora · smollm2 · data.jsonl")
    try:
        assert fig._suptitle.get_text() == "flexlora · smollm2 · data.jsonl"
        loss, ppl, rouge = fig.axes
        assert [ax.get_title() for ax in fig.axes] == ["loss", "perplexity", "Rouge-L"]
        held, unseen = lines_of(loss)["held-out data, training clients"], lines_of(loss)["unseen clients"]
        assert held == ([0, 1, 2], [3.0, 2.5, 2.0]) and unseen == ([0, 1, 2], [3.2, 2.7, 2.2])
        train = lines_of(loss)["training (sampled clients, during the round)"]
        assert train[0] == [1, 2]  # the training loss exists only for rounds that trained
        assert lines_of(ppl)["held-out data, training clients"][1] == pytest.approx([math.exp(v) for v in held[1]])
        assert lines_of(rouge)["unseen clients"] == ([0, 1, 2], [0.05, pytest.approx(0.2), pytest.approx(0.3)])
        for ax in fig.axes:
            assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)  # integer round ticks
            assert all(t == int(t) for t in ax.get_xticks())
            assert ax.get_xlabel() == "round (0: base model)"
    finally:
        plt.close(fig)


def test_one_round_without_rouge_still_draws_two_points_per_curve():
    import matplotlib.pyplot as plt

    fig = reporting.metrics_figure([record(1, 2.5, rouge=False)], {"eval_heldout_loss": 3.0, "eval_unseen_loss": 3.2})
    try:
        assert len(fig.axes) == 2  # no Rouge-L panel when it was not measured
        for ax in fig.axes:
            assert ax.get_xlim()[0] < 0 and ax.get_xlim()[1] > 1  # both points inside the frame
        assert lines_of(fig.axes[1])["unseen clients"][0] == [0, 1]
    finally:
        plt.close(fig)


def test_a_run_writes_its_plot(tmp_path):
    res = simulate(tiny_cfg(tmp_path / "run", rounds=1), data=synthetic_data())
    assert res.base_eval and (tmp_path / "run" / "metrics.png").stat().st_size > 10_000


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_only_on_a_terminal_and_when_asked():
    assert not reporting.progress(None, True, total=3, file=Terminal()).disable
    assert reporting.progress(None, False, total=3, file=Terminal()).disable
    assert reporting.progress(None, True, total=3, file=io.StringIO()).disable  # a log file or a pipe


def test_evaluation_reports_every_example_it_goes_through():
    """The evaluation bar's total is what the evaluation then counts: scored examples, then generations."""
    model, tok = load_model(TINY, seed=0)
    fm = FederatedModel(model, TARGETS)
    clients = synthetic_clients(3)
    heldout = [ex for c in clients[:2] for ex in c.heldout + c.train][:11]  # 11: batches of 8 and 3
    unseen = clients[2].train[:5]
    rouge_sets = {"heldout": [(1.0, heldout[:2])], "unseen": [(2.0, unseen[:1])]}
    seen = []
    out = evaluate_model(fm, None, heldout, unseen, tok.pad_token_id, tok, rouge_sets, 2, progress=seen.append)
    assert sum(seen) == evaluation_size(heldout, unseen, rouge_sets) == 11 + 5 + 3
    assert set(out) >= {"eval_heldout_loss", "eval_unseen_loss", "eval_heldout_rougeL", "eval_unseen_rougeL"}


def test_a_capped_clients_per_round_is_said_once(tmp_path, capsys):
    simulate(tiny_cfg(tmp_path / "run", rounds=2, clients_per_round=10), data=synthetic_data(4))
    out = capsys.readouterr().out
    note = "clients_per_round 10 is more than the 4 training clients (1 more is held out as unseen, for " \
           "evaluation only): every round trains all 4"
    assert out.count(note) == 1
