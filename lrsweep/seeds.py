"""Seeds: one integer per run, and a note when a sweep gives a randomized method a single seed.

A randomized method (registered with ``randomized=``: lplr, rsvd, asvd with ``solver=lowrank``)
draws its projections from ``seed``; one seed is one sample of its quality, so a sweep that runs
it with one seed says so in its plan, with the override that adds seeds.
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
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("seed", f"{seed!r} is not an integer", ["an integer, e.g. 0", "-m seed=0,1,2"])


def single_seed_note(cfgs: Iterable[Mapping[str, Any]]) -> str | None:
    """One line naming the randomized methods that the grid runs with a single seed (None: none does);
    ``cfgs``: the points' configs, or their resolved dicts (lrsweep.identity.resolved)."""
    seeds: dict[str, set[int]] = {}
    for cfg in cfgs:
        spec = method_spec(cfg["method"])
        if spec.is_randomized(**method_options(cfg["method"])):
            seeds.setdefault(spec.name, set()).add(int(cfg["seed"]))
    single = sorted(m for m, s in seeds.items() if len(s) == 1)
    if not single:
        return None
    s = min(min(seeds[m]) for m in single)
    return (f"[lrsweep] randomized method{'s' * (len(single) > 1)} {', '.join(single)} with one seed: each point "
            f"is one sample of a random draw, not a trend; add seeds with seed={s},{s + 1},{s + 2}")
