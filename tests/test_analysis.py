"""analysis/: loading rows into pandas, Pareto fronts, paper tables, figures, the report."""

from __future__ import annotations

import math
from typing import ClassVar

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from analysis import plot, report, table
from analysis.__main__ import main as analysis_main
from analysis.load import load, wandb_rows
from lrsweep.row import ResultRow, write_row

MINILM_LAYERS = [f"encoder.layer.{i}.{t}" for i in range(2) for t in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]


def make_row(run_id: str, method: str, rank: int, seed: int, acc: float | None, err: float, *,
             status: str = "ok", finished: str = "2026-01-01T10:00:00+00:00", model: str = "m1",
             layer_scale: float = 1.0) -> ResultRow:
    return ResultRow(run_id=run_id, status=status, model=model, method=method, rank=rank, bits=4, seed=seed,
                     bits_per_weight=rank / 8, compression_ratio=32 / (rank / 8), recon_rel_err=err,
                     accuracy=acc, accuracy_dense=0.9, latency_ms_dense=10.0, latency_ms=5.0 + rank / 8,
                     layer_errors={n: layer_scale * (1 + i / 100) for i, n in enumerate(MINILM_LAYERS)},
                     finished_at=finished, started_at=finished,
                     config={"model": {"name": model, "kind": "encoder"}, "method": {"name": method},
                             "rank": rank, "seed": seed, "eval": {"latency": {"repeats": 2}}},
                     error={"type": "ValueError", "message": "boom\nsecond line", "traceback": "tb"}
                     if status == "failed" else None)


# accuracy at (method, rank, seed); rank 8 → 1.0 bits per weight, rank 16 → 2.0
ACC = {("a", 8, 0): 0.80, ("a", 8, 1): 0.90, ("b", 8, 0): 0.70, ("b", 8, 1): 0.80,
       ("a", 16, 0): 0.60, ("b", 16, 0): 0.65}
# ("b", 16, 1) is missing; ("a", 16, 1) failed


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    for (m, r, s), acc in ACC.items():
        write_row(d, make_row(f"{m}{r}s{s}", m, r, s, acc, err=acc / 2, layer_scale=1.0 if m == "a" else 2.0))
    write_row(d, make_row("a16s1", "a", 16, 1, None, math.nan, status="failed"))
    # the same run twice more: an older failed attempt must not replace the ok row ...
    other = tmp_path / "older"
    write_row(other, make_row("a8s0", "a", 8, 0, None, math.nan, status="failed",
                              finished="2026-01-02T10:00:00+00:00"))
    # ... and a newer ok row replaces an older ok row
    write_row(other, make_row("b16s0", "b", 16, 0, 0.75, 0.3, finished="2026-01-03T10:00:00+00:00"))
    return d, other


def test_load_schema_types_failed_and_duplicates(results):
    d, other = results
    df = load(d, other)
    assert set(ResultRow.columns()) <= set(df.columns)
    assert {"config.model.name", "config.model.kind", "config.eval.latency.repeats", "config.method.name"} <= set(df)
    assert len(df) == len(ACC) + 1 and df["run_id"].is_unique
    assert df["rank"].dtype == "Int64" and df["seed"].dtype == "int64" and df["accuracy"].dtype == "float64"
    assert df["exceeds_break_even"].dtype == "boolean" and df["ok"].dtype == bool
    assert isinstance(df["finished_at"].dtype, pd.DatetimeTZDtype)
    failed = df[df["run_id"] == "a16s1"].iloc[0]
    assert not failed["ok"] and failed["status"] == "failed" and failed["error_line"] == "ValueError: boom"
    assert math.isnan(failed["recon_rel_err"])  # NaN stored as null, read back as NaN
    by_id = df.set_index("run_id")
    assert by_id.loc["a8s0", "ok"] and by_id.loc["a8s0", "accuracy"] == 0.80  # older failed attempt ignored
    assert by_id.loc["b16s0", "accuracy"] == 0.75  # the newer ok row wins
    assert by_id.loc["b16s0", "speedup"] == pytest.approx(10.0 / 7.0)
    assert load(d / "nothing").empty and set(ResultRow.columns()) <= set(load(d / "nothing").columns)


def test_wandb_offline_is_skipped(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    df = load("wandb:someone/project")
    assert df.empty and "run_id" in df
    assert "offline" in capsys.readouterr().err


def test_wandb_rows_from_api_runs():
    """Rows rebuilt from what W&B returns (wandb's Api replaced by its data: summary + config)."""
    row = make_row("w1", "a", 8, 0, 0.8, 0.4)

    class Run:
        summary: ClassVar[dict] = {**row.summary(), "layer_errors": row.layer_errors, "_runtime": 3}
        config: ClassVar[dict] = {**row.config, "_wandb": {}}

    class Api:
        def runs(self, project):
            assert project == "ent/proj"
            return [Run()]

    (back,) = wandb_rows("ent/proj", api=Api())
    assert back.run_id == "w1" and back.accuracy == 0.8 and back.layer_errors == row.layer_errors
    assert back.config == row.config


def test_pareto_mask_hand_made():
    #          A    B    C    D    E(=C) F     G
    x = [1.0, 2.0, 3.0, 2.0, 3.0, 0.5, np.nan]
    y = [5.0, 4.0, 3.0, 2.0, 3.0, 5.0, 9.0]
    assert plot.pareto_mask(x, y, "max", "max").tolist() == [True, True, True, False, True, False, False]
    # lower y is better: D (2, 2) dominates A, B, F; C/E (3, 3) are not dominated by D (larger x)
    assert plot.pareto_mask(x, y, "max", "min").tolist() == [False, False, True, True, True, False, False]
    assert plot.pareto_mask(x, y, "min", "min").tolist() == [False, False, False, True, False, True, False]


def test_paper_table_cells_and_bold(results):
    d, _ = results
    ok = load(d).query("ok")
    cells, bold = table.paper_frame(ok, ["method"], ["bits_per_weight"], "accuracy")
    std = f"{np.std([0.8, 0.9], ddof=1):.3f}"  # 0.071
    assert cells.loc["a", 1.0] == f"0.850 ± {std}" and cells.loc["b", 1.0] == f"0.750 ± {std}"
    assert cells.loc["a", 2.0] == "0.600" and cells.loc["b", 2.0] == "0.650"  # one seed: no ± part
    assert cells.loc["dense"].tolist() == ["0.900", "0.900"]
    assert bold.loc["a", 1.0] and not bold.loc["b", 1.0] and bold.loc["b", 2.0] and not bold.loc["a", 2.0]
    assert not bold.loc["dense"].any()
    assert cells.index.tolist() == ["dense", "a", "b"]
    assert table.paper_frame(ok, ["method"], ["bits_per_weight"], "accuracy", row_order=["b"])[0].index.tolist() \
        == ["dense", "b", "a"]
    md = table.paper_table(ok, metric="accuracy")
    assert f"**0.850 ± {std}**" in md and "**0.650**" in md and "bits_per_weight=1.0" in md
    tex = table.paper_table(ok, metric="accuracy", fmt="latex")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert f"\\textbf{{0.850 $\\pm$ {std}}}" in tex and f"0.750 $\\pm$ {std}" in tex
    # lower is better for the reconstruction error: the bold moves to b at rank 8
    _, bold_err = table.paper_frame(ok, ["method"], ["bits_per_weight"], "recon_rel_err")
    assert bold_err.loc["b", 1.0] and not bold_err.loc["a", 1.0]
    # column groups: rank inside bits
    cells2, _ = table.paper_frame(ok, ["method"], ["bits", "rank"], "accuracy")
    assert list(cells2.columns) == [(4, 8), (4, 16)]


def test_paper_table_best_of_several_configurations(results):
    """Two configurations at one level: the cell is the better one's mean ± std over its seeds, marked."""
    d, _ = results
    ok = load(d).query("ok")
    other = ok[(ok["method"] == "a") & (ok["rank"] == 8)].assign(bits=8, accuracy=[0.95, 0.97])
    cells, _ = table.paper_frame(pd.concat([ok, other]), ["method"], ["bits_per_weight"], "accuracy")
    assert cells.loc["a", 1.0] == f"0.960 ± {np.std([0.95, 0.97], ddof=1):.3f} †"
    assert cells.loc["b", 1.0].endswith("0.071")  # one configuration: no mark
    assert "† best of several" in table.paper_table(pd.concat([ok, other]), metric="accuracy")


def test_levels_merge_nearby_bits_per_weight():
    lv = table.levels(pd.Series([3.992, 4.0, 1.0, 1.02, 2.0]))
    assert lv.tolist() == [4.0, 4.0, 1.01, 1.01, 2.0]


def test_sweep_summary_counts_and_failed_runs(results):
    d, _ = results
    counts, failed = table.sweep_summary(load(d), [d])
    c = counts.set_index(["axis", "value"])
    assert c.loc[("method", "a")].tolist() == [3, 1, 0]
    assert c.loc[("method", "b")].tolist() == [3, 0, 1]
    assert c.loc[("rank", "16")].tolist() == [2, 1, 1]
    assert failed.to_dict("records") == [{"run_id": "a16s1", "run_name": "", "error_line": "ValueError: boom"}]


def test_sweep_summary_grid_from_multirun_yaml(results):
    """The expected grid comes from the sweep's multirun.yaml: task sweep overrides + sweeper params."""
    d, _ = results
    sweep = d / "hydra" / "2026-01-01_10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      seed: 0,1,2\n"
        "  overrides:\n    task: ['method=a,b', 'rank=8,16', 'bits=4', 'seed=0,1']\n")
    counts, _ = table.sweep_summary(load(d), [d])
    c = counts.set_index(["axis", "value"])
    assert set(counts["axis"]) == {"method", "rank", "seed"}  # bits=4 is not swept; seed: the task wins
    assert c.loc[("method", "a")].tolist() == [3, 1, 0] and c.loc[("seed", "1")].tolist() == [2, 1, 1]


def _colours(png) -> int:
    img = mpimg.imread(png)
    return len(np.unique((img[..., :3] * 255).astype(int).reshape(-1, 3), axis=0))


def test_figures_written_and_not_empty(results, tmp_path):
    d, _ = results
    ok = load(d).query("ok")
    few = ok.assign(layer_errors=ok["layer_errors"].map(  # two layer types: two panels (drawing is slow)
        lambda e: {k: v for k, v in e.items() if k.endswith(("query", "key"))}))
    paths = [plot.tradeoff_plot(ok, tmp_path / "t.png", x="rank", y="accuracy"),
             plot.pareto_plot(ok, tmp_path / "p.png", y="recon_rel_err"),
             *plot.layer_plot(few, tmp_path / "l.png", reference="b")]
    for p in paths:
        assert p.stat().st_size > 5000 and p.with_suffix(".pdf").stat().st_size > 1000
        assert _colours(p) > 20  # drawn, not a blank canvas
    assert mpimg.imread(paths[0]).shape[1] <= plot.COLUMN_WIDTH * 200 + 50  # one panel at column width


def test_layer_types_generic():
    types = plot.layer_types(MINILM_LAYERS)
    assert [types[n] for n in MINILM_LAYERS[:6]] == ["query", "key", "value", "attention.output.dense",
                                                     "intermediate.dense", "output.dense"]
    llama = [f"model.layers.{i}.{p}" for i in range(3) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]
    assert sorted(set(plot.layer_types(llama).values())) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_cli_table_and_plot(results, tmp_path, capsys):
    d, _ = results
    assert analysis_main(["table", str(d), "--kind", "paper", "--rows", "method", "--cols", "bits_per_weight",
                          "--metric", "accuracy", "--format", "latex"]) == 0
    assert "\\textbf{" in capsys.readouterr().out
    assert analysis_main(["table", str(d), "--kind", "summary"]) == 0
    assert "ValueError: boom" in capsys.readouterr().out
    out = tmp_path / "fig.png"
    assert analysis_main(["plot", str(d), "--x", "bits_per_weight", "--y", "accuracy", "--hue", "method",
                          "--col", "model", "-o", str(out)]) == 0
    assert out.exists() and out.with_suffix(".pdf").exists()


@pytest.fixture(scope="module")
def minilm_rows(tmp_path_factory):
    """Real minilm rows: naive 4-bit quantization and lplr/svd at the same 4 bits per weight."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import hydra_plugins.lrsweep_launcher.launcher  # noqa: F401  (registers launcher configs first)
    from lrsweep import job
    from conftest import CONF

    d = tmp_path_factory.mktemp("minilm")
    for method in ("quant", "lplr", "svd"):
        GlobalHydra.instance().clear()
        logger = "wandb" if method == "quant" else "none"  # offline (conftest): one W&B run to read back
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"method={method}", "bits=4", "budget=4", f"logger={logger}",
                                               "eval.probe_train=32", "eval.probe_test=32", "eval.latency.repeats=1",
                                               "eval.latency.warmup=0", "progress=false", f"results_dir={d}"])
        assert job.run(cfg).status == "ok"
    GlobalHydra.instance().clear()
    return d


@pytest.mark.slow
def test_per_layer_comparison_on_real_minilm_rows(minilm_rows, tmp_path):
    ok = load(minilm_rows).query("ok")
    lf = plot.layer_frame(ok, reference="quant")
    assert sorted(lf["method"].unique()) == ["lplr", "quant", "svd"]
    assert lf["level"].nunique() == 1 and lf["level"].iloc[0] == pytest.approx(4.0, rel=0.01)
    assert list(dict.fromkeys(lf.sort_values("order")["type"])) == [
        "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    per_method = lf.groupby("method").size()
    assert (per_method == 36).all()  # 6 blocks x 6 layer types
    quant = ok[ok["method"] == "quant"].iloc[0]["layer_errors"]
    got = lf[lf["method"] == "quant"].set_index("layer")["rel_err"]
    assert got.to_dict() == pytest.approx(quant)
    (png,) = plot.layer_plot(ok, tmp_path / "layers.png", reference="quant", ratio=True)
    assert png.stat().st_size > 5000 and _colours(png) > 20


@pytest.mark.slow
def test_report_on_real_rows(minilm_rows, tmp_path):
    index = report.build([minilm_rows], tmp_path / "report")
    html = index.read_text()
    for name in ("tradeoff_accuracy.png", "pareto_accuracy.png", "layers.png", "paper_accuracy.tex"):
        assert name in html
        assert next((tmp_path / "report").rglob(name)).stat().st_size > 0
    assert "3 ok, 0 failed, 0 missing" in (tmp_path / "report" / "tables" / "summary.md").read_text()


@pytest.mark.slow
def test_offline_wandb_runs_as_a_source(minilm_rows, tmp_path):
    """A dir with offline W&B runs and no row files loads the same run from W&B's records."""
    import shutil

    shutil.copytree(minilm_rows / "wandb", tmp_path / "wandb")
    (row,) = load(tmp_path).to_dict("records")
    (ref,) = load(minilm_rows).query("method == 'quant'").to_dict("records")
    assert row["run_id"] == ref["run_id"] and row["ok"]
    assert row["recon_rel_err"] == ref["recon_rel_err"] and row["layer_errors"] == ref["layer_errors"]
    assert row["config.method.name"] == "quant" and row["bits_per_weight"] == ref["bits_per_weight"]


def test_healed_rows_are_their_own_configurations(results, tmp_path):
    """heal is a configuration key: healed and plain rows never share a mean, and the run table
    shows the heal columns only when some row was healed."""
    d, _ = results
    assert "heal" not in table.run_table(load(d).query("ok")) and "pre_heal" not in table.run_table(load(d).query("ok"))
    healed = make_row("a8s0h", "a", 8, 0, 0.88, 0.41)
    healed.heal, healed.accuracy_pre_heal = "distill", 0.80
    write_row(d, healed)
    ok = load(d).query("ok")
    assert ok.set_index("run_id").loc["a8s0", "heal"] == "none"
    md = table.run_table(ok)
    assert "heal" in md and "accuracy_pre_heal" in md and "distill" in md
    cells, _ = table.paper_frame(ok, ["method", "heal"], ["bits_per_weight"], "accuracy")
    std = f"{np.std([0.8, 0.9], ddof=1):.3f}"
    # 0.88 (one seed, no evaluation error) against 0.85 ± 0.071 over two seeds (sem 0.05): a tie, marked
    assert cells.loc[("a", "none"), 1.0] == f"0.850 ± {std} ≈" and cells.loc[("a", "distill"), 1.0] == "0.880 ≈"
    assert plot.tradeoff_plot(ok, tmp_path / "heal.png", y="accuracy", hue="heal").stat().st_size > 5000
