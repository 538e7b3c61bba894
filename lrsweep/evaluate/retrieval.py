"""Encoders: title → article retrieval scored by nDCG@10 (``eval.retrieval``; opt-in, ``queries: 0`` is off).

``eval.retrieval.queries`` articles of ``eval.retrieval.data`` (by default the bundled news articles),
drawn by a seeded shuffle (``data.split_seed``) from those whose title and body both occur once in
the data set, give a query each (the title, ``query_column``) and a document each (the body,
``text_column``, truncated to ``eval.max_length`` tokens); the corpus is their bodies. The model embeds
queries and documents alike (:mod:`lrsweep.evaluate.embeddings`), ranks the corpus by cosine
similarity to each query, and each query scores the nDCG@10 of its one relevant document,
1 / log2(1 + rank) when it ranks in the first 10, else 0 (with one relevant document its ideal DCG is 1).
``ndcg_at_10`` is the mean over the queries, with the standard error of that mean
(:func:`lrsweep.stderr.item_mean`); ``ndcg_at_10_dense`` the dense model's, on the same queries.
MRR@10 (1 / rank in the first 10, else 0) goes into ``row.extra["retrieval"]``.

Why this metric: it is how the sentence-embedding literature scores retrieval (BEIR, Thakur et al.
2021; MTEB, Muennighoff et al. 2023, whose main retrieval score is nDCG@10), and it scores the model
by its own embeddings only: queries and documents both come from the compressed model, so a rotation
of the embedding space that loses nothing scores as before (unlike ``accuracy``, the dense-fitted
probe), and there is no classifier trained per point, whose training sample and regularization add
their own noise (unlike ``accuracy_refit``). Title → body pairs are the kind of pairs
all-MiniLM-L6-v2 was trained on (its model card: S2ORC title–abstract, Stack Exchange title–body).

Ranks are pessimistic: a query's relevant document ranks behind every document scored the same or
higher, and a non-finite score ranks it last, so a model that maps every text to one point, or to
NaN, scores 0, not 1. The dense ranks are cached (``<cache_dir>/retrieval``) with the texts, keyed by
the model, the data config, the number of queries and ``eval.max_length``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data, stderr
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.evaluate.embeddings import batches, embed_batches, embed_shared
from lrsweep.evaluate.tasks import task_for

K = 10  # the cut-off of nDCG@K and MRR@K


def enabled(cfg: DictConfig) -> bool:
    """True when ``eval.retrieval.queries`` asks for retrieval (a positive number)."""
    rcfg = cfg.eval.get("retrieval")
    return bool(rcfg is not None and rcfg.get("queries"))


def check(cfg: DictConfig) -> None:
    """ConfigError (before launch) for a number of queries that is not a count, or retrieval asked of a
    task that embeds no sentences (it runs with the probe task: encoders)."""
    if cfg.eval.get("retrieval") is None:
        return
    n = cfg.eval.retrieval.get("queries")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError("eval.retrieval.queries", f"{n!r} must be a whole number of queries, 0 for no retrieval",
                          ["0", "500"])
    if not n:
        return
    if task_for(cfg).name != "probe":
        raise ConfigError("eval.retrieval.queries", f"retrieval scores sentence embeddings: it runs with the probe "
                          f"task of encoders, not with eval.task={cfg.eval.task} (model.kind={cfg.model.kind})",
                          ["eval.retrieval.queries=0"])
    if n < 2:
        raise ConfigError("eval.retrieval.queries", f"{n} query has no other document to rank against", ["0", "500"])
    data.check_available(cfg.eval.retrieval.data, "eval.retrieval.data")


def ranks(queries: torch.Tensor, corpus: torch.Tensor) -> torch.Tensor:
    """The rank (1 = first) of each query's relevant document, ``corpus[i]`` for ``queries[i]``, among all
    of ``corpus`` by dot product (cosine similarity of L2-normalized embeddings): the number of documents
    not scored strictly below it. Ties count against the query; a non-finite score ranks it last."""
    if queries.shape[0] != corpus.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries for {corpus.shape[0]} documents: one relevant document each")
    scores = queries.double() @ corpus.double().T
    return corpus.shape[0] - (scores < scores.diagonal().unsqueeze(1)).sum(1)


def ndcg_at(r: torch.Tensor, k: int = K) -> torch.Tensor:
    """Per-query nDCG@k of one relevant document at rank ``r``: 1 / log2(1 + r) for r <= k, else 0."""
    return torch.where(r <= k, 1.0 / torch.log2(r.double() + 1), 0.0)


def mrr_at(r: torch.Tensor, k: int = K) -> torch.Tensor:
    """Per-query reciprocal rank cut at k: 1 / r for r <= k, else 0."""
    return torch.where(r <= k, 1.0 / r.double(), 0.0)


def scores(r: torch.Tensor, suffix: str = "") -> dict[str, float | None]:
    """``ndcg_at_10<suffix>`` and ``mrr_at_10<suffix>``, each with its ``_stderr``, of the ranks ``r``."""
    out: dict[str, float | None] = {}
    for name, per_query in (("ndcg", ndcg_at(r)), ("mrr", mrr_at(r))):
        mean, se = stderr.item_mean(per_query.tolist())
        out[f"{name}_at_{K}{suffix}"], out[f"{name}_at_{K}{suffix}_stderr"] = mean, se
    return out


def sample(rcfg: DictConfig) -> tuple[list[str], list[str]]:
    """(queries, documents) of ``rcfg.queries`` articles: those whose query and document both occur once
    in the data set, in the order of a shuffle seeded by ``rcfg.data.split_seed``."""
    dcfg = rcfg.data
    ds = data.load_dataset(dcfg, "eval.retrieval.data")
    qcol, dcol = dcfg.query_column, dcfg.get("text_column", "text")
    queries = ["" if q is None else str(q).strip() for q in ds[qcol]]
    documents = [str(d) for d in ds[dcol]]
    nq, nd = Counter(queries), Counter(documents)
    keep = [i for i, (q, d) in enumerate(zip(queries, documents, strict=True)) if q and nq[q] == 1 and nd[d] == 1]
    n = int(rcfg.queries)
    if n > len(keep):
        raise ValueError(f"eval.retrieval.queries={n}: {data.describe(dcfg)} has {len(keep)} rows whose "
                         f"{qcol} and {dcol} both occur once")
    rows = ds.select(keep).shuffle(seed=int(dcfg.get("split_seed", 0)))[:n]
    return [str(q).strip() for q in rows[qcol]], [str(d) for d in rows[dcol]]


def prepare(model: nn.Module, ctx: Context) -> dict[str, Any] | None:
    """The dense model's ranks (cached) and the job's tokenized queries and documents; None when off."""
    if not enabled(ctx.cfg):
        return None
    rcfg = ctx.cfg.eval.retrieval
    key = {"model": ctx.model_key, "data": OmegaConf.to_container(rcfg.data, resolve=True),
           "queries": int(rcfg.queries), "max_length": ctx.cfg.eval.max_length}
    found = cache.read(ctx.cache_dir, "retrieval", key)
    if found is None:  # embed with the sibling jobs (outside the entry's lock), then one of them ranks
        queries, documents = sample(rcfg)
        q, d = (embed_shared(model, texts, ctx) for texts in (queries, documents))
        found = cache.get_or_compute(ctx.cache_dir, "retrieval", key, lambda: (
            {"ranks": ranks(q, d)}, {"queries": queries, "documents": documents}))[:2]
    tensors, info = found
    return {"dense_ranks": tensors["ranks"], "queries": batches(ctx.tokenizer, info["queries"], ctx),
            "documents": batches(ctx.tokenizer, info["documents"], ctx)}


def evaluate(model: nn.Module, ctx: Context, state: dict[str, Any] | None) -> dict[str, Any]:
    """Row fields of the compressed model's retrieval next to the dense model's; none when off."""
    if state is None:
        return {}
    r = ranks(*(embed_batches(model, state[part], ctx.device) for part in ("queries", "documents")))
    both = {**scores(r), **scores(state["dense_ranks"], "_dense")}
    extra = {"data": str(ctx.cfg.eval.retrieval.data.get("name", "")), "queries": len(r), "k": K,
             **{k: v for k, v in both.items() if k.startswith("mrr")}}
    return {**{k: v for k, v in both.items() if k.startswith("ndcg")}, "extra": {"retrieval": extra}}
