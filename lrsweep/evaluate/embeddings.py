"""Sentence embeddings of an encoder in length-sorted batches: what the probe and retrieval embed.

An embedding is masked-mean-pooled over a text's own tokens and L2-normalized
(:func:`lrsweep.linear_probe.pooled`), fp32 on CPU. Texts are embedded in batches of similar length
(sorted by token count, ``eval.batch_size`` per batch, truncated to ``eval.max_length``, returned in
the given order): padding changes an embedding only by float rounding (~1e-7), and about half the
padded tokens are not computed. A job tokenizes its evaluation texts once (:func:`batches`) and reuses
them for every point. On a cold cache the dense embeddings are computed a batch per entry
(:func:`embed_shared`, :func:`lrsweep.cache.shared_parts`): sibling jobs of a sweep that start together
split them instead of one waiting for the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrsweep import cache, linear_probe
from lrsweep.context import Context


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
