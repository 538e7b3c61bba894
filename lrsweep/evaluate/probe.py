"""Encoders: a linear probe on mean-pooled sentence embeddings (``eval.task=probe``).

A logistic regression (``eval.probe_C``) is fitted on the dense model's embeddings of
``eval.probe_train`` texts of ``data`` and kept (cached with the dense accuracy); the compressed
model's embeddings of the ``eval.probe_test`` texts are scored by the same probe, and their cosine
similarity to the dense embeddings is reported too. Pooling and fitting: :mod:`lrsweep.linear_probe`.

Two accuracies of the compressed model, measuring two things:
  accuracy        the dense-fitted probe on the compressed embeddings: how far the representation
                  drifted from the one the probe was fitted on (a rotation of the embedding space
                  that loses nothing still scores low);
  accuracy_refit  (``eval.probe_refit=true``; it embeds the ``probe_train`` texts at every point)
                  a probe of the same kind refitted on the compressed model's own embeddings of the
                  same training texts (as MTEB's and SentEval's classification tasks evaluate an
                  encoder: a logistic regression trained on that encoder's frozen embeddings): how
                  much of the label information the compressed embeddings still carry. With the
                  dense model it is ``accuracy_dense`` (the dense probe is fitted on the dense model).
Each with its binomial standard error over the test texts (:mod:`lrsweep.stderr`). With
``eval.retrieval.queries`` set, the task also scores title → article retrieval by nDCG@10
(``ndcg_at_10``: :mod:`lrsweep.evaluate.retrieval`), the encoder metric that follows the model's quality.

The texts are embedded in length-sorted batches, tokenized once per job (``prepare``) and reused by
every point; on a cold cache sibling jobs share the dense embeddings (:mod:`lrsweep.evaluate.embeddings`).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data, linear_probe, stderr
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.evaluate import retrieval
from lrsweep.evaluate.embeddings import batches, embed_batches, embed_shared
from lrsweep.evaluate.tasks import TASKS, Task


def _probe_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    key = {"model": ctx.model_key, "data": OmegaConf.to_container(ctx.cfg.data, resolve=True),
           "n_train": ecfg.probe_train, "n_test": ecfg.probe_test, "max_length": ecfg.max_length, "C": ecfg.probe_C,
           "batches": "length-sorted", "keeps": "train_texts"}

    found = cache.read(ctx.cache_dir, "probe", key)
    if found is None:  # embed the texts with the sibling jobs (outside the entry's lock), then one of them fits
        split = data.load_classification(ctx.cfg.data, ecfg.probe_train, ecfg.probe_test)
        train, test = (embed_shared(model, part.texts, ctx) for part in (split.train, split.test))

        def compute():
            probe = linear_probe.fit(train, split.train.labels, C=ecfg.probe_C)
            labels = torch.tensor(split.test.labels)
            tensors = {"coef": probe.coef, "intercept": probe.intercept, "test_embeddings": test, "test_labels": labels}
            return tensors, {"accuracy_dense": probe.accuracy(test, labels), "label_names": split.label_names,
                             "test_texts": split.test.texts, "train_texts": split.train.texts,
                             "train_labels": list(split.train.labels)}

        found = cache.get_or_compute(ctx.cache_dir, "probe", key, compute)[:2]
    tensors, info = found
    return {"tensors": tensors, "info": info, "test_batches": batches(ctx.tokenizer, info["test_texts"], ctx),
            "train_batches": batches(ctx.tokenizer, info["train_texts"], ctx) if ecfg.get("probe_refit") else None,
            "retrieval": retrieval.prepare(model, ctx)}


def refit_accuracy(train: torch.Tensor, train_labels: Any, test: torch.Tensor, test_labels: torch.Tensor,
                   C: float) -> float:
    """Accuracy on ``test`` of a probe fitted on ``train``: embeddings of one model, both."""
    return linear_probe.fit(train, train_labels, C=C).accuracy(test, test_labels)


def _probe_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    t, info = state["tensors"], state["info"]
    emb = embed_batches(model, state["test_batches"], ctx.device)
    cos = float((emb * t["test_embeddings"]).sum(-1).mean())
    labels, n = t["test_labels"], len(t["test_labels"])
    acc = linear_probe.Probe(t["coef"], t["intercept"]).accuracy(emb, labels)
    refit = refit_accuracy(embed_batches(model, state["train_batches"], ctx.device), info["train_labels"], emb,
                           labels, ctx.cfg.eval.probe_C) if ctx.cfg.eval.get("probe_refit") else None
    return {"task": ctx.cfg.data.name, "accuracy_dense": info["accuracy_dense"], "accuracy": acc,
            "accuracy_refit": refit, "cosine_similarity": cos,
            **{f"{k}_stderr": stderr.binomial(v, n) for k, v in
               (("accuracy_dense", info["accuracy_dense"]), ("accuracy", acc), ("accuracy_refit", refit))},
            **retrieval.evaluate(model, ctx, state["retrieval"])}


def _probe_check(cfg: DictConfig) -> None:
    if not isinstance(cfg.eval.get("probe_refit", False), bool):
        raise ConfigError("eval.probe_refit", f"{cfg.eval.probe_refit!r} is not a boolean", [True, False])


TASKS["probe"] = Task("probe", _probe_prepare, _probe_evaluate, kinds=("encoder",), config_check=_probe_check)
