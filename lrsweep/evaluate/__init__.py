"""Task metrics and latency, dense vs compressed, measured in the same job (``conf/eval``).

A task is registered in ``TASKS`` by name; ``eval.task=auto`` picks ``DEFAULT_TASK[model.kind]``.
Each task has ``prepare`` (dense-model work, cached on disk by everything it depends on) and
``evaluate`` (the compressed model), and returns row fields. One module per task:
  probe       encoders: a linear probe on sentence embeddings (:mod:`lrsweep.evaluate.probe`);
  perplexity  causal LMs: sliding-window perplexity (:mod:`lrsweep.evaluate.ppl`);
  zeroshot    causal LMs: zero-shot classification by verbalizer likelihood (:mod:`lrsweep.evaluate.zeroshot`);
  lm_eval     causal LMs: lm-evaluation-harness (optional extra; the adapter: :mod:`lrsweep.lm_eval`).
Latency, memory and the per-layer dense fallback: :mod:`lrsweep.evaluate.latency`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig
from torch import nn

from lrsweep import lm_eval as _lm_eval
from lrsweep.context import Context
from lrsweep.errors import ConfigError


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


# ---------------------------------------------------------------- the tasks (each registers itself)
from lrsweep.evaluate import probe, ppl, zeroshot  # noqa: E402  (they import Task and TASKS above)

TASKS["lm_eval"] = Task("lm_eval", _lm_eval.prepare, _lm_eval.evaluate, kinds=("causal_lm",), requires="lm_eval",
                        config_check=_lm_eval.check)

# ---------------------------------------------------------------- names other modules use from here
from lrsweep.evaluate.latency import (Speed, as_dense, check_inference, layer_fallback,  # noqa: E402
                                      peak_memory_mb, reset_peak, speed, timed, times_layers, timing_lock)
from lrsweep.evaluate.ppl import perplexity, ppl_windows  # noqa: E402
from lrsweep.evaluate.probe import embed  # noqa: E402
from lrsweep.evaluate.zeroshot import continuation_logprob, zeroshot_predictions, zeroshot_split  # noqa: E402

__all__ = ["Context", "DEFAULT_TASK", "Speed", "TASKS", "Task", "as_dense", "check_inference", "continuation_logprob",
           "embed", "layer_fallback", "peak_memory_mb", "perplexity", "ppl", "ppl_windows", "probe", "reset_peak", "speed",
           "task_for", "timed", "times_layers", "timing_lock", "zeroshot", "zeroshot_predictions", "zeroshot_split"]
