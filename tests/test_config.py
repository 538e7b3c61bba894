"""The real YAML composes for every group option; run identity follows the experiment only."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import CONF
from lrsweep.identity import run_id, run_name
from lrsweep.compress import method_spec

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem != "custom")
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "hf")


def test_defaults(compose):
    cfg = compose()
    assert cfg.model.name == "minilm" and cfg.method.name == "svd"
    assert cfg.rank == 32 and cfg.bits == 16 and cfg.budget is None and cfg.device == "auto"
    assert cfg.results_dir == "results" and cfg.logger.mode == "offline"
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("method", METHODS)
def test_every_method_yaml_composes_and_resolves(compose, method):
    cfg = compose([f"method={method}"])
    assert cfg.method.name == method
    spec = method_spec(cfg.method)
    assert spec.fn.__module__.startswith("lrsweep.methods")


def test_custom_method_needs_a_target(compose):
    from lrsweep.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape("method._target_")):
        method_spec(compose(["method=custom"]).method)
    spec = method_spec(compose(["method=custom", "method._target_=lrsweep.methods.svd.svd"]).method)
    assert spec.name == "svd"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_yaml_composes(compose, model):
    cfg = compose([f"model={model}"])
    assert cfg.model.kind in ("encoder", "causal_lm") and cfg.model.targets


def test_launcher_configs_compose(compose):
    cfg = compose(hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.parallelism >= 1


def test_run_id_ignores_launcher_logger_and_paths(compose, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # device=auto is cpu here (its type counts)
    base = run_id(compose())
    for same in (["logger=none"], ["results_dir=/elsewhere"], ["device=cpu"], ["cache_dir=/c"],
                 ["sweep_name=abc"], ["progress=false"]):
        assert run_id(compose(same)) == base, same


def test_run_id_changes_with_every_experiment_field(compose):
    base = run_id(compose())
    changed = [["rank=64"], ["bits=8"], ["seed=1"], ["method=lplr"], ["budget=2.0"], ["eval.probe_test=10"],
               ["data.split_seed=3"], ["model.targets=encoder\\.layer\\.0\\..*"], ["method.scheme=channel"]]
    ids = {run_id(compose(c)) for c in changed}
    assert base not in ids and len(ids) == len(changed)


def test_run_name_is_readable_and_safe(compose):
    cfg = compose(["rank=64", "bits=8", "seed=2"])
    name = run_name(cfg)
    assert name.startswith("minilm-svd-r64-b8-s2-") and name.endswith(run_id(cfg))
    assert "/" not in name


# run_ids computed by lrsweep before param_ratio, allocation, the protocol keys and the Fisher estimator
# existed (commit 5190cb6, schema 1): rows written then lack those keys and name a built-in by `_target_`
EARLIER_RUN_IDS = {"": "521f5d9592f6", "model=smollm2": "34f9ea320546", "method=svdllm": "7ad16b06a136",
                   "method=asvd": "e3c5cc707190", "method=drone": "462a4d5939d9", "method=lplr bits=4": "65e0dfa8f47c",
                   "model=smollm2 method=svdllm": "22dad3642870", "budget=4": "bb6264e0792a",
                   "method=fwsvd calib.fisher=batch": "6058c996b53e"}

# run_ids of main at 47fdb06 (schema 1), when a built-in's config still carried `_target_` (its own function)
TARGET_RUN_IDS = {"method=asvd": "e3c5cc707190", "method=caldera": "e637ee3b8883", "method=drone": "462a4d5939d9",
                  "method=dsvd": "ebae4bff768c", "method=fwsvd": "bd43625e86da", "method=gptq": "662fe97c41ae",
                  "method=kronecker": "e104e454f756", "method=losparse": "b6525a1d4a97", "method=lplr": "1c69a472e89b",
                  "method=lqer": "2e8f17da351f", "method=lsvd": "887f002576e3", "method=quant": "04e8b6f615e9",
                  "method=rsvd": "a8bc794538e9", "method=svd": "521f5d9592f6", "method=svdllm": "7ad16b06a136",
                  "method=svd method.scheme=group": "a2c611a57898",
                  "method=asvd method.solver=lowrank rank=8": "46c563cc15c7",
                  "method=fwsvd method.side=input model=smollm2": "55cbee49ab71",
                  "method=gptq bits=4": "4778695a9a32",
                  "method=svd method._target_=lrsweep.methods.svd.svd": "521f5d9592f6",
                  "method=svd method._target_=lrsweep_testplugins.fails_above": "7b911a2365cc",
                  "method=custom method._target_=lrsweep.methods.svd.svd": "abff58fe697f"}

# schema 1's rule for those keys: left out of the hash at these values (what ran before each existed)
SCHEMA_1_LATER = {"param_ratio": None, "eval.ppl_drop_last": False, "eval.ppl_bos": False, "calib.sampling": "stream",
                  "eval.probe_refit": False,
                  "calib.bos": False, "calib.fisher": "batch", "allocation": "uniform", "method.solver": "exact",
                  "method.side": "output", "method.power": 0.5, "method.update": False}


def _at(config, path):
    *parents, leaf = path.split(".")
    for part in parents:
        config = config.get(part) if isinstance(config, dict) else None
    return config, leaf


def schema_1_row(compose, overrides, drop_later):
    """The config of a grid point as a schema-1 lrsweep wrote it on CPU, and the run_id it computed then:
    built-ins with their `_target_`; without the later keys (``drop_later``) at the values that mean
    what ran before them."""
    import copy
    import hashlib
    import json

    from omegaconf import OmegaConf

    from lrsweep.identity import _needs
    from lrsweep.methods import REGISTRY

    cfg = compose(overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    for option in ("grid", "observer", "scale_error"):  # the quantizer's options came with schema 2
        config["method"].pop(option, None)
    config["eval"].pop("retrieval", None)  # came later; off, it is no part of the run_id
    if config["method"]["name"] in REGISTRY:
        config["method"].setdefault("_target_", REGISTRY[config["method"]["name"]].target)
    exp = {k: copy.deepcopy(v) for k, v in config.items()
           if k not in {"hydra", "logger", "launch", "results_dir", "cache_dir", "device", "verbose", "threads",
                        "sweep_name", "progress", "force", "dry_run", "seeds"}}
    exp["save_compressed"] = False
    for path, value in SCHEMA_1_LATER.items():
        node, leaf = _at(exp, path)
        if isinstance(node, dict) and node.get(leaf, not value) == value:
            del node[leaf]
            if drop_later:
                del _at(config, path)[0][leaf]
    if "fisher" not in _needs(cfg.method) and isinstance(exp.get("calib"), dict):
        exp["calib"].pop("fisher", None)
    payload = json.dumps({"schema_version": 1, **exp}, sort_keys=True, default=str)
    return config, hashlib.sha256(payload.encode()).hexdigest()[:12]


@pytest.mark.parametrize("overrides, earlier", [*[(o, True) for o in sorted(EARLIER_RUN_IDS)],
                                                *[(o, False) for o in sorted(TARGET_RUN_IDS)]])
def test_rekey_moves_schema_1_rows_where_the_sweep_finds_them(compose, overrides, earlier, monkeypatch, tmp_path):
    """A row written under schema 1 (pinned ids of earlier commits: without the later keys, or with a
    built-in's `_target_`) is moved by ``python -m lrsweep.rekey`` to the run_id its grid point has now,
    so the sweep finds it ok and does not run it again; its config gets the later keys it ran with."""
    from conftest import PLUGINS
    from lrsweep import job, rekey
    from lrsweep.row import ResultRow, read_row, row_path, row_status, write_row

    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # these ids were computed on CPU (device=auto)
    pinned = (EARLIER_RUN_IDS if earlier else TARGET_RUN_IDS)[overrides]
    config, computed = schema_1_row(compose, overrides.split(), drop_later=earlier)
    assert computed == pinned  # the row is what schema-1 lrsweep wrote under that id
    write_row(tmp_path, ResultRow(run_id=pinned, status="ok", device="cpu", run_name=f"minilm-x-{pinned}",
                                  config=config, schema_version=1))
    now = run_id(grid_before(compose(overrides.split())))
    assert now != pinned and row_status(tmp_path, now) is None  # a new schema: every run_id changes
    assert rekey.rekey(tmp_path) == [(pinned, now, "moved")]
    assert row_status(tmp_path, now) == "ok" and not row_path(tmp_path, pinned).exists()
    row = read_row(row_path(tmp_path, now))
    assert row.schema_version == 2 and row.run_name == f"minilm-x-{now}"
    cfg = grid_before(compose([*overrides.split(), f"results_dir={tmp_path}"]))
    assert job.run(cfg).started_at == row.started_at  # the job skips it: already ok
    assert rekey.rekey(tmp_path) == []  # idempotent


def grid_before(cfg):
    """``cfg`` at the quantizer grid a schema-1 row computed: narrow (absmax / (2^(b-1) - 1)) for the
    symmetric schemes; the uniform scheme's min/max grid has no rule to choose (the default's id)."""
    if "grid" in cfg.method and cfg.method.get("scheme") != "uniform":
        cfg.method.grid = "narrow"
    return cfg


def test_the_default_grid_rule_changes_the_run_id_of_every_quantizing_method(compose):
    """Rows made on the narrow grid (every row before method.grid) are never found for the default grid."""
    for overrides in [*sorted(EARLIER_RUN_IDS), *(f"method={m}" for m in METHODS)]:
        cfg = compose(overrides.split())
        if "grid" in cfg.method:
            narrow = compose(overrides.split())
            narrow.method.grid = "narrow"
            default = "best" if cfg.method.name in ("gptq", "lqer", "caldera") else "auto"  # gptq's options
            assert cfg.method.grid == default and run_id(cfg) != run_id(narrow), overrides
    assert run_id(compose(["method.observer=mse"])) != run_id(compose([]))
    gptq = compose(["method=gptq"])
    assert run_id(gptq) != run_id(compose(["method=gptq", "method.grid=auto"]))
    assert run_id(gptq) != run_id(compose(["method=gptq", "method.scale_error=weight"]))


@pytest.mark.parametrize("method", ["gptq", "svd"])
def test_rekey_gives_a_uniform_schema_1_row_its_methods_default_grid(compose, method):
    """The uniform scheme's min/max grid has no rule: a schema-1 row is keyed to its method's defaults
    (gptq's grid best, the shared auto), the config a sweep composes for that point now."""
    from omegaconf import OmegaConf

    from lrsweep import rekey
    from lrsweep.row import ResultRow

    cfg = compose([f"method={method}", "method.scheme=uniform", "device=cpu"])
    config = OmegaConf.to_container(cfg, resolve=True)
    for option in ("grid", "observer", "scale_error"):
        config["method"].pop(option, None)
    row = ResultRow(run_id="0123456789ab", device="cpu", config=config, schema_version=1)
    assert rekey.current_config(row) == OmegaConf.to_container(cfg, resolve=True)
    assert rekey.current_config(row)["method"]["grid"] == ("best" if method == "gptq" else "auto")


@pytest.mark.parametrize("overrides, ran", [
    ("method=gptq method.grid=auto method.observer=mse", "weight"), ("method=gptq method.grid=auto", "output"),
    ("method=caldera method.grid=auto method.observer=mse", "weight"),
    ("method=lqer method.quantizer=gptq method.observer=mse", "weight"), ("method=lqer method.grid=auto", "output")])
def test_rekey_gives_rows_before_scale_error_the_search_they_ran(compose, tmp_path, overrides, ran):
    """A schema-2 row of gptq, lqer or caldera written before method.scale_error: its mse search
    minimized the plain squared error (scale_error weight); without a search (observer absmax, no grid
    best) it computed what the default computes. rekey moves it to the run_id of that config, never onto
    the new default's (grid best, searched on the output error)."""
    from omegaconf import OmegaConf

    from lrsweep import identity, rekey
    from lrsweep.row import ResultRow, read_rows, write_row

    config = OmegaConf.to_container(compose([*overrides.split(), "device=cpu"]), resolve=True)
    del config["method"]["scale_error"]
    old = identity.run_id(OmegaConf.create(config))
    write_row(tmp_path, ResultRow(run_id=old, status="ok", device="cpu", run_name=f"x-{old}", config=config,
                                  schema_version=2))
    new = run_id(compose([*overrides.split(), f"method.scale_error={ran}", "device=cpu"]))
    assert new != old and rekey.rekey(tmp_path) == [(old, new, "moved")]
    (row,) = read_rows(tmp_path)
    assert row.run_id == new and row.config["method"]["scale_error"] == ran and row.schema_version == 2
    assert new != run_id(compose([overrides.split()[0], "device=cpu"]))  # the default: grid best
    assert rekey.rekey(tmp_path) == []


def test_built_in_method_configs_have_no_target(compose):
    for overrides in TARGET_RUN_IDS:
        assert ("_target_" in compose(overrides.split()).method) == ("_target_" in overrides), overrides


def test_run_id_has_the_device_type_but_not_the_gpu_index(compose, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu, cuda = run_id(compose(["device=cpu"])), run_id(compose(["device=cuda"]))
    assert cpu != cuda and run_id(compose(["device=cuda:1"])) == cuda  # a CPU row does not block the GPU rerun
    assert run_id(compose(["device=auto"])) == cpu  # auto: what this machine has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_id(compose(["device=auto"])) == cuda
    # a sweep planning jobs that see no GPU
    assert run_id(compose(["device=auto"]), auto_device="cpu") == cpu
    assert run_id(compose(["device=cuda"]), "cpu") == cuda
    assert run_name(compose(["device=auto"])).endswith(cuda)


def test_save_compressed_changes_no_run_id(compose):
    for base in ([], ["method=lplr", "bits=4"], ["device=cuda"]):
        assert run_id(compose([*base, "save_compressed=true"])) == run_id(compose([*base, "save_compressed=false"]))


def test_rekey_moves_rows_of_the_earlier_schema_and_leaves_current_ones(compose, tmp_path, capsys):
    """GPU rows get the device type in their id, CPU rows too; a row whose id is current stays; a row
    is not moved onto an existing one, nor when its device is unknown; a second run changes nothing."""
    from omegaconf import OmegaConf

    from lrsweep import rekey
    from lrsweep.row import ResultRow, read_rows, write_row

    def row(overrides, rid, device, schema=1):
        config = OmegaConf.to_container(compose(overrides), resolve=True)
        if schema == 1:  # before the quantizer's grid rule and observer were options
            config["method"] = {k: v for k, v in config["method"].items() if k not in ("grid", "observer")}
        return ResultRow(run_id=rid, status="ok", device=device, run_name=f"minilm-svd-{rid}", config=config,
                         schema_version=schema)

    gpu = row([], "521f5d9592f6", "cuda:0")  # the default config's id under schema 1 (EARLIER_RUN_IDS)
    saved = row(["save_compressed=true", "bits=8"], "f425b6e1bb01", "cpu")  # id of main at 4b3c400
    cpu = row(["bits=4"], "0123456789ab", "cpu")
    twin = row(["bits=4", "save_compressed=true"], "ba9876543210", "cpu")  # the same experiment as cpu
    failed = row(["save_compressed=true"], "55a32ca50a66", "")  # no device recorded, config says auto
    current = row(["bits=2"], run_id(compose(["bits=2", "device=cpu"])), "cpu", schema=2)
    # the group scheme's numbers depend on the grid rule: a schema-1 row ran on the narrow grid
    grouped = ["method=lplr", "bits=4", "method.scheme=group"]
    group = row(grouped, "0a0a0a0a0a0a", "cpu")
    for r in (gpu, saved, cpu, twin, failed, current, group):
        write_row(tmp_path, r)
    assert rekey.main([str(tmp_path), "--dry-run"]) == 0 and "4 rows to move" in capsys.readouterr().out
    assert {r.run_id for r in read_rows(tmp_path)} == {"521f5d9592f6", "f425b6e1bb01", "0123456789ab",
                                                      "ba9876543210", "55a32ca50a66", current.run_id, group.run_id}
    moves = rekey.rekey(tmp_path)
    new_gpu, new_saved = run_id(compose(["device=cuda"])), run_id(compose(["bits=8", "device=cpu"]))
    new_cpu = run_id(compose(["bits=4", "device=cpu"]))
    new_group = run_id(grid_before(compose([*grouped, "device=cpu"])))
    assert new_group != run_id(compose([*grouped, "device=cpu"]))
    assert sorted(moves) == sorted([("521f5d9592f6", new_gpu, "moved"), ("f425b6e1bb01", new_saved, "moved"),
                                    ("0123456789ab", new_cpu, "moved"), ("ba9876543210", new_cpu, rekey.KEPT),
                                    ("55a32ca50a66", "?", rekey.UNKNOWN), ("0a0a0a0a0a0a", new_group, "moved")])
    rows = {r.run_id: r for r in read_rows(tmp_path)}
    assert set(rows) == {new_gpu, new_saved, new_cpu, "ba9876543210", "55a32ca50a66", current.run_id, new_group}
    assert rows[new_gpu].run_name == f"minilm-svd-{new_gpu}" and rows[new_gpu].device == "cuda:0"
    assert rows[new_gpu].schema_version == 2 and rows["55a32ca50a66"].schema_version == 1
    files = {p.name: p.read_text() for p in (tmp_path / "rows").iterdir()}
    assert sorted(what for _, _, what in rekey.rekey(tmp_path)) == sorted([rekey.KEPT, rekey.UNKNOWN])
    assert {p.name: p.read_text() for p in (tmp_path / "rows").iterdir()} == files  # idempotent


# ---- the identity's declaration: what is not part of an experiment, what a packed job's points share ----

def _changed(value):
    """Another value of the same kind."""
    if isinstance(value, dict):
        return {**value, "_probe": 1}
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return 1 if value is None else f"{value}x"


def test_every_key_left_out_has_a_one_line_reason():
    from lrsweep.identity import NOT_DENSE_MODEL, NOT_EXPERIMENT

    for declared in (NOT_EXPERIMENT, NOT_DENSE_MODEL):
        for key, why in declared.items():
            assert isinstance(why, str) and len(why.split()) >= 2 and "\n" not in why, key
    assert set(NOT_DENSE_MODEL) >= {k for k in NOT_EXPERIMENT if "." not in k} - {"threads", "cache_dir"}


def test_run_id_ignores_each_key_that_is_not_part_of_the_experiment_and_follows_every_other(compose):
    from omegaconf import OmegaConf

    from lrsweep.identity import NOT_EXPERIMENT

    config = OmegaConf.to_container(compose(), resolve=True)
    base = run_id(OmegaConf.create(config), auto_device="cpu")
    for key in [k for k in NOT_EXPERIMENT if "." not in k]:  # absent ones (hydra) added
        assert run_id(OmegaConf.create({**config, key: _changed(config.get(key))}), "cpu") == base, key
    others = [k for k in config if k not in NOT_EXPERIMENT]
    assert {"model", "method", "data", "eval", "rank", "bits", "seed", "device", "calib", "stream"} <= set(others)
    for key in others:
        assert run_id(OmegaConf.create({**config, key: _changed(config[key])}), "cpu") != base, key


def test_the_fisher_estimator_is_part_of_the_experiment_of_methods_that_use_a_fisher(compose):
    for method, uses in (("svdllm", False), ("asvd", False), ("fwsvd", True)):
        ids = {run_id(compose([f"method={method}", f"calib.fisher={f}"]), "cpu") for f in ("sample", "batch")}
        assert len(ids) == (2 if uses else 1), method


def test_dense_key_ignores_what_points_of_one_job_may_differ_in_and_follows_every_other(compose):
    from omegaconf import OmegaConf

    from lrsweep.identity import NOT_DENSE_MODEL, dense_key

    config = OmegaConf.to_container(compose(["+calib=default"]), resolve=True)
    base = dense_key(OmegaConf.create(config))
    for key in NOT_DENSE_MODEL:
        assert dense_key(OmegaConf.create({**config, key: _changed(config.get(key))})) == base, key
    others = [k for k in config if k not in NOT_DENSE_MODEL]
    assert {"model", "data", "calib", "eval", "seed", "device", "threads", "cache_dir"} <= set(others)
    for key in others:
        assert dense_key(OmegaConf.create({**config, key: _changed(config[key])})) != base, key
    assert dense_key(compose(["device=cuda:0"])) != dense_key(compose(["device=cuda:1"]))  # the job's one device
