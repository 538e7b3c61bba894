"""``eval=lm_eval``: lm-evaluation-harness on the in-memory model, and lrsweep's offline task.

The harness scores the model object itself (``HFLM(pretrained=model, tokenizer=tok)``): the
compressed model is never saved and reloaded. Task names are lm-eval's (``arc_easy``, ``piqa``,
``hellaswag``, ``winogrande``, ... — their data comes from the hub, so they need network) plus
one task lrsweep writes itself from bundled data, ``lrsweep_<data.name>`` (``lrsweep_rotten_tomatoes``
by default): the items, prompt and verbalizers of ``eval.task=zeroshot`` (the ``data`` config's
test part, ``eval.zeroshot.n`` texts, ``eval.zeroshot.template``/``verbalizers``) as a
multiple-choice task in lm-eval's YAML format over a local JSON-lines file. Both files are
rendered into ``<cache_dir>/lm_eval_tasks/<hash of their content>/``, so the same config gives
the same files, and the folder can be passed to ``lm-eval --include_path`` as it is.

Row fields: ``task_metrics`` / ``task_metrics_dense`` = {task: {acc, acc_stderr, acc_norm, ...,
n}} (lm-eval's metric names without the ``,none`` filter suffix; ``n`` = items scored);
``accuracy`` / ``accuracy_dense`` = ``eval.lm_eval.metric`` of the first task.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from lrsweep import cache
from lrsweep.errors import ConfigError, did_you_mean
from lrsweep.evaluate.tasks import TASKS, Task
from lrsweep.evaluate.zeroshot import zeroshot_split

if TYPE_CHECKING:
    from torch import nn

    from lrsweep.context import Context

LOCAL_PREFIX = "lrsweep_"


def local_task_name(cfg: DictConfig) -> str:
    """The name of the task lrsweep renders from its own data config (``lrsweep_rotten_tomatoes``)."""
    return f"{LOCAL_PREFIX}{cfg.data.name}"


def _tasks(cfg: DictConfig) -> list[str]:
    tasks = cfg.eval.lm_eval.tasks
    tasks = list(tasks) if OmegaConf.is_list(tasks) else [tasks]
    return [str(t) for t in tasks]


# ---------------------------------------------------------------- the offline task
def task_yaml(name: str, data_file: str, template: str, verbalizers: list[str]) -> dict[str, Any]:
    """An lm-eval multiple-choice task: context = ``template`` with the doc's text, choices = the
    verbalizers verbatim (``target_delimiter: ""``: the continuation is exactly the verbalizer, as
    in :func:`lrsweep.evaluate.zeroshot.zeroshot_predictions`), target = the label index."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": template.format(text="{{text}}"),  # python format -> jinja
        "doc_to_target": "label",
        "doc_to_choice": list(verbalizers),
        "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }


def render_local_task(ctx: Context) -> Path:
    """Write the offline task (yaml + test.jsonl) under the cache dir; return its folder."""
    import yaml

    texts, labels, verbalizers = zeroshot_split(ctx)
    docs = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels, strict=True))
    name, template = local_task_name(ctx.cfg), str(ctx.cfg.eval.zeroshot.template)
    digest = cache.digest([name, template, verbalizers, docs])
    data_file = Path(ctx.cache_dir) / "lm_eval_tasks" / digest / "test.jsonl"  # where the folder ends up

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "test.jsonl").write_text(docs)
        spec = task_yaml(name, str(data_file), template, verbalizers)
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))

    return cache.folder(ctx.cache_dir, "lm_eval_tasks", digest, build)  # verified on every read


# ---------------------------------------------------------------- running the harness
def _include_paths(cfg: DictConfig, local: Path | None) -> list[str]:
    user = cfg.eval.lm_eval.get("include_path")
    user = [] if not user else [str(p) for p in (user if OmegaConf.is_list(user) else [user])]
    return ([str(local)] if local else []) + user


def task_manager(include: tuple[str, ...], tasks: tuple[str, ...]):
    """lm-eval's TaskManager over ``include``; lm-eval's own ~15k task yamls are indexed (~10 s)
    only when a task is not found in ``include``."""
    from lm_eval.tasks import TaskManager

    if include:
        manager = TaskManager(include_path=list(include), include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    return _default_manager(include)


@lru_cache(maxsize=4)
def _default_manager(include: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


def _tree_stamp(roots: list[str]) -> list[list]:
    """Per root: its task files' count and newest mtime (a file added, removed or edited changes it)."""
    out = []
    for root in roots:
        n, newest = 0, 0.0
        for folder, _, files in os.walk(root):
            for f in files:
                if f.endswith((".yaml", ".yml", ".py")):
                    n, newest = n + 1, max(newest, os.stat(os.path.join(folder, f)).st_mtime)
        out.append([root, n, newest])
    return out


@lru_cache(maxsize=1)
def _installed_stamp() -> list:
    """lm-eval's version and the stamp of its own task tree: installed files, taken once a process
    (a sweep's planner validates every point)."""
    from importlib.metadata import version
    from importlib.util import find_spec

    spec = find_spec("lm_eval.tasks")
    return [version("lm_eval"), _tree_stamp(list(spec.submodule_search_locations or []) if spec else [])]


def known_tasks(include: tuple[str, ...], tasks: tuple[str, ...], cache_dir: str) -> set[str]:
    """The task names :func:`task_manager` knows, for validation. The index of lm-eval's own ~15k
    task yamls takes ~10 s to build, so the names are kept on disk (``<cache_dir>/lm_eval_index``)
    under lm-eval's version and a stamp of its task tree and ``include``'s: a sweep's planner and
    its jobs read them instead of indexing again (a job that scores a hub task still builds the
    index, to run it)."""
    if not cache_dir:
        return set(task_manager(include, tasks).all_tasks)
    key = {"version": 1, "lm_eval": _installed_stamp(), "include": include,
           "tasks": sorted(tasks) if include else None,  # include-only when it holds them
           "stamp": _tree_stamp(list(include))}
    return set(cache.json_value(cache_dir, "lm_eval_index", key,
                                lambda: sorted(task_manager(include, tasks).all_tasks)))


def harness(model: nn.Module, ctx: Context, local: Path | None, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` output for ``eval.lm_eval.tasks`` on the in-memory model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    e = ctx.cfg.eval.lm_eval
    tasks = _tasks(ctx.cfg)
    lm = HFLM(pretrained=model, tokenizer=ctx.tokenizer, batch_size=int(e.batch_size))  # on the model's device
    manager = task_manager(tuple(_include_paths(ctx.cfg, local)), tuple(tasks))
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=e.get("num_fewshot"), limit=e.get("limit"),
                           task_manager=manager, random_seed=int(ctx.cfg.seed), log_samples=log_samples,
                           bootstrap_iters=int(e.get("bootstrap_iters", 1000)))


def metrics(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}}: lm-eval's numeric results, ``,none`` dropped; ``n`` = items scored
    (lm-eval's ``sample_len``)."""
    return {task: {("n" if k == "sample_len" else k.removesuffix(",none")): float(v) for k, v in res.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
            for task, res in out["results"].items()}


def _local(ctx: Context) -> Path | None:
    return render_local_task(ctx) if local_task_name(ctx.cfg) in _tasks(ctx.cfg) else None


def prepare(model: nn.Module, ctx: Context) -> dict[str, Any]:
    """Dense metrics, cached by the model, the lm_eval config and the offline task's content."""
    local = _local(ctx)
    key = {"model": ctx.model_key, "lm_eval": OmegaConf.to_container(ctx.cfg.eval.lm_eval, resolve=True),
           "local_task": local.name if local else None}
    _, info, _ = cache.get_or_compute(ctx.cache_dir, "lm_eval", key,
                                      lambda: ({}, {"metrics": metrics(harness(model, ctx, local))}))
    return {"dense": info["metrics"], "local": local}


def primary(table: dict[str, dict[str, float]], cfg: DictConfig) -> float:
    """``eval.lm_eval.metric`` of the first task; a ValueError naming the metrics there when absent."""
    first, metric = _tasks(cfg)[0], str(cfg.eval.lm_eval.metric).removesuffix(",none")
    if metric not in table.get(first, {}):
        raise ValueError(f"eval.lm_eval.metric: {metric!r} is not a result of task {first!r} "
                         f"(it has {sorted(table.get(first, {}))})")
    return table[first][metric]


def primary_stderr(table: dict[str, dict[str, float]], cfg: DictConfig) -> float | None:
    """The harness's standard error of :func:`primary` (None when it gave none)."""
    metric = str(cfg.eval.lm_eval.metric).removesuffix(",none")
    return table.get(_tasks(cfg)[0], {}).get(f"{metric}_stderr")


def evaluate(model: nn.Module, ctx: Context, state: dict[str, Any]) -> dict[str, Any]:
    compressed = metrics(harness(model, ctx, state["local"]))
    out = {"task": f"lm_eval:{_tasks(ctx.cfg)[0]}", "accuracy_dense": primary(state["dense"], ctx.cfg),
           "accuracy": primary(compressed, ctx.cfg), "task_metrics_dense": state["dense"],
           "task_metrics": compressed, "accuracy_dense_stderr": primary_stderr(state["dense"], ctx.cfg),
           "accuracy_stderr": primary_stderr(compressed, ctx.cfg)}
    if state["local"]:
        out["extra"] = {"lm_eval_task_dir": str(state["local"])}
    return out


# ---------------------------------------------------------------- validation (before launch)
def check(cfg: DictConfig) -> None:
    """ConfigError for an empty task list or a task lm-eval does not know (exit 2 before launch)."""
    tasks = _tasks(cfg)
    if not tasks:
        raise ConfigError("eval.lm_eval.tasks", "is empty", [local_task_name(cfg), "arc_easy", "piqa", "..."])
    local = local_task_name(cfg)
    others = tuple(t for t in tasks if t != local)
    if not others:
        return
    cache_dir = str(cfg.get("cache_dir") or "")
    known = known_tasks(tuple(_include_paths(cfg, None)), others, os.path.abspath(cache_dir) if cache_dir else "")
    for t in others:
        if t not in known:
            raise ConfigError("eval.lm_eval.tasks", f"{t!r} is not an lm-eval task{did_you_mean(t, [local, *known])}",
                              [local, f"the {len(known)} tasks of `lm-eval ls tasks`"])


TASKS["lm_eval"] = Task("lm_eval", prepare, evaluate, kinds=("causal_lm",), requires="lm_eval", config_check=check)
