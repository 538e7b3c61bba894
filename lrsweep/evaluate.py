"""Task metrics and latency, dense vs compressed, measured in the same job.

A task is registered in ``TASKS`` by name; ``eval.task=auto`` picks ``DEFAULT_TASK[model.kind]``.
Each task has ``prepare`` (dense-model work, cached on disk by everything it depends on) and
``evaluate`` (the compressed model), and returns row fields.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data


@dataclass
class Context:
    cfg: DictConfig
    tokenizer: Any
    device: str
    cache_dir: str
    model_key: dict[str, Any]  # what identifies the dense model (path, file hash, dtype, ...)


@dataclass(frozen=True)
class Task:
    name: str
    prepare: Callable[[nn.Module, Context], Any]
    evaluate: Callable[[nn.Module, Context, Any], dict[str, Any]]


TASKS: dict[str, Task] = {}
DEFAULT_TASK = {"encoder": "probe", "causal_lm": "perplexity"}


def task_for(cfg: DictConfig) -> Task:
    name = cfg.eval.task
    if name == "auto":
        name = DEFAULT_TASK[cfg.model.kind]
    return TASKS[name]


# ---------------------------------------------------------------- encoder: linear probe
@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: list[str], ctx: Context) -> torch.Tensor:
    """Mean-pooled (over the attention mask), L2-normalized sentence embeddings, fp32 on CPU."""
    ecfg = ctx.cfg.eval
    out = []
    for i in range(0, len(texts), ecfg.batch_size):
        batch = tokenizer(texts[i:i + ecfg.batch_size], padding=True, truncation=True,
                          max_length=ecfg.max_length, return_tensors="pt").to(ctx.device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def _probe_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    key = {"model": ctx.model_key, "data": OmegaConf.to_container(ctx.cfg.data, resolve=True),
           "n_train": ecfg.probe_train, "n_test": ecfg.probe_test, "max_length": ecfg.max_length, "C": ecfg.probe_C}

    def compute():
        from sklearn.linear_model import LogisticRegression

        split = data.load_classification(ctx.cfg.data, ecfg.probe_train, ecfg.probe_test)
        train = embed(model, ctx.tokenizer, split.train.texts, ctx)
        test = embed(model, ctx.tokenizer, split.test.texts, ctx)
        clf = LogisticRegression(C=ecfg.probe_C, max_iter=2000).fit(train.numpy(), split.train.labels)
        labels = torch.tensor(split.test.labels)
        tensors = {"coef": torch.tensor(clf.coef_, dtype=torch.float32),
                   "intercept": torch.tensor(clf.intercept_, dtype=torch.float32),
                   "test_embeddings": test, "test_labels": labels}
        acc = _probe_accuracy(tensors, test)
        return tensors, {"accuracy_dense": acc, "label_names": split.label_names, "test_texts": split.test.texts}

    tensors, info, _ = cache.get_or_compute(ctx.cache_dir, "probe", key, compute)
    return {"tensors": tensors, "info": info}


def _probe_accuracy(tensors: dict[str, torch.Tensor], emb: torch.Tensor) -> float:
    logits = emb @ tensors["coef"].T + tensors["intercept"]
    pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return float((pred == tensors["test_labels"]).float().mean())


def _probe_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    t, info = state["tensors"], state["info"]
    emb = embed(model, ctx.tokenizer, info["test_texts"], ctx)
    cos = float((emb * t["test_embeddings"]).sum(-1).mean())
    return {"task": ctx.cfg.data.name, "accuracy_dense": info["accuracy_dense"],
            "accuracy": _probe_accuracy(t, emb), "cosine_similarity": cos}


TASKS["probe"] = Task("probe", _probe_prepare, _probe_evaluate)


# ---------------------------------------------------------------- causal LM: perplexity
@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, max_length: int, stride: int, device: str) -> float:
    """HF's sliding-window perplexity: each window scores only the tokens not scored before."""
    seq_len = input_ids.shape[1]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        target_len = end - prev_end
        ids = input_ids[:, begin:end].to(device)
        labels = ids.clone()
        labels[:, :-target_len] = -100
        loss = model(ids, labels=labels).loss.float()
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * scored
        n_tokens += scored
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def _ppl_tokens(ctx: Context) -> torch.Tensor:
    ecfg = ctx.cfg.eval
    text = data.load_text(ctx.cfg.eval.text)
    ids = ctx.tokenizer(text, return_tensors="pt").input_ids
    return ids[:, : ecfg.ppl_tokens]


def _ppl_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    key = {"model": ctx.model_key, "text": OmegaConf.to_container(ecfg.text, resolve=True),
           "tokens": ecfg.ppl_tokens, "max_length": ecfg.ppl_context, "stride": ecfg.ppl_stride}

    def compute():
        ids = _ppl_tokens(ctx)
        ppl = perplexity(model, ids, ecfg.ppl_context, ecfg.ppl_stride, ctx.device)
        return {"input_ids": ids}, {"perplexity_dense": ppl}

    tensors, info, _ = cache.get_or_compute(ctx.cache_dir, "perplexity", key, compute)
    return {"input_ids": tensors["input_ids"], **info}


def _ppl_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    ppl = perplexity(model, state["input_ids"], ecfg.ppl_context, ecfg.ppl_stride, ctx.device)
    return {"task": ctx.cfg.eval.text.name, "perplexity_dense": state["perplexity_dense"], "perplexity": ppl}


TASKS["perplexity"] = Task("perplexity", _ppl_prepare, _ppl_evaluate)


# ---------------------------------------------------------------- latency
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def latency_ms(model: nn.Module, ctx: Context) -> float:
    """Median wall time (ms) of one forward pass on a fixed batch, after warm-up."""
    lcfg = ctx.cfg.eval.latency
    vocab = getattr(ctx.tokenizer, "vocab_size", 1000)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (lcfg.batch_size, lcfg.seq_len), generator=gen).to(ctx.device)
    for _ in range(lcfg.warmup):
        model(input_ids=ids)
    _sync(ctx.device)
    times = []
    for _ in range(lcfg.repeats):
        t0 = time.perf_counter()
        model(input_ids=ids)
        _sync(ctx.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
