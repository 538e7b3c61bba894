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
Each with its binomial standard error over the test texts (:mod:`lrsweep.stderr`).

Texts are embedded in batches of similar length (sorted by token count, ``eval.batch_size`` per
batch, returned in the given order): an embedding is masked-mean-pooled over its own tokens, so
padding changes it only by float rounding (~1e-7), and about half the padded tokens are not
computed. The test texts are tokenized once per job (``prepare``) and reused by every point.
On a cold cache the dense embeddings are computed a batch per entry (:func:`cache.shared_parts`):
sibling jobs of a sweep that start together split them instead of one waiting for the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data, linear_probe, stderr
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.evaluate.tasks import TASKS, Task


@dataclass
class Batches:
    """Tokenized texts in batches of similar length; ``order[i]``: the text of the i-th embedding computed."""

    order: torch.Tensor
    batches: list[Any]


def batches(tokenizer: Any, texts: list[str], ctx: Context) -> Batches:
    """``texts`` tokenized as the probe embeds them (truncated to ``eval.max_length``), shortest first."""
    ecfg = ctx.cfg.eval
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=ecfg.max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    return Batches(torch.tensor(order, dtype=torch.long),
                   [tokenizer([texts[j] for j in order[i:i + ecfg.batch_size]], padding=True, truncation=True,
                              max_length=ecfg.max_length, return_tensors="pt")
                    for i in range(0, len(texts), ecfg.batch_size)])


def _in_given_order(sorted_emb: torch.Tensor, b: Batches) -> torch.Tensor:
    out = torch.empty_like(sorted_emb)
    out[b.order] = sorted_emb
    return out


@torch.no_grad()
def embed_batches(model: nn.Module, b: Batches, device: str) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalized embeddings of ``b``'s texts in their given order,
    fp32 on CPU."""
    return _in_given_order(torch.cat([linear_probe.pooled(model, batch.to(device)).cpu() for batch in b.batches]), b)


def embed(model: nn.Module, tokenizer: Any, texts: list[str], ctx: Context) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalized sentence embeddings, fp32 on CPU."""
    return embed_batches(model, batches(tokenizer, texts, ctx), ctx.device)


@torch.no_grad()
def embed_shared(model: nn.Module, texts: list[str], ctx: Context) -> torch.Tensor:
    """:func:`embed`, each batch an entry of the disk cache (``<cache_dir>/embeddings``) computed by
    whichever job gets to it first: the same batches, so the same tensors as :func:`embed`."""
    b = batches(ctx.tokenizer, texts, ctx)
    key = {"model": ctx.model_key, "texts": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
           "max_length": ctx.cfg.eval.max_length, "batch_size": ctx.cfg.eval.batch_size}
    parts = cache.shared_parts(ctx.cache_dir, "embeddings", key, len(b.batches),
                               lambda i: {"emb": linear_probe.pooled(model, b.batches[i].to(ctx.device)).cpu()})
    return _in_given_order(torch.cat([part["emb"] for part in parts]), b)


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
            "train_batches": batches(ctx.tokenizer, info["train_texts"], ctx) if ecfg.get("probe_refit") else None}


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
               (("accuracy_dense", info["accuracy_dense"]), ("accuracy", acc), ("accuracy_refit", refit))}}


def _probe_check(cfg: DictConfig) -> None:
    if not isinstance(cfg.eval.get("probe_refit", False), bool):
        raise ConfigError("eval.probe_refit", f"{cfg.eval.probe_refit!r} is not a boolean", [True, False])


TASKS["probe"] = Task("probe", _probe_prepare, _probe_evaluate, kinds=("encoder",), config_check=_probe_check)
