"""Encoders: a linear probe on mean-pooled sentence embeddings (``eval.task=probe``).

A logistic regression (``eval.probe_C``) is fitted on the dense model's embeddings of
``eval.probe_train`` texts of ``data`` and kept (cached with the dense accuracy); the compressed
model's embeddings of the ``eval.probe_test`` texts are scored by the same probe, and their cosine
similarity to the dense embeddings is reported too. Pooling and fitting: :mod:`lrsweep.linear_probe`.

Texts are embedded in batches of similar length (sorted by token count, ``eval.batch_size`` per
batch, returned in the given order): an embedding is masked-mean-pooled over its own tokens, so
padding changes it only by float rounding (~1e-7), and about half the padded tokens are not
computed. The test texts are tokenized once per job (``prepare``) and reused by every point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lrsweep import cache, data, linear_probe
from lrsweep.context import Context
from lrsweep.evaluate import TASKS, Task


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


@torch.no_grad()
def embed_batches(model: nn.Module, b: Batches, device: str) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalized embeddings of ``b``'s texts in their given order,
    fp32 on CPU."""
    sorted_emb = torch.cat([linear_probe.pooled(model, batch.to(device)).cpu() for batch in b.batches])
    out = torch.empty_like(sorted_emb)
    out[b.order] = sorted_emb
    return out


def embed(model: nn.Module, tokenizer: Any, texts: list[str], ctx: Context) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalized sentence embeddings, fp32 on CPU."""
    return embed_batches(model, batches(tokenizer, texts, ctx), ctx.device)


def _probe_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    key = {"model": ctx.model_key, "data": OmegaConf.to_container(ctx.cfg.data, resolve=True),
           "n_train": ecfg.probe_train, "n_test": ecfg.probe_test, "max_length": ecfg.max_length, "C": ecfg.probe_C,
           "batches": "length-sorted"}

    def compute():
        split = data.load_classification(ctx.cfg.data, ecfg.probe_train, ecfg.probe_test)
        train = embed(model, ctx.tokenizer, split.train.texts, ctx)
        test = embed(model, ctx.tokenizer, split.test.texts, ctx)
        probe = linear_probe.fit(train, split.train.labels, C=ecfg.probe_C)
        labels = torch.tensor(split.test.labels)
        tensors = {"coef": probe.coef, "intercept": probe.intercept, "test_embeddings": test, "test_labels": labels}
        return tensors, {"accuracy_dense": probe.accuracy(test, labels), "label_names": split.label_names,
                         "test_texts": split.test.texts}

    tensors, info, _ = cache.get_or_compute(ctx.cache_dir, "probe", key, compute)
    return {"tensors": tensors, "info": info, "test_batches": batches(ctx.tokenizer, info["test_texts"], ctx)}


def _probe_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    t, info = state["tensors"], state["info"]
    emb = embed_batches(model, state["test_batches"], ctx.device)
    cos = float((emb * t["test_embeddings"]).sum(-1).mean())
    return {"task": ctx.cfg.data.name, "accuracy_dense": info["accuracy_dense"],
            "accuracy": linear_probe.Probe(t["coef"], t["intercept"]).accuracy(emb, t["test_labels"]),
            "cosine_similarity": cos}


TASKS["probe"] = Task("probe", _probe_prepare, _probe_evaluate, kinds=("encoder",))
