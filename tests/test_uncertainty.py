"""Uncertainty in the analysis: ± std over seeds, ± the evaluation's standard error for one seed,
error bars in the figures, and a paper table's best bold only when it is beyond the noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from analysis import plot, style, table
from analysis.load import frame
from lrsweep.row import ResultRow


def row(run_id: str, method: str, rank: int, seed: int, acc: float, n: int = 500, **kw) -> ResultRow:
    return ResultRow(run_id=run_id, status="ok", model="m", method=method, rank=rank, bits=16, seed=seed,
                     bits_per_weight=rank / 16, accuracy=acc, accuracy_stderr=math.sqrt(acc * (1 - acc) / n),
                     accuracy_dense=0.75, accuracy_dense_stderr=math.sqrt(0.75 * 0.25 / n), **kw)


def test_aggregate_error_is_std_over_seeds_or_the_evaluations_stderr():
    df = frame([row("a0", "a", 32, 0, 0.60), row("a1", "a", 32, 1, 0.70), row("b0", "b", 32, 0, 0.64)])
    g = style.aggregate(df, ["method"], "accuracy").set_index("method")
    assert g.loc["a", "err"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert g.loc["b", "err"] == pytest.approx(math.sqrt(0.64 * 0.36 / 500))  # one seed: the binomial error
    se_a = np.mean([math.sqrt(0.6 * 0.4 / 500), math.sqrt(0.7 * 0.3 / 500)])
    assert g.loc["a", "sem"] == pytest.approx(math.sqrt(np.var([0.6, 0.7], ddof=1) / 2 + se_a**2))
    # a deterministic method run with two seeds: identical values, the bar is the evaluation's error
    same = frame([row("s0", "s", 32, 0, 0.63), row("s1", "s", 32, 1, 0.63)])
    err = style.aggregate(same, ["method"], "accuracy")["err"].tolist()
    assert err == pytest.approx([math.sqrt(0.63 * 0.37 / 500)])
    assert table.paper_frame(same, ["method"], ["bits_per_weight"], "accuracy")[0].loc["s", 2.0] == "0.630 ± 0.022"
    # a metric without an evaluation error (reconstruction error): single seeds have no bar
    df["recon_rel_err"] = [0.5, 0.5, 0.4]
    assert style.aggregate(df, ["method"], "recon_rel_err").set_index("method").loc["b", "err"] == 0.0


def test_paper_table_bold_only_beyond_the_combined_stderr_else_tie_marked():
    # rank 32: a 0.70 vs b 0.68 on 500 texts (se 0.020 each, combined 0.029): tied, none bold
    # rank 64: a 0.80 vs b 0.70 (gap 0.10 > 0.027): a bold
    rows = [row("a32", "a", 32, 0, 0.70), row("b32", "b", 32, 0, 0.68), row("a64", "a", 64, 0, 0.80),
            row("b64", "b", 64, 0, 0.70)]
    df = frame(rows)
    cells, bold = table.paper_frame(df, ["method"], ["bits_per_weight"], "accuracy")
    assert cells.loc["a", 2.0] == "0.700 ± 0.020 ≈" and cells.loc["b", 2.0] == "0.680 ± 0.021 ≈"
    assert not bold[2.0].any()
    assert bold.loc["a", 4.0] and not bold.loc["b", 4.0] and not cells.loc["a", 4.0].endswith("≈")
    assert cells.loc["dense", 2.0] == "0.750 ± 0.019"
    md = table.paper_table(df, metric="accuracy")
    assert "**0.800 ± 0.018**" in md and "0.700 ± 0.020 ≈" in md and "≈ tied with the column's best" in md
    tex = table.paper_table(df, metric="accuracy", fmt="latex")
    assert "0.700 $\\pm$ 0.020$^{\\approx}$" in tex and "\\textbf{0.800 $\\pm$ 0.018}" in tex
    assert "\\footnotesize $^{\\approx}$ tied" in tex
    # with 5000 test texts the same 0.02 gap is beyond the noise: bold again
    big = frame([row("a32", "a", 32, 0, 0.70, n=5000), row("b32", "b", 32, 0, 0.68, n=5000)])
    _, bold_big = table.paper_frame(big, ["method"], ["bits_per_weight"], "accuracy")
    assert bold_big.loc["a", 2.0] and not bold_big.loc["b", 2.0]
    # a third method far below does not break the tie of the two at the top
    three = frame(rows + [row("c32", "c", 32, 0, 0.40)])
    cells3, bold3 = table.paper_frame(three, ["method"], ["bits_per_weight"], "accuracy")
    assert not bold3[2.0].any() and not cells3.loc["c", 2.0].endswith("≈")


def test_run_table_shows_value_and_stderr():
    df = frame([row("a0", "a", 32, 0, 0.70)])
    md = table.run_table(df)
    assert "0.7 ± 0.02" in md and "0.75 ± 0.019" in md
    csv = table.run_table(df, "csv")
    assert "accuracy_stderr" in csv.splitlines()[0]


def _errorbars(monkeypatch, draw) -> list[np.ndarray]:
    """The half-lengths of every error bar ``draw`` puts into its figure."""
    figs = []
    monkeypatch.setattr(plot, "savefig", lambda fig, out: figs.append(fig) or out)
    draw()
    halves = []
    for ax in figs[0].axes:
        for c in ax.containers:
            if isinstance(c, ErrorbarContainer):
                for col in c.lines[2]:
                    halves.append(np.array([abs(seg[1][1] - seg[0][1]) / 2 for seg in col.get_segments()]))
    return halves


def test_plots_draw_error_bars_std_or_stderr(monkeypatch, tmp_path):
    df = frame([row("a0", "a", 32, 0, 0.60), row("a1", "a", 32, 1, 0.70), row("a64", "a", 64, 0, 0.72),
                row("b0", "b", 32, 0, 0.64)])
    df["compression_ratio"] = 16 / df["bits_per_weight"]
    bars = _errorbars(monkeypatch, lambda: plot.tradeoff_plot(df, tmp_path / "t.png", y="accuracy"))
    got = sorted(np.round(np.concatenate(bars), 6))
    expected = sorted(np.round([np.std([0.6, 0.7], ddof=1), math.sqrt(0.72 * 0.28 / 500),
                                math.sqrt(0.64 * 0.36 / 500)], 6))
    assert got == expected
    bars = _errorbars(monkeypatch, lambda: plot.pareto_plot(df, tmp_path / "p.png", y="accuracy"))
    assert sorted(np.round(np.concatenate(bars), 6)) == expected


def test_refit_accuracy_has_a_direction_a_label_and_the_dense_reference():
    assert style.better("accuracy_refit") == "max" and "refit" in style.label("accuracy_refit")
    assert style.dense_column("accuracy_refit") == "accuracy_dense"
    df = frame([row("a0", "a", 32, 0, 0.60, accuracy_refit=0.70, accuracy_refit_stderr=0.02)])
    cells, _ = table.paper_frame(df, ["method"], ["bits_per_weight"], "accuracy_refit")
    assert cells.loc["dense"].tolist() == ["0.750 ± 0.019"] and cells.loc["a", 2.0] == "0.700 ± 0.020"
    assert "accuracy_refit" in plot.available_metrics(df)


@pytest.mark.slow
def test_refit_probe_is_dense_at_full_rank_and_drops_when_truncated(minilm, compose, tmp_path):
    """The refitted probe on the compressed embeddings: an exact factorization (svd at full rank)
    scores the dense accuracy; rank 1 in every layer scores below it, but not by much (measured:
    0.594 against 0.625 on these 160 texts, within one standard error): the residual stream still
    carries the token embeddings, and a probe refitted on their mean separates the sentiments."""
    import copy

    from conftest import FAST
    from lrsweep import evaluate, models, provenance
    from lrsweep.compress import compress_model

    model, tok = minilm
    cfg = compose([*FAST, "eval.probe_train=160", "eval.probe_test=160", "eval.probe_refit=true"])
    ctx = evaluate.Context(cfg, tok, "cpu", str(tmp_path), provenance.model_key(cfg))
    task = evaluate.task_for(cfg)
    state = task.prepare(model, ctx)
    out = {}
    for rank in (384, 1):
        m = copy.deepcopy(model)
        compress_model(m, models.target_modules(m, cfg.model.targets), compose([*FAST, f"rank={rank}"]),
                       progress=False)
        out[rank] = task.evaluate(m, ctx, state)
    full, cut = out[384], out[1]
    dense = full["accuracy_dense"]
    assert full["accuracy_refit"] == pytest.approx(dense, abs=2 / 160)  # at most a text or two flip
    assert full["accuracy_refit_stderr"] == pytest.approx(math.sqrt(full["accuracy_refit"]
                                                                     * (1 - full["accuracy_refit"]) / 160))
    assert cut["accuracy_refit"] < dense and cut["accuracy"] < dense


def test_probe_refit_is_a_boolean(config_error):
    assert "eval.probe_refit" in config_error("eval.probe_refit=maybe")
    assert config_error("eval.probe_refit=true") is None
