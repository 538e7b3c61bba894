"""Causal LMs: zero-shot classification of ``data`` by the log-likelihood of each label's
verbalizer after a prompt (``eval.task=zeroshot``, ``eval.zeroshot``)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from lrsweep import cache, data, stderr
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.evaluate.tasks import TASKS, Task


@torch.no_grad()
def continuation_logprob(model: nn.Module, tokenizer: Any, context: str, continuation: str, device: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens.

    Context and continuation are tokenized separately and concatenated (as lm-evaluation-harness
    does), so every label is scored on the same context tokens.
    """
    ctx_ids = tokenizer(context, add_special_tokens=False).input_ids
    cont_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx_ids + cont_ids], device=device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx_ids) - 1:-1].double(), -1)
    return float(logp.gather(1, torch.tensor(cont_ids, device=device)[:, None]).sum())


def zeroshot_predictions(model: nn.Module, tokenizer: Any, texts: list[str], template: str,
                         verbalizers: list[str], device: str) -> list[int]:
    """For each text, the index of the verbalizer with the highest log-likelihood after the prompt."""
    preds = []
    for text in texts:
        context = template.format(text=text)
        scores = [continuation_logprob(model, tokenizer, context, v, device) for v in verbalizers]
        preds.append(max(range(len(scores)), key=scores.__getitem__))
    return preds


def zeroshot_split(ctx: Context) -> tuple[list[str], list[int], list[str]]:
    z = ctx.cfg.eval.zeroshot
    split = data.load_classification(ctx.cfg.data, 0, int(z.n))
    missing = [n for n in split.label_names if n not in z.verbalizers]
    if missing:
        raise ConfigError("eval.zeroshot.verbalizers", f"no verbalizer for labels {missing}", split.label_names)
    return split.test.texts, split.test.labels, [str(z.verbalizers[n]) for n in split.label_names]


def _zeroshot_accuracy(model: nn.Module, ctx: Context) -> tuple[float, int]:
    """(accuracy, test texts scored)."""
    texts, labels, verbalizers = zeroshot_split(ctx)
    preds = zeroshot_predictions(model, ctx.tokenizer, texts, ctx.cfg.eval.zeroshot.template, verbalizers, ctx.device)
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels), len(labels)


def _zeroshot_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    key = {"model": ctx.model_key, "data": OmegaConf.to_container(ctx.cfg.data, resolve=True),
           "zeroshot": OmegaConf.to_container(ctx.cfg.eval.zeroshot, resolve=True)}
    _, info, _ = cache.get_or_compute(ctx.cache_dir, "zeroshot", key,
                                      lambda: ({}, {"accuracy_dense": _zeroshot_accuracy(model, ctx)[0]}))
    return info


def _zeroshot_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    acc, n = _zeroshot_accuracy(model, ctx)  # the dense accuracy is of the same n texts
    return {"task": f"{ctx.cfg.data.name}_zeroshot", "accuracy_dense": state["accuracy_dense"], "accuracy": acc,
            "accuracy_dense_stderr": stderr.binomial(state["accuracy_dense"], n),
            "accuracy_stderr": stderr.binomial(acc, n)}


TASKS["zeroshot"] = Task("zeroshot", _zeroshot_prepare, _zeroshot_evaluate, kinds=("causal_lm",))
