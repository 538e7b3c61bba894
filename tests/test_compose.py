"""lrsweep.sweep.compose.sweep_configs: a sweep's points composed once per config group choice, equal to
what Hydra composes for each point alone (tests/test_sweep.py runs the planning end to end)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lrsweep.sweep.compose import sweep_configs
from conftest import CONF


@pytest.fixture
def hydra_loader():
    """(Hydra's config loader, the master config of a multirun with one hydra override)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        master = compose("config", overrides=["hydra/launcher=local", "hydra.launcher.parallelism=3"],
                         return_hydra_config=True)
        # resolved as Hydra's multirun resolves it before launching: ${now:} is then in the master's cache
        # and every point's config, ours and Hydra's, gets that time (else each reads its own second)
        str(master.hydra.sweep.dir)
        yield GlobalHydra.instance().config_loader(), master
    GlobalHydra.instance().clear()


GRID = [["method=svd", "rank=8", "sweep_name=s"],
        ["method=svd", "rank=16", "eval.latency.seq_len=8", "sweep_name=s"],
        ["rank=32", "method=lplr", "+calib=wikitext2", "eval.latency.shapes=[[1,8]]"],
        ["method=lplr", "rank=4", "+calib=wikitext2", "+extra.note=hi"],
        ["method=svdllm", "param_ratio=0.6", "model.targets=encoder\\.layer\\.0\\..*", "~rank"],
        ["method=svdllm", "param_ratio=0.4", "hydra.job.chdir=false"],
        ["method=svd", "rank=8", "hydra.job.config.override_dirname.kv_sep=:"],
        ["method=svd", "rank={a: 1}"],  # a dict value: a value override
        ["method=svd", "no_such_key=1"],  # Hydra refuses: not in the struct config
        ["method=nope", "rank=8"]]  # Hydra refuses: no such option


@pytest.mark.parametrize("with_hydra", [True, False], ids=["sweep", "dry run"])
def test_every_point_equals_hydras_own_composition(hydra_loader, with_hydra):
    """A dry run's points (with_hydra=False: listed, never run) are Hydra's less the ``hydra`` node."""
    loader, master = hydra_loader
    fast = sweep_configs(loader, master, GRID, with_hydra=with_hydra)
    for ov, got in zip(GRID, fast, strict=True):
        try:
            want = loader.load_sweep_config(master, ov)
        except Exception as e:
            assert isinstance(got, type(e)) and str(got) == str(e), ov
            continue
        if not with_hydra:
            assert "hydra" not in got
            want = OmegaConf.masked_copy(want, [k for k in want if k != "hydra"])
        assert OmegaConf.to_container(got, resolve=False) == OmegaConf.to_container(want, resolve=False), ov
        assert OmegaConf.is_struct(got) and OmegaConf.to_yaml(got) == OmegaConf.to_yaml(want), ov
        if with_hydra:
            assert str(got.hydra.sweep.dir) == str(want.hydra.sweep.dir)  # resolved from the master's cache
    assert [i for i, c in enumerate(fast) if isinstance(c, Exception)] == [8, 9]


def test_points_that_differ_in_values_share_one_composition(hydra_loader, monkeypatch):
    loader, master = hydra_loader
    calls = []
    real = type(loader).load_sweep_config
    monkeypatch.setattr(type(loader), "load_sweep_config", lambda self, m, ov: calls.append(ov) or real(self, m, ov))
    cfgs = sweep_configs(loader, master, [["method=svd", f"rank={r}"] for r in range(1, 9)]
                         + [["method=lplr", "rank=4"], ["method=lplr", "rank=8", "hydra.job.chdir=false"]])
    assert calls == [["method=svd"], ["method=lplr"], ["method=lplr", "hydra.job.chdir=false"]]
    assert [c.rank for c in cfgs] == [*range(1, 9), 4, 8]
    cfgs[0].rank = 99  # each point its own copy
    assert cfgs[1].rank == 2


def test_a_searchpath_sends_every_point_through_hydra(hydra_loader, monkeypatch, tmp_path):
    loader, master = hydra_loader
    calls = []
    real = type(loader).load_sweep_config
    monkeypatch.setattr(type(loader), "load_sweep_config", lambda self, m, ov: calls.append(ov) or real(self, m, ov))
    grid = [["rank=4", f"hydra.searchpath=[file://{tmp_path}]"], ["rank=8"]]
    cfgs = sweep_configs(loader, master, grid)
    assert calls == [grid[0], []]  # the first alone; the second from the composition of no group choice
    assert [c.rank for c in cfgs] == [4, 8]


# The grid of value overrides a point's resolved config is computed for without composing it (or, where
# that might differ, with): every kind of value, keys that interpolations name, and shared ones.
VALUES = [["method=svd", "rank=8", "seed=0", "results_dir=/tmp/r"],
          ["method=svd", "rank=16", "seed=1", "results_dir=/tmp/r"],
          ["method=svd", "rank=8", "seed=2", "bits=4", "results_dir=/tmp/r"],  # bits: heal and budget name it
          ["method=svd", "rank=8", "seed=3", "eval.latency.shapes=[[1,8],[2,4]]", "results_dir=/tmp/r"],
          ["method=svd", "rank=8", "seed=4", "param_ratio=0.5", "results_dir=/tmp/r"],
          ["method=svd", "rank=8", "seed=5", "data=bbc", "results_dir=/tmp/r"],  # a group choice
          ["method=svd", "rank=8", "seed=6", "model.targets=encoder\\.layer\\.0\\..*", "results_dir=/tmp/r"],
          ["method=svd", "rank=8", "seed=7", "+extra.note='a b'", "results_dir=/tmp/r"],  # adds: composed
          ["method=svd", "rank=8", "seed=8", "logger=wandb", "results_dir=/tmp/r"],  # logger.dir names it
          ["method=lplr", "rank=8", "seed=9", "method.iters=3", "results_dir=/tmp/r"],
          ["method=svd", "rank=8", "seed=10", "budget=${bits}", "results_dir=/tmp/r"]]  # an interpolation


@pytest.mark.parametrize("with_hydra", [True, False], ids=["sweep", "dry run"])
def test_resolved_points_equal_their_composed_configs(hydra_loader, with_hydra, monkeypatch):
    """Each point's resolved config and run_id are those of Hydra's own composition of it; the points
    that only set values get them without their config being made (no copy until ``cfg`` is read)."""
    from lrsweep import identity
    from lrsweep.sweep import compose as compose_module

    loader, master = hydra_loader
    made = []
    real = compose_module._with_values
    monkeypatch.setattr(compose_module, "_with_values", lambda *a: made.append(1) or real(*a))
    points = compose_module.sweep_points(loader, master, VALUES, with_hydra=with_hydra)
    lazy = len(made)
    for ov, point in zip(VALUES, points, strict=True):
        want = loader.load_sweep_config(master, ov)
        assert point.resolved == identity.resolved(want), ov
        assert identity.run_id_of(point.resolved, "cpu") == identity.run_id(want, "cpu"), ov
        assert identity.dense_key_of(point.resolved) == identity.dense_key(want), ov
        assert identity.resolved(point.cfg) == point.resolved and ("hydra" in point.cfg) == with_hydra, ov
    assert lazy == 3  # +extra.note (adds a key), bits (interpolations name it), budget=${bits}


def test_a_point_read_in_place_leaves_its_template_as_it_was(hydra_loader):
    """Composed.applied sets the point's values in its template's config and puts them back, an
    interpolation (``budget: ${bits}`` of this experiment) as an interpolation."""
    from lrsweep.sweep.compose import sweep_points

    loader, master = hydra_loader
    grid = [["experiment=minilm_layers", f"rank={r}", f"budget={b}", "eval.latency.shapes=[[1,2]]"]
            for r, b in ((4, 3), (8, 2))]
    points = sweep_points(loader, master, grid, with_hydra=False)
    template = points[0]._template
    before = OmegaConf.to_container(template.cfg, resolve=False)
    assert before["budget"] == "${bits}"
    with points[1].applied() as cfg:
        assert cfg.rank == 8 and cfg.budget == 2 and cfg.eval.latency.shapes == [[1, 2]]
    assert OmegaConf.to_container(template.cfg, resolve=False) == before
    assert points[0].cfg.rank == 4 and points[1].cfg.rank == 8  # each made from the template as it was
