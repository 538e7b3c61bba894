"""Task metrics and latency, dense vs compressed, measured in the same job.

A task is registered in ``TASKS`` by name; ``eval.task=auto`` picks ``DEFAULT_TASK[model.kind]``.
Each task has ``prepare`` (dense-model work, cached on disk by everything it depends on) and
``evaluate`` (the compressed model), and returns row fields.
"""

from __future__ import annotations

import importlib.util
import math
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import cache, data
from lrsweep import lm_eval as _lm_eval
from lrsweep.errors import ConfigError
from lrsweep.factorization import dense_linear


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
    kinds: tuple[str, ...] = ("encoder", "causal_lm")  # model kinds the task applies to
    requires: str | None = None  # an optional package the task needs (import name)
    config_check: Callable[[DictConfig], None] | None = None  # the task's own checks of cfg.eval

    def check(self, cfg: DictConfig) -> None:
        """Raise ConfigError when this task cannot run for ``cfg`` (called by validate)."""
        if cfg.model.kind not in self.kinds:
            raise ConfigError("eval.task", f"{self.name} needs model.kind in {list(self.kinds)}, "
                              f"not {cfg.model.kind!r}", ["auto", *sorted(TASKS)])
        if self.requires and importlib.util.find_spec(self.requires) is None:
            raise ConfigError("eval.task", f"{self.name} needs the optional package {self.requires!r}: "
                              "pip install -e '.[lm_eval]'")
        if self.config_check:
            self.config_check(cfg)


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


TASKS["probe"] = Task("probe", _probe_prepare, _probe_evaluate, kinds=("encoder",))


# ---------------------------------------------------------------- causal LM: perplexity
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
def perplexity(model: nn.Module, input_ids: torch.Tensor, max_length: int, stride: int, device: str,
               drop_last: bool = False, bos: int | None = None) -> float:
    """exp of the mean token NLL over the windows of :func:`ppl_windows` (HF's sliding-window recipe).

    Each window's mean loss is weighted by the tokens it actually scores (labels after the shift);
    HF's guide subtracts one token per window instead, a difference below 0.2 % at 512-token windows.
    ``bos``: a token put before every window, so the window's first token is scored too (given BOS).
    A window with a non-finite loss is never skipped: the perplexity is then NaN or inf, as it is.
    """
    windows = ppl_windows(input_ids.shape[1], max_length, stride, drop_last)
    if not windows:
        raise ValueError(f"the perplexity text has {input_ids.shape[1]} tokens, fewer than one window of {max_length}")
    nll_sum, n_tokens = 0.0, 0
    for begin, end, target_len in windows:
        ids = input_ids[:, begin:end]
        if bos is not None:
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], 1)
        ids = ids.to(device)
        labels = ids.clone()
        labels[:, :-target_len] = -100
        loss = model(ids, labels=labels).loss.float()
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * scored
        n_tokens += scored
    mean = nll_sum / n_tokens
    return math.inf if mean > 700 else math.exp(mean)  # math.exp overflows (an error) past ~709


def _ppl_tokens(ctx: Context) -> torch.Tensor:
    """The evaluation text tokenized once (with BOS per window: without the tokenizer's own specials)."""
    ecfg = ctx.cfg.eval
    text = data.load_text(ecfg.text, "eval.text")
    ids = ctx.tokenizer(text, return_tensors="pt", add_special_tokens=not ecfg.ppl_bos).input_ids
    return ids[:, : ecfg.ppl_tokens]


def _ppl_args(ctx: Context) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    return {"max_length": int(ecfg.ppl_context), "stride": int(ecfg.ppl_stride), "device": ctx.device,
            "drop_last": bool(ecfg.ppl_drop_last),
            "bos": data.bos_id(ctx.tokenizer, "eval.ppl_bos") if ecfg.ppl_bos else None}


def _ppl_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    ecfg = ctx.cfg.eval
    key = {"model": ctx.model_key, "text": OmegaConf.to_container(ecfg.text, resolve=True),
           "tokens": ecfg.ppl_tokens, "max_length": ecfg.ppl_context, "stride": ecfg.ppl_stride,
           **{k: True for k in ("ppl_drop_last", "ppl_bos") if ecfg[k]}}  # keys of the old cache entries stay

    def compute():
        ids = _ppl_tokens(ctx)
        return {"input_ids": ids}, {"perplexity_dense": perplexity(model, ids, **_ppl_args(ctx))}

    tensors, info, _ = cache.get_or_compute(ctx.cache_dir, "perplexity", key, compute)
    return {"input_ids": tensors["input_ids"], **info}


def _ppl_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    ecfg, ids = ctx.cfg.eval, state["input_ids"]
    windows = ppl_windows(ids.shape[1], int(ecfg.ppl_context), int(ecfg.ppl_stride), bool(ecfg.ppl_drop_last))
    # a window scoring all its tokens leaves out its first one, unless BOS comes before it
    scored = sum(new - (new == end - begin and not ecfg.ppl_bos) for begin, end, new in windows)
    return {"task": ecfg.text.name, "perplexity_dense": state["perplexity_dense"],
            "perplexity": perplexity(model, ids, **_ppl_args(ctx)),
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


# ---------------------------------------------------------------- causal LM: zero-shot classification
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


def _zeroshot_accuracy(model: nn.Module, ctx: Context) -> float:
    texts, labels, verbalizers = zeroshot_split(ctx)
    preds = zeroshot_predictions(model, ctx.tokenizer, texts, ctx.cfg.eval.zeroshot.template, verbalizers, ctx.device)
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def _zeroshot_prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    key = {"model": ctx.model_key, "data": OmegaConf.to_container(ctx.cfg.data, resolve=True),
           "zeroshot": OmegaConf.to_container(ctx.cfg.eval.zeroshot, resolve=True)}
    _, info, _ = cache.get_or_compute(ctx.cache_dir, "zeroshot", key,
                                      lambda: ({}, {"accuracy_dense": _zeroshot_accuracy(model, ctx)}))
    return info


def _zeroshot_evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    return {"task": f"{ctx.cfg.data.name}_zeroshot", "accuracy_dense": state["accuracy_dense"],
            "accuracy": _zeroshot_accuracy(model, ctx)}


TASKS["zeroshot"] = Task("zeroshot", _zeroshot_prepare, _zeroshot_evaluate, kinds=("causal_lm",))


# ---------------------------------------------------------------- lm-evaluation-harness (optional extra)
# the adapter and lrsweep's offline task live in lrsweep/lm_eval.py
TASKS["lm_eval"] = Task("lm_eval", _lm_eval.prepare, _lm_eval.evaluate, kinds=("causal_lm",), requires="lm_eval",
                        config_check=_lm_eval.check)


# ---------------------------------------------------------------- latency and memory
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 wall time (ms) of ``fn`` after ``warmup`` calls, synchronizing CUDA around each."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "p90": float(torch.tensor(times).quantile(0.9))}


def _shapes(lcfg: DictConfig) -> list[tuple[int, int]]:
    """(batch, tokens): the primary shape first, then ``latency.shapes`` (e.g. decode-like 1 token)."""
    out = [(int(lcfg.batch_size), int(lcfg.seq_len))]
    for b, t in lcfg.get("shapes") or []:
        if (int(b), int(t)) not in out:
            out.append((int(b), int(t)))
    return out


@dataclass
class Speed:
    median_ms: float  # of the primary shape (eval.latency.batch_size x seq_len)
    p90_ms: float
    shapes: dict[str, dict[str, float]]  # "b<batch>xt<tokens>" -> {median, p90}
    model_bytes: int  # parameters and buffers in memory


@torch.no_grad()
def speed(model: nn.Module, ctx: Context) -> Speed:
    """Whole-model forward latency at every configured shape, and the model's bytes in memory."""
    lcfg = ctx.cfg.eval.latency
    vocab = getattr(ctx.tokenizer, "vocab_size", 1000)
    gen = torch.Generator().manual_seed(0)
    shapes = {}
    for b, t in _shapes(lcfg):
        ids = torch.randint(0, vocab, (b, t), generator=gen).to(ctx.device)
        shapes[f"b{b}xt{t}"] = timed(lambda: model(input_ids=ids), ctx.device, int(lcfg.warmup), int(lcfg.repeats))
    first = next(iter(shapes.values()))
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return Speed(first["median"], first["p90"], shapes, nbytes)


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- per-layer latency, dense fallback
@torch.no_grad()
def as_dense(module: nn.Module, device: str) -> nn.Linear:
    """The nn.Linear computing the same affine map as ``module`` (W_hat from the identity, bias from 0)."""
    p = next(module.parameters())
    d = module.in_features
    eye = torch.eye(d, device=device, dtype=p.dtype)
    bias = module(torch.zeros(1, d, device=device, dtype=p.dtype))[0]
    W = (module(eye) - bias).T
    has_bias = bias.abs().max() > 0
    return dense_linear(W, bias if has_bias else None, p.dtype)


def check_inference(cfg: DictConfig) -> str:
    """``inference.fallback`` (off | auto); ConfigError for anything else."""
    mode = str((cfg.get("inference") or {}).get("fallback", "off"))
    if mode not in ("off", "auto"):
        raise ConfigError("inference.fallback", f"{mode!r} is unknown", ["off", "auto"])
    return mode


@torch.no_grad()
def layer_fallback(model: nn.Module, names: list[str], ctx: Context) -> dict[str, Any]:
    """Time each compressed layer against its dense equivalent on the primary shape's tokens.

    With ``inference.fallback=auto`` a layer whose dense equivalent is faster is replaced by it
    (same W_hat, so the metrics do not change; its memory becomes n x d). Returns the row extras:
    ``layer_latency`` {name: {factorized_ms, dense_ms}} and ``fallback_layers``.
    """
    from lrsweep.models import set_module

    mode = check_inference(ctx.cfg)
    lcfg = ctx.cfg.eval.latency
    if mode == "off" and not lcfg.get("per_layer", False):
        return {}
    tokens = int(lcfg.batch_size) * int(lcfg.seq_len)
    timings, fell_back = {}, []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) or not hasattr(module, "in_features"):
            continue  # already dense (e.g. a method that stores a dense matrix)
        p = next(module.parameters())
        x = torch.randn(tokens, module.in_features, device=ctx.device, dtype=p.dtype)
        dense = as_dense(module, ctx.device)
        fact = timed(lambda: module(x), ctx.device, int(lcfg.warmup), int(lcfg.repeats))["median"]
        dns = timed(lambda: dense(x), ctx.device, int(lcfg.warmup), int(lcfg.repeats))["median"]
        timings[name] = {"factorized_ms": round(fact, 4), "dense_ms": round(dns, 4)}
        if mode == "auto" and dns < fact:
            set_module(model, name, dense)
            fell_back.append(name)
    out: dict[str, Any] = {"layer_latency": timings, "layer_latency_tokens": tokens}
    if mode == "auto":
        out["fallback_layers"] = fell_back
    return out
