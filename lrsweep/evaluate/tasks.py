"""The task registry: each task module registers a :class:`Task` in ``TASKS`` under its name."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig
from torch import nn

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
