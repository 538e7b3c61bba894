"""Seeds: one integer per run, more of them for a randomized method in a sweep, and a note when a
sweep gives a randomized method a single seed.

A randomized method (registered with ``randomized=``: lplr, rsvd, asvd with ``solver=lowrank``)
draws its projections from ``seed``; one seed is one sample of its quality. A sweep runs each of
its points at ``seeds`` seeds (``seed``, ``seed + 1``, ...; :func:`more`) unless the grid sets
``seed`` itself; a sweep that still runs it with one seed says so in its plan, with the override
that adds seeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrsweep.compress import method_options, method_spec
from lrsweep.errors import ConfigError


def check(cfg: DictConfig) -> None:
    """ConfigError unless ``seed`` is one integer (a list is a sweep: ``-m seed=0,1``)."""
    check_value(cfg.get("seed"))


def check_value(seed: Any) -> None:
    """:func:`check` of the value of ``seed``."""
    if OmegaConf.is_list(seed) or isinstance(seed, list | tuple):
        values = ",".join(str(s) for s in seed) or "0,1,2"
        raise ConfigError("seed", f"{list(seed)} is a list; one run takes one integer, a sweep over seeds is "
                          f"`python -m lrsweep -m seed={values}`", ["an integer"])
    if not _integer(seed):
        raise ConfigError("seed", f"{seed!r} is not an integer", ["an integer, e.g. 0", "-m seed=0,1,2"])


def single_seed_note(cfgs: Iterable[Mapping[str, Any]]) -> str | None:
    """One line naming the randomized methods that the grid runs with a single seed (None: none does);
    ``cfgs``: the points' configs, or their resolved dicts (lrsweep.identity.resolved)."""
    seeds: dict[str, set[int]] = {}
    for cfg in cfgs:
        if name := randomized(cfg["method"]):
            seeds.setdefault(name, set()).add(int(cfg["seed"]))
    single = sorted(m for m, s in seeds.items() if len(s) == 1)
    if not single:
        return None
    s = min(min(seeds[m]) for m in single)
    return (f"[lrsweep] randomized method{'s' * (len(single) > 1)} {', '.join(single)} with one seed: each point "
            f"is one sample of a random draw, not a trend; add seeds with seed={s},{s + 1},{s + 2}")


def more(resolved: Mapping[str, Any], overrides: Iterable[str]) -> list[int]:
    """The seeds a sweep adds to a point (``resolved``: its resolved config): ``seed + 1`` ..
    ``seed + seeds - 1`` when its method is randomized and its overrides do not set ``seed``; none
    for a deterministic method, or a config the planner's validation will refuse."""
    n, seed = resolved.get("seeds", 1), resolved.get("seed")
    if not _integer(n) or n <= 1 or not _integer(seed):
        return []
    if any(o.split("=", 1)[0].lstrip("+~") == "seed" for o in overrides):
        return []
    try:
        name = randomized(resolved["method"])
    except (ConfigError, TypeError):
        return []
    return [seed + k for k in range(1, n)] if name else []


def randomized(method: Any) -> str | None:
    """The name of a method config's method when its factors depend on ``seed`` (None: deterministic)."""
    spec = method_spec(method)
    return spec.name if spec.is_randomized(**method_options(method)) else None


def check_count(n: Any) -> None:
    """ConfigError unless ``seeds`` is a positive integer."""
    if not _integer(n) or n < 1:
        raise ConfigError("seeds", f"{n!r} is not a positive integer: how many seeds a sweep gives each point of a "
                          "randomized method", ["1", "3"])


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
