"""Title → article retrieval (eval.retrieval, lrsweep.evaluate.retrieval): ranks, nDCG@10 and MRR@10
against hand-built rankings, their standard errors, the seeded sample of the news articles, the checks
before launch, the run identity, and the metric on MiniLM, dense and compressed."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from omegaconf import open_dict

from conftest import FAST
from lrsweep import evaluate, models, provenance
from lrsweep.compress import compress_model
from lrsweep.evaluate import retrieval
from lrsweep.identity import run_id


def _ranked(scores: list[list[float]]) -> torch.Tensor:
    """Ranks when query i scores document j at ``scores[i][j]`` (one-hot documents: query · doc_j = scores[i][j])."""
    s = torch.tensor(scores, dtype=torch.float64)
    return retrieval.ranks(s, torch.eye(len(scores), dtype=torch.float64))


def test_identical_queries_and_documents_rank_first_and_score_one():
    emb = torch.nn.functional.normalize(torch.randn(30, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    r = retrieval.ranks(emb, emb)
    assert r.tolist() == [1] * 30
    got = retrieval.scores(r)
    assert got["ndcg_at_10"] == 1.0 and got["mrr_at_10"] == 1.0 and got["ndcg_at_10_stderr"] == 0.0


def test_ranks_of_a_hand_built_ranking_and_their_ndcg_and_mrr():
    n = 12
    rows = []
    for target_rank in (1, 2, 3, 10, 11, 12):  # query i's relevant document (i) placed at target_rank
        i = len(rows)
        others = [j for j in range(n) if j != i]
        row = [0.0] * n
        order = others[:target_rank - 1] + [i] + others[target_rank - 1:]  # best first
        for place, j in enumerate(order):
            row[j] = float(n - place)
        rows.append(row)
    rows += [[0.0] * n for _ in range(n - len(rows))]  # queries 6..11: every document scored 0 (ties)
    r = _ranked(rows)
    assert r[:6].tolist() == [1, 2, 3, 10, 11, 12]
    assert r[6:].tolist() == [n] * (n - 6)  # a tie counts against the query: last, not first
    ndcg, mrr = retrieval.ndcg_at(r), retrieval.mrr_at(r)
    assert ndcg[:6].tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.5, 1 / math.log2(11), 0.0, 0.0])
    assert mrr[:6].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.1, 0.0, 0.0])
    got = retrieval.scores(r, "_dense")
    assert got["ndcg_at_10_dense"] == pytest.approx(sum(ndcg.tolist()) / n)
    assert got["ndcg_at_10_dense_stderr"] == pytest.approx(statistics.stdev(ndcg.tolist()) / math.sqrt(n))
    assert got["mrr_at_10_dense"] == pytest.approx((1 + 0.5 + 1 / 3 + 0.1) / n)


def test_a_collapsed_or_nan_model_retrieves_nothing():
    one_point = torch.ones(12, 4) / 2
    assert retrieval.ranks(one_point, one_point).tolist() == [12] * 12  # last, beyond the first 10: 0
    assert retrieval.scores(retrieval.ranks(one_point, one_point))["ndcg_at_10"] == 0.0
    nan = torch.full((12, 4), float("nan"))
    assert retrieval.ranks(nan, nan).tolist() == [12] * 12
    with pytest.raises(ValueError, match="one relevant document each"):
        retrieval.ranks(torch.ones(3, 4), torch.ones(4, 4))


def test_the_sample_is_seeded_and_its_titles_and_bodies_occur_once(compose):
    cfg = compose(["eval.retrieval.queries=50"])
    q, d = retrieval.sample(cfg.eval.retrieval)
    assert len(q) == len(d) == 50 and len(set(q)) == 50 and len(set(d)) == 50 and all(q) and all(d)
    assert retrieval.sample(cfg.eval.retrieval) == (q, d)
    other = compose(["eval.retrieval.queries=50", "eval.retrieval.data.split_seed=1"])
    assert retrieval.sample(other.eval.retrieval)[0] != q
    assert "Quotable" not in q  # a title of several articles has no single relevant document
    with pytest.raises(ValueError, match=r"eval\.retrieval\.queries=100000"):
        retrieval.sample(compose(["eval.retrieval.queries=100000"]).eval.retrieval)


def test_queries_checked_before_launch(config_error):
    for bad in ("-1", "abc", "true", "1.5", "1"):
        assert "eval.retrieval.queries" in config_error(f"eval.retrieval.queries={bad}"), bad
    assert config_error("eval.retrieval.queries=500") is None
    assert config_error("eval.retrieval.queries=0") is None
    error = config_error("model=smollm2", "eval.retrieval.queries=100")
    assert "eval.retrieval.queries" in error and "probe" in error


def test_run_id_holds_retrieval_settings_only_when_it_is_on(compose):
    """Off (the default), the settings change no run_id, and a config without the key (a row written
    before it existed) has the same one; on, the number of queries and the data do."""
    base = compose()
    before = copy.deepcopy(base)
    with open_dict(before):
        del before.eval.retrieval
    assert run_id(before) == run_id(base) == run_id(compose(["eval.retrieval.data.split_seed=5"]))
    on = {run_id(compose(o)) for o in (["eval.retrieval.queries=500"], ["eval.retrieval.queries=200"],
                                        ["eval.retrieval.queries=500", "eval.retrieval.data.split_seed=5"])}
    assert len(on) == 3 and run_id(base) not in on


def test_analysis_knows_ndcg_direction_label_and_dense_column():
    from analysis import style

    assert style.better("ndcg_at_10") == "max" and "nDCG@10" in style.label("ndcg_at_10")
    assert style.dense_column("ndcg_at_10") == "ndcg_at_10_dense" and "ndcg_at_10" in style.METRICS


def test_minilm_dense_scores_its_own_ranking_and_a_compressed_model_scores_lower(minilm, compose, tmp_path):
    """The dense model evaluated as a compressed one gives the cached dense ranks exactly; MiniLM with
    every layer quantized to 2 bits (cheap to make; measured 0.31 against 0.95 on these 32 queries)
    retrieves far worse; the row fields and extra come with their stderrs."""
    model, tok = minilm
    cfg = compose([*FAST, "eval.probe_train=16", "eval.probe_test=16", "eval.max_length=64",
                   "eval.retrieval.queries=32", "method=quant", "bits=2"])
    ctx = evaluate.Context(cfg, tok, "cpu", str(tmp_path), provenance.model_key(cfg))
    task = evaluate.task_for(cfg)
    state = task.prepare(model, ctx)
    dense = task.evaluate(model, ctx, state)
    assert dense["ndcg_at_10"] == dense["ndcg_at_10_dense"] > 0.8
    assert dense["ndcg_at_10_stderr"] == dense["ndcg_at_10_dense_stderr"] > 0
    m = copy.deepcopy(model)
    compress_model(m, models.target_modules(m, cfg.model.targets), cfg, progress=False)
    cut = task.evaluate(m, ctx, state)
    assert cut["ndcg_at_10"] < dense["ndcg_at_10"] - 3 * cut["ndcg_at_10_stderr"]
    extra = cut["extra"]["retrieval"]
    assert extra["queries"] == 32 and extra["data"] == "news" and extra["mrr_at_10"] <= cut["ndcg_at_10"]
    assert "accuracy" in cut  # the probe's own metrics as before
