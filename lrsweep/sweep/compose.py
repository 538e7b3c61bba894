"""Compose a sweep's points: one Hydra composition per choice of config groups.

Hydra's ``load_sweep_config`` composes every point from scratch (read each yaml of the defaults
list, merge, apply the overrides). A ``rank=range(1,33)`` grid's points differ only in a value,
and Hydra itself applies value overrides last, to the config its defaults list composed.
:func:`sweep_configs` does the same with the composition shared: the points are grouped by
everything that can change the defaults list (config group choices and every ``hydra.*``
override), Hydra composes one config per group (``ConfigLoader.load_sweep_config``), and each
point gets a copy with its own value overrides applied as Hydra applies them (:func:`apply`) and its
``hydra.overrides.task`` and ``hydra.job.override_dirname`` as Hydra writes them.
tests/test_compose.py checks the result equals Hydra's own composition, key for key.

Only Hydra's public API is used (the config loader interface, the override parser). A point that
does not fit (a ``hydra.searchpath`` anywhere, a value override that cannot be applied) is
composed by Hydra alone, so its errors are Hydra's.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict


def sweep_configs(loader: ConfigLoader, master: DictConfig, points: Sequence[Sequence[str]],
                  with_hydra: bool = True) -> list[Any]:
    """Each point's config as ``loader.load_sweep_config(master, overrides)`` composes it; an exception
    (Hydra's, for that point) in place of a config the point cannot have. ``with_hydra=False``: the
    configs of the points that share a composition come without the ``hydra`` node (a dry run: no job
    runs them; copying that node is two thirds of a point's planning time and memory)."""
    if not _shareable(master):
        return [_alone(loader, master, ov) for ov in points]
    parser, groups_of, shared, out = OverridesParser.create(), _Groups(loader), {}, []
    for ov in points:
        try:
            parsed = parser.parse_overrides(overrides=list(ov))
        except Exception as e:  # noqa: BLE001  (Hydra's error for this point, raised by its caller)
            out.append(e)
            continue
        if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
            out.append(_alone(loader, master, ov))
            continue
        is_value = [_value_override(o, groups_of) for o in parsed]
        values = [o for o, v in zip(parsed, is_value) if v]
        groups = tuple(o.input_line for o, v in zip(parsed, is_value) if not v)
        if groups not in shared:
            shared[groups] = _alone(loader, master, list(groups))
            if not with_hydra and not isinstance(shared[groups], Exception):
                full = shared[groups]
                shared[groups] = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
                OmegaConf.set_struct(shared[groups], OmegaConf.is_struct(full))
        template = shared[groups]
        cfg = None if isinstance(template, Exception) else _with_values(template, master, parsed, values)
        out.append(cfg if cfg is not None else _alone(loader, master, ov))
    return out


class _Groups:
    """Which keys are config groups (``model``, ``hydra/launcher``), asked of the loader once per parent."""

    def __init__(self, loader: ConfigLoader):
        self.loader, self.known = loader, {}

    def __contains__(self, key: str) -> bool:
        parent, _, name = key.rpartition("/")
        if parent not in self.known:
            self.known[parent] = set(self.loader.list_groups(parent))
        return name in self.known[parent]


def _value_override(o: Override, groups: _Groups) -> bool:
    """Hydra's rule: not a config group choice, and not under ``hydra``, whose node decides how
    everything else is composed and named."""
    return not o.is_hydra_override() and (isinstance(o.value(), dict) or o.key_or_group not in groups)


def _shareable(master: DictConfig) -> bool:
    searchpath = OmegaConf.select(master, "hydra.searchpath")
    task = OmegaConf.to_container(master.hydra.overrides.hydra, resolve=False)  # values may hold ${hydra.job.num}
    return not searchpath and not any(str(o).startswith("hydra.searchpath") for o in task)


def _alone(loader: ConfigLoader, master: DictConfig, overrides: Sequence[str]) -> Any:
    try:
        return loader.load_sweep_config(master, list(overrides))
    except Exception as e:  # noqa: BLE001
        return e


def apply(overrides: list[Override], cfg: DictConfig) -> None:
    """Apply value overrides to ``cfg`` as Hydra does after composing: ``key=v`` sets an existing key,
    ``+key=v`` adds a new one, ``++key=v`` sets or adds, ``~key`` (``~key=v``: only at that value) deletes.
    Raises on anything Hydra would refuse (the caller then lets Hydra compose the point and say why)."""
    for o in overrides:
        if o.package is not None:
            raise ValueError(f"{o.input_line} looks like a config group override")
        key, value = o.key_or_group, o.value()
        current = OmegaConf.select(cfg, key, throw_on_missing=False)
        if o.is_delete():
            if current is None or (value is not None and value != current):
                raise ValueError(f"cannot delete {key}")
            parent, _, leaf = key.rpartition(".")
            with open_dict(cfg):
                del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
        elif o.is_add():
            if current is not None and not isinstance(value, (dict, list)):
                raise ValueError(f"{key} exists: cannot append it")
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        else:
            OmegaConf.update(cfg, key, value, merge=True, force_add=o.is_force_add())


def _with_values(template: DictConfig, master: DictConfig, parsed: list[Override],
                 values: list[Override]) -> DictConfig | None:
    """The template with the point's value overrides, its task overrides and output dir name as
    Hydra writes them; None where Hydra would refuse one of the overrides."""
    cfg = copy.deepcopy(template)
    try:
        apply(values, cfg)
    except Exception:  # noqa: BLE001
        return None
    if "hydra" not in template:  # composed for a dry run
        return cfg
    app = [o for o in parsed if not o.is_hydra_override()]
    naming = cfg.hydra.job.config.override_dirname
    with open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [o.input_line for o in app]
        cfg.hydra.job.override_dirname = override_dirname(app, list(naming.exclude_keys), naming.item_sep,
                                                          naming.kv_sep)
    OmegaConf.copy_cache(from_config=master, to_config=cfg)
    return cfg


def override_dirname(overrides: list[Override], exclude_keys: list[str], item_sep: str, kv_sep: str) -> str:
    """``hydra.job.override_dirname``: the overrides not excluded, sorted, joined, ``=`` as ``kv_sep``."""
    lines = sorted(o.input_line for o in overrides if o.key_or_group not in exclude_keys)
    return re.sub("=", kv_sep, item_sep.join(lines))
