"""Task metrics and latency, dense vs compressed, measured in the same job (``conf/eval``).

A task is registered in ``TASKS`` by name (:mod:`lrsweep.evaluate.tasks`); ``eval.task=auto`` picks
``DEFAULT_TASK[model.kind]``. Each task has ``prepare`` (dense-model work, cached on disk by
everything it depends on) and ``evaluate`` (the compressed model), and returns row fields. One
module per task, each registering itself:
  probe       encoders: a linear probe on sentence embeddings (:mod:`lrsweep.evaluate.probe`) and, with
              ``eval.retrieval``, title -> article retrieval (:mod:`lrsweep.evaluate.retrieval`); both embed
              through :mod:`lrsweep.evaluate.embeddings`;
  perplexity  causal LMs: sliding-window perplexity (:mod:`lrsweep.evaluate.ppl`);
  zeroshot    causal LMs: zero-shot classification by verbalizer likelihood (:mod:`lrsweep.evaluate.zeroshot`);
  lm_eval     causal LMs: lm-evaluation-harness (optional extra: :mod:`lrsweep.evaluate.lm_eval`).
Latency, memory, the per-layer dense fallback and the timing lock: :mod:`lrsweep.evaluate.latency`.
"""

from __future__ import annotations

from lrsweep.context import Context
from lrsweep.evaluate import embeddings, lm_eval, ppl, probe, retrieval, zeroshot
from lrsweep.evaluate.embeddings import embed
from lrsweep.evaluate.latency import (Speed, as_dense, check_inference, layer_fallback, peak_memory_mb,
                                      reset_peak, speed, timed, times_layers, timing_lock)
from lrsweep.evaluate.ppl import perplexity, ppl_windows
from lrsweep.evaluate.tasks import DEFAULT_TASK, TASKS, Task, task_for
from lrsweep.evaluate.zeroshot import continuation_logprob, zeroshot_predictions, zeroshot_split

__all__ = ["DEFAULT_TASK", "TASKS", "Context", "Speed", "Task", "as_dense", "check_inference", "continuation_logprob",
           "embed", "embeddings", "layer_fallback", "lm_eval", "peak_memory_mb", "perplexity", "ppl", "ppl_windows",
           "probe", "reset_peak", "retrieval", "speed", "task_for", "timed", "times_layers", "timing_lock", "zeroshot",
           "zeroshot_predictions", "zeroshot_split"]
