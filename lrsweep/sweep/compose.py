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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict

from lrsweep import identity


def sweep_configs(loader: ConfigLoader, master: DictConfig, points: Sequence[Sequence[str]],
                  with_hydra: bool = True) -> list[Any]:
    """Each point's config as ``loader.load_sweep_config(master, overrides)`` composes it; an exception
    (Hydra's, for that point) in place of a config the point cannot have. ``with_hydra=False``: the
    configs of the points that share a composition come without the ``hydra`` node."""
    return [c if isinstance(c, Exception) else c.cfg for c in sweep_points(loader, master, points, with_hydra)]


def sweep_points(loader: ConfigLoader, master: DictConfig, points: Sequence[Sequence[str]],
                 with_hydra: bool = True, extra: dict[str, Any] | None = None) -> list[Any]:
    """:func:`sweep_configs` as :class:`Composed` points, whose configs are made when first asked for
    (a dry run's never are); ``extra``: keys set in every point's config (added where missing).
    ``with_hydra=False``: without the ``hydra`` node (a dry run: no job runs them; copying that node is
    two thirds of a point's config)."""
    extra = extra or {}
    if not _shareable(master):
        return [_alone(loader, master, ov, extra) for ov in points]
    groups_of, shared, out = _Groups(loader), {}, []
    parsed_all = _parse(points)
    common = _common_values(parsed_all, groups_of)
    for ov, parsed in zip(points, parsed_all, strict=True):
        if isinstance(parsed, Exception):  # Hydra's error for this point, raised by its caller
            out.append(parsed)
            continue
        if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
            out.append(_alone(loader, master, ov, extra))
            continue
        is_value = [_value_override(o, groups_of) for o in parsed]
        values = [o for o, v in zip(parsed, is_value, strict=True) if v and o.input_line not in common]
        groups = tuple(o.input_line for o, v in zip(parsed, is_value, strict=True) if not v or o.input_line in common)
        if groups not in shared:
            shared[groups] = _template(loader, master, list(groups), with_hydra, extra)
        template = shared[groups]
        point = None if isinstance(template, Exception) else template.point(master, parsed, values)
        out.append(point if point is not None else _alone(loader, master, ov, extra))
    return out


def _parse(points: Sequence[Sequence[str]]) -> list[list[Override] | Exception]:
    """Each point's overrides parsed by Hydra's parser, each distinct override once; Hydra's exception
    for a point with one it cannot parse."""
    parser, seen, out = OverridesParser.create(), {}, []
    for ov in points:
        try:
            for line in ov:
                if line not in seen:
                    seen[line] = parser.parse_overrides(overrides=[line])[0]
            out.append([seen[line] for line in ov])
        except Exception as e:
            out.append(e)
    return out


def _common_values(parsed_all: list[list[Override] | Exception], groups_of: _Groups) -> set[str]:
    """The value overrides every point has (a sweep's fixed ``results_dir=...``), each the only
    override of its key in each point: composed into the shared configs, as Hydra would apply them."""
    lists = [p for p in parsed_all if not isinstance(p, Exception)]
    if not lists:
        return set()
    common = set.intersection(*({o.input_line for o in p if _value_override(o, groups_of)} for p in lists))
    for p in lists:
        keys = [o.key_or_group for o in p]
        common -= {o.input_line for o in p if keys.count(o.key_or_group) > 1}
    return common


class Composed:
    """A point's config: ``resolved`` (lrsweep.identity.resolved: plain, interpolations resolved, without
    Hydra's node) at once; the DictConfig (``cfg``) made from its template when first asked for."""

    def __init__(self, resolved: dict[str, Any], cfg: DictConfig | None = None, make: Any = None,
                 template: Template | None = None, values: Sequence[Override] = ()):
        self.resolved, self._cfg, self._make, self._template, self._values = resolved, cfg, make, template, values

    @property
    def cfg(self) -> DictConfig:
        if self._cfg is None:
            self._cfg, self._make, self._template = self._make(), None, None
        return self._cfg

    @contextmanager
    def applied(self) -> Iterator[DictConfig]:
        """The point's config to read while the block runs: made in place in its template's config and
        put back after (:meth:`Template.applied`) if it was not made yet, so no copy is made."""
        if self._template is None:
            yield self.cfg
        else:
            with self._template.applied(self._values) as cfg:
                yield cfg

    def __getstate__(self) -> dict[str, Any]:  # pickled with its config, not its template
        return {"resolved": self.resolved, "_cfg": self.cfg, "_make": None, "_template": None, "_values": ()}


class Template:
    """One composition, shared by the points that differ from it only in value overrides. A point's
    resolved config is the template's with the overridden values set, where that is exactly what
    composing it would give (:meth:`resolve`); its DictConfig is a copy of the template's with the
    overrides applied (:func:`apply`), made when asked for."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        try:
            self.base: dict[str, Any] | None = identity.resolved(cfg)
        except Exception:  # an interpolation that does not resolve here: each point is composed
            self.base = None
        self.raw = OmegaConf.to_container(cfg, resolve=False)  # the values as written: interpolations as text
        self.interpolations, self.leaves = _raw_leaves(cfg, self.raw)

    def point(self, master: DictConfig, parsed: list[Override], values: list[Override]) -> Composed | None:
        """The point of these overrides; None where Hydra would refuse one of them."""
        resolved = self.resolve(values)
        if resolved is not None:
            return Composed(resolved, make=lambda: _with_values(self.cfg, master, parsed, values), template=self,
                            values=values)
        cfg = _with_values(self.cfg, master, parsed, values)
        return None if cfg is None else Composed(identity.resolved(cfg), cfg)

    def resolve(self, values: list[Override]) -> dict[str, Any] | None:
        """The point's resolved config without composing it: the template's with each overridden value
        set. None where that might differ from composing it: an override that adds, deletes or merges
        (a dict value), one of a key the template lacks or types, an interpolation as a value, or an
        interpolation of the template that names an overridden key (its value would change)."""
        if self.base is None:
            return None
        out = dict(self.base)
        copied: set[str] = set()
        for o in values:
            key, value = o.key_or_group, o.value()
            if o.is_delete() or o.is_add() or o.package is not None or not _plain_value(value) \
                    or key.startswith("hydra.") or key not in self.leaves:
                return None
            parts = key.split(".")
            if any(part in raw for raw in self.interpolations for part in parts):
                return None
            node = out
            for i, part in enumerate(parts[:-1]):  # copy the dicts on the way (the template's stay as they are)
                path = ".".join(parts[:i + 1])
                if path not in copied:
                    node[part] = dict(node[part])
                    copied.add(path)
                node = node[part]
            node[parts[-1]] = copy.deepcopy(value)
        return out

    @contextmanager
    def applied(self, values: list[Override]) -> Iterator[DictConfig]:
        """The template's config with the overrides of a point that :meth:`resolve` resolves set in
        place, then put back: the point's config without a copy."""
        raws = [(o.key_or_group, _select(self.raw, o.key_or_group)) for o in values]
        try:
            apply(values, self.cfg)
            yield self.cfg
        finally:
            for key, raw in reversed(raws):
                OmegaConf.update(self.cfg, key, raw, merge=False)


def _template(loader: ConfigLoader, master: DictConfig, groups: list[str], with_hydra: bool,
              extra: dict[str, Any]) -> Template | Exception:
    full = _compose(loader, master, groups, extra)
    if isinstance(full, Exception):
        return full
    if not with_hydra:
        cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
        OmegaConf.set_struct(cfg, OmegaConf.is_struct(full))
        full = cfg
    return Template(full)


def _raw_leaves(cfg: DictConfig, raw: dict[str, Any]) -> tuple[list[str], set[str]]:
    """The raw text (``raw``: ``cfg`` as written) of every interpolation outside Hydra's node, and the
    dotted keys of the leaf values of its plain (not structured: untyped) dicts, lists included (an
    override replaces a list)."""
    interpolations, leaves = [], set()

    def walk(node: DictConfig, raw: dict[str, Any], prefix: str) -> None:
        plain = OmegaConf.get_type(node) is dict
        for key in node:
            if not prefix and key == "hydra":
                continue
            if OmegaConf.is_interpolation(node, key):
                interpolations.append(str(raw[key]))
                if plain:
                    leaves.add(f"{prefix}{key}")
            elif not OmegaConf.is_missing(node, key) and OmegaConf.is_dict(child := node[key]):
                walk(child, raw[key], f"{prefix}{key}.")
            elif plain:
                leaves.add(f"{prefix}{key}")

    walk(cfg, raw, "")
    return interpolations, leaves


def _select(raw: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a plain dict."""
    for part in key.split("."):
        raw = raw[part]
    return raw


def _plain_value(value: Any) -> bool:
    """A value that a point's resolved config holds as given: not a dict (merged), nor an interpolation."""
    if isinstance(value, str):
        return "${" not in value
    if isinstance(value, list | tuple):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, bool | int | float)


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


def _compose(loader: ConfigLoader, master: DictConfig, overrides: Sequence[str], extra: dict[str, Any]) -> Any:
    """Hydra's composition of these overrides, with the ``extra`` keys set; Hydra's exception if it fails."""
    try:
        cfg = loader.load_sweep_config(master, list(overrides))
    except Exception as e:
        return e
    with open_dict(cfg):
        for key, value in extra.items():
            cfg[key] = value
    return cfg


def _alone(loader: ConfigLoader, master: DictConfig, overrides: Sequence[str], extra: dict[str, Any]) -> Any:
    """A point Hydra composes by itself (:class:`Composed`), or Hydra's exception."""
    cfg = _compose(loader, master, overrides, extra)
    return cfg if isinstance(cfg, Exception) else Composed(identity.resolved(cfg), cfg)


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
    except Exception:  # an override Hydra would refuse: Hydra composes the point and says why
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
