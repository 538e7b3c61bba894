"""Calibration data and the loss behind the Fisher, by model kind (``SOURCES``).

A source reads only the calibration config it is given (``calib``, ``heal.data``, the held-out
draws of :mod:`lrsweep.allocate`): n_samples, seq_len, seed, batch_size and its data key.
  causal_lm  the LM loss on ``n_samples`` random windows of ``seq_len`` tokens of ``text``
             (documents disjoint from the perplexity text by default), cut from the text tokenized
             once (``sampling=stream``) or SVD-LLM's pieces at random character offsets tokenized one
             by one (``offsets``); ``bos`` puts BOS first in each;
  encoder    cross-entropy of a logistic-regression head fitted on the dense model's embeddings of
             the labelled calibration texts (``n_samples`` drawn with ``seed`` from the train half of
             the probe split of ``labelled``): a task loss that needs no MLM head and no labels we do
             not have.
A sample's loss is its own mean over its tokens (causal LM: mean next-token NLL of the window,
padding excluded; encoder: the probe cross-entropy of the text), as the reference codes compute it
with one sample per batch (ASVD4LLM's ``calib_fisher_info``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrsweep import data, linear_probe

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> each sample's loss (B,)


@dataclass(frozen=True)
class Source:
    """Calibration batches and the loss for one model kind."""

    config_key: str  # the key of the calibration config the batches come from
    batches: Callable[[DictConfig, Any], list[Batch]]  # (calibration config, tokenizer) -> batches
    loss: Callable[[nn.Module, list[Batch], str], LossFn]  # (dense model, batches, device) -> loss_fn
    fitted: bool = False  # the loss is fitted on its batches (the encoder's probe): score it on others


def to_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------- causal LM: windows of text, LM loss
def _stream_windows(text: str, tokenizer: Any, c: DictConfig, bos: int | None) -> torch.Tensor:
    """``n_samples`` windows at random token offsets of the text tokenized once (torch generator, ``seed``)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=bos is None).input_ids[0]
    n = int(c.seq_len) - (bos is not None)  # the text tokens of a window (after BOS)
    if ids.numel() <= n:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than calib.seq_len={c.seq_len}")
    gen = torch.Generator().manual_seed(int(c.seed))
    starts = torch.randint(0, ids.numel() - n, (int(c.n_samples),), generator=gen)
    windows = torch.stack([ids[s:s + n] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], 1)
    return windows


def _offset_windows(text: str, tokenizer: Any, c: DictConfig, bos: int | None) -> torch.Tensor:
    """SVD-LLM's sampler (``get_calib_train_data``): python ``random`` seeded with ``seed`` draws a
    character offset i in [0, len(text) - seq_len - 1]; text[i : i + 10 seq_len] is tokenized on
    its own (with the tokenizer's special tokens: BOS for LLaMA's) and its first ``seq_len`` tokens
    are a sample. A piece with fewer tokens is drawn again (SVD-LLM drops it and returns fewer samples).
    """
    seq_len, rng, out = int(c.seq_len), random.Random(int(c.seed)), []
    if len(text) <= seq_len + 1:
        raise ValueError(f"calibration text has {len(text)} characters, too few for calib.seq_len={seq_len}")
    for _ in range(100 * int(c.n_samples)):
        i = rng.randint(0, len(text) - seq_len - 1)
        ids = tokenizer(text[i:i + 10 * seq_len], return_tensors="pt").input_ids[0]
        if bos is not None and (ids.numel() == 0 or int(ids[0]) != bos):
            ids = torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])
        if ids.numel() >= seq_len:
            out.append(ids[:seq_len])
            if len(out) == int(c.n_samples):
                return torch.stack(out)
    raise ValueError(f"calibration text: {len(out)} of {c.n_samples} pieces reached calib.seq_len={seq_len} tokens")


SAMPLERS = {"stream": _stream_windows, "offsets": _offset_windows}  # calib.sampling


def _lm_batches(c: DictConfig, tokenizer: Any) -> list[Batch]:
    bos = data.bos_id(tokenizer, "calib.bos") if c.get("bos", False) else None
    windows = SAMPLERS[c.get("sampling", "stream")](data.load_text(c.text, "calib.text"), tokenizer, c, bos)
    return [{"input_ids": windows[i:i + c.batch_size]} for i in range(0, len(windows), c.batch_size)]


def _lm_loss(model: nn.Module, batches: list[Batch], device: str) -> LossFn:
    """Each window's mean next-token NLL (padding excluded): their mean is the HF loss of a batch of
    equal-length windows."""

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].to(nll.dtype) if mask is not None else torch.ones_like(nll)
        return (nll * keep).sum(1) / keep.sum(1).clamp(min=1)

    return loss


# ---------------------------------------------------------------- encoder: labelled texts, probe loss
def _encoder_batches(c: DictConfig, tokenizer: Any) -> list[Batch]:
    split = data.load_classification(c.labelled, 10**9, 0).train  # the half the probe never tests on
    pick = torch.randperm(len(split.texts), generator=torch.Generator().manual_seed(int(c.seed)))[:int(c.n_samples)]
    texts, labels = [split.texts[i] for i in pick.tolist()], [split.labels[i] for i in pick.tolist()]
    out = []
    for i in range(0, len(texts), c.batch_size):
        enc = tokenizer(texts[i:i + c.batch_size], padding=True, truncation=True, max_length=c.seq_len,
                        return_tensors="pt")
        out.append({**enc, "labels": torch.tensor(labels[i:i + c.batch_size])})
    return out


def _probe_loss(model: nn.Module, batches: list[Batch], device: str) -> LossFn:
    """Cross-entropy of a logistic-regression head fitted on the dense embeddings of the batches."""
    with torch.no_grad():
        emb = torch.cat([linear_probe.pooled(model, to_device(b, device)).cpu() for b in batches])
    probe = linear_probe.fit(emb, torch.cat([b["labels"] for b in batches]), C=1.0).to(device)
    return lambda m, batch: probe.loss(linear_probe.pooled(m, batch), batch["labels"])  # one value per text


SOURCES: dict[str, Source] = {
    "causal_lm": Source("text", _lm_batches, _lm_loss),
    "encoder": Source("labelled", _encoder_batches, _probe_loss, fitted=True),
}
