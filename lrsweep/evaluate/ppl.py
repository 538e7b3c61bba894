"""Causal LMs: perplexity of ``eval.text`` by HF's sliding-window recipe (``eval.task=perplexity``)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data, stderr
from lrsweep.context import Context
from lrsweep.errors import ConfigError
from lrsweep.evaluate.tasks import TASKS, Task


def ppl_windows(seq_len: int, max_length: int, stride: int, drop_last: bool = False) -> list[tuple[int, int, int]]:
    """(begin, end, new tokens) of each window of HF's sliding-window recipe over ``seq_len`` tokens.

    Each window scores only its last ``new`` tokens (those no earlier window scored). With
    ``stride == max_length`` the windows do not overlap; ``drop_last`` leaves out a last window
    shorter than ``max_length`` (GPTQ / SVD-LLM drop that remainder).
    """
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        if drop_last and end - begin < max_length:
            break
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return out


@torch.no_grad()
def window_losses(model: nn.Module, input_ids: torch.Tensor, max_length: int, stride: int, device: str,
                  drop_last: bool = False, bos: int | None = None) -> tuple[list[float], list[int]]:
    """(mean token NLL, tokens scored) of each window of :func:`ppl_windows` (HF's sliding-window recipe).

    Each window scores only its new tokens (labels after the shift); HF's guide subtracts one token
    per window instead, a difference below 0.2 % at 512-token windows. ``bos``: a token put before
    every window, so the window's first token is scored too (given BOS). A non-finite loss stays as it is.
    """
    windows = ppl_windows(input_ids.shape[1], max_length, stride, drop_last)
    if not windows:
        raise ValueError(f"the perplexity text has {input_ids.shape[1]} tokens, fewer than one window of {max_length}")
    losses, counts = [], []
    for begin, end, target_len in windows:
        ids = input_ids[:, begin:end]
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], 1)
        ids = ids.to(device)
        labels = ids.clone()
        labels[:, :-target_len] = -100
        losses.append(float(model(ids, labels=labels).loss.float()))
        counts.append(int((labels[:, 1:] != -100).sum()))
    return losses, counts


def perplexity_stderr(model: nn.Module, input_ids: torch.Tensor, max_length: int, stride: int, device: str,
                      drop_last: bool = False, bos: int | None = None) -> tuple[float, float | None]:
    """(perplexity, its standard error): exp of the token-weighted mean of :func:`window_losses`, the
    error by the delta method over windows (:func:`lrsweep.stderr.perplexity`; None for one window).
    A window with a non-finite loss is never skipped: the perplexity is then NaN or inf, as it is."""
    return stderr.perplexity(*window_losses(model, input_ids, max_length, stride, device, drop_last, bos))


def perplexity(model: nn.Module, input_ids: torch.Tensor, max_length: int, stride: int, device: str,
               drop_last: bool = False, bos: int | None = None) -> float:
    """exp of the mean token NLL over the windows of :func:`ppl_windows` (:func:`perplexity_stderr`'s value)."""
    return perplexity_stderr(model, input_ids, max_length, stride, device, drop_last, bos)[0]


def ppl_tokens(ctx: Context) -> torch.Tensor:
    """The evaluation text tokenized once (with BOS per window: without the tokenizer's own specials)."""
    ecfg = ctx.cfg.eval
    text = data.load_text(ecfg.text, "eval.text")
    ids = ctx.tokenizer(text, return_tensors="pt", add_special_tokens=not ecfg.ppl_bos).input_ids
    return ids[:, : ecfg.ppl_tokens]


def ppl_args(ctx: Context) -> dict[str, Any]:
    """The window arguments of :func:`perplexity_stderr` from ``eval.ppl_*`` (context, stride, last window, BOS)."""
    ecfg = ctx.cfg.eval
    return {"max_length": int(ecfg.ppl_context), "stride": int(ecfg.ppl_stride), "device": ctx.device,
            "drop_last": bool(ecfg.ppl_drop_last),
            "bos": data.bos_id(ctx.tokenizer, "eval.ppl_bos") if ecfg.ppl_bos else None}


def _ppl_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    key = {"model": ctx.model_key, "text": OmegaConf.to_container(ecfg.text, resolve=True),
           "tokens": ecfg.ppl_tokens, "max_length": ecfg.ppl_context, "stride": ecfg.ppl_stride,
           **{k: True for k in ("ppl_drop_last", "ppl_bos") if ecfg[k]}, "stderr": "delta/windows"}

    def compute():
        ids = ppl_tokens(ctx)
        ppl, se = perplexity_stderr(model, ids, **ppl_args(ctx))
        return {"input_ids": ids}, {"perplexity_dense": ppl, "perplexity_dense_stderr": se}

    tensors, info, _ = cache.get_or_compute(ctx.cache_dir, "perplexity", key, compute)
    return {"input_ids": tensors["input_ids"], **info}


def _ppl_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    ecfg, ids = ctx.cfg.eval, state["input_ids"]
    windows = ppl_windows(ids.shape[1], int(ecfg.ppl_context), int(ecfg.ppl_stride), bool(ecfg.ppl_drop_last))
    # a window scoring all its tokens leaves out its first one, unless BOS comes before it
    scored = sum(new - (new == end - begin and not ecfg.ppl_bos) for begin, end, new in windows)
    ppl, se = perplexity_stderr(model, ids, **ppl_args(ctx))
    return {"task": ecfg.text.name, "perplexity_dense": state["perplexity_dense"],
            "perplexity_dense_stderr": state["perplexity_dense_stderr"], "perplexity": ppl, "perplexity_stderr": se,
            "extra": {"perplexity_windows": {"windows": len(windows), "text_tokens": int(ids.shape[1]),
                                             "scored_tokens": scored}}}


def _ppl_check(cfg: DictConfig) -> None:
    """ConfigError for perplexity settings that cannot work (and for an offline hub text)."""
    e = cfg.eval
    for key in ("ppl_context", "ppl_stride"):
        if not isinstance(e[key], int) or isinstance(e[key], bool) or e[key] < 2:
            raise ConfigError(f"eval.{key}", f"{e[key]!r} must be an integer >= 2")
    if e.ppl_stride > e.ppl_context:
        raise ConfigError("eval.ppl_stride", f"{e.ppl_stride} exceeds eval.ppl_context={e.ppl_context} "
                          "(tokens between windows would never be scored)", [f"2..{e.ppl_context}"])
    if e.ppl_tokens is not None and (not isinstance(e.ppl_tokens, int) or isinstance(e.ppl_tokens, bool)
                                     or e.ppl_tokens < 2):
        raise ConfigError("eval.ppl_tokens", f"{e.ppl_tokens!r} must be an integer >= 2 or null (all tokens)")
    for key in ("ppl_drop_last", "ppl_bos"):
        if not isinstance(e[key], bool):
            raise ConfigError(f"eval.{key}", f"{e[key]!r} is not a boolean", [True, False])
    data.check_available(e.text, "eval.text")


TASKS["perplexity"] = Task("perplexity", _ppl_prepare, _ppl_evaluate, kinds=("causal_lm",), config_check=_ppl_check)
