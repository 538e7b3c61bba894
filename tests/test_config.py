"""The real YAML composes for every group option; run identity follows the experiment only."""

from __future__ import annotations

from pathlib import Path

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

    with pytest.raises(ConfigError, match="method._target_"):
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
# existed (commit 5190cb6): rows written then are still found (identity.LATER_KEYS)
EARLIER_RUN_IDS = {"": "521f5d9592f6", "model=smollm2": "34f9ea320546", "method=svdllm": "7ad16b06a136",
                   "method=asvd": "e3c5cc707190", "method=drone": "462a4d5939d9", "method=lplr bits=4": "65e0dfa8f47c",
                   "model=smollm2 method=svdllm": "22dad3642870", "budget=4": "bb6264e0792a",
                   "method=fwsvd calib.fisher=batch": "6058c996b53e"}


def narrow_grid(cfg):
    """``cfg`` at the quantizer's grid before ``method.grid`` existed (narrow: rows written then are its runs)."""
    if "grid" in cfg.method:
        cfg.method.grid = "narrow"
    return cfg


@pytest.mark.parametrize("overrides", sorted(EARLIER_RUN_IDS))
def test_rows_written_before_later_keys_keep_their_run_id(compose, overrides, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # these ids were computed on CPU (device=auto)
    assert run_id(narrow_grid(compose(overrides.split()))) == EARLIER_RUN_IDS[overrides]
    assert run_id(narrow_grid(compose([*overrides.split(), "device=cpu", "save_compressed=true"]))) == \
        EARLIER_RUN_IDS[overrides]


def test_the_default_grid_rule_changes_the_run_id_of_every_quantizing_method(compose, monkeypatch):
    """Rows made on the narrow grid (all rows before method.grid) are never found for the default grid."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for overrides in [*sorted(EARLIER_RUN_IDS), *(f"method={m}" for m in METHODS)]:
        cfg = compose(overrides.split())
        if "grid" in cfg.method:
            assert cfg.method.grid == "auto" and run_id(cfg) != run_id(narrow_grid(compose(overrides.split())))
    assert run_id(compose(["method.observer=mse"])) != run_id(compose([]))


# run_ids of main at 47fdb06, when a built-in's config still carried `_target_` (its own function): the
# identity hashes a built-in known by name with that `_target_` (identity._name_builtin_target)
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


def test_every_method_keeps_its_run_id_without_target(compose, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {f"method={m}" for m in METHODS} <= set(TARGET_RUN_IDS)
    for overrides, expected in TARGET_RUN_IDS.items():
        cfg = compose(overrides.split())
        assert ("_target_" in cfg.method) == ("_target_" in overrides), overrides
        assert run_id(narrow_grid(cfg)) == expected, overrides


def test_run_id_has_the_device_type_but_not_the_gpu_index(compose, monkeypatch):
    from lrsweep import identity

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu, cuda = run_id(compose(["device=cpu"])), run_id(compose(["device=cuda"]))
    assert cpu != cuda and run_id(compose(["device=cuda:1"])) == cuda  # a CPU row does not block the GPU rerun
    assert run_id(compose(["device=auto"])) == cpu  # auto: what this machine has
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_id(compose(["device=auto"])) == cuda
    with identity.auto_device("cpu"):  # a sweep planning jobs that see no GPU
        assert run_id(compose(["device=auto"])) == cpu and run_id(compose(["device=cuda"])) == cuda
    assert run_name(compose(["device=auto"])).endswith(cuda)


def test_save_compressed_changes_no_run_id(compose):
    for base in ([], ["method=lplr", "bits=4"], ["device=cuda"]):
        assert run_id(compose([*base, "save_compressed=true"])) == run_id(compose([*base, "save_compressed=false"]))


def test_rekey_moves_gpu_and_save_compressed_rows_to_their_id_now(compose, tmp_path, capsys):
    from omegaconf import OmegaConf

    from lrsweep import rekey
    from lrsweep.row import ResultRow, read_rows, write_row

    def row(overrides, earlier, device, before_grid=True):  # a row as written before the device type was in run_id
        config = OmegaConf.to_container(compose(overrides), resolve=True)
        if before_grid:  # and before method.grid / method.observer
            config["method"] = {k: v for k, v in config["method"].items() if k not in ("grid", "observer")}
        return ResultRow(run_id=earlier, status="ok", device=device, run_name=f"minilm-svd-{earlier}", config=config)

    gpu = row([], "521f5d9592f6", "cuda:0")  # the default config's id before (tests: EARLIER_RUN_IDS)
    saved = row(["save_compressed=true", "bits=8"], "f425b6e1bb01", "cpu")  # id of main at 4b3c400
    cpu = row(["bits=4"], run_id(compose(["bits=4", "device=cpu"])), "cpu", before_grid=False)  # written now
    failed = row(["save_compressed=true"], "55a32ca50a66", "")  # no device recorded, config says auto
    # before method.grid: the uniform scheme's numbers do not depend on the grid rule (moves to the
    # default's id), the group scheme's do (keeps the id of method.grid=narrow, which it computed)
    lplr = row(["method=lplr", "bits=4"], "65e0dfa8f47c", "cpu")
    grouped = ["method=lplr", "bits=4", "method.scheme=group"]
    group = row(grouped, run_id(narrow_grid(compose([*grouped, "device=cpu"]))), "cpu")
    for r in (gpu, saved, cpu, failed, lplr, group):
        write_row(tmp_path, r)
    assert rekey.main([str(tmp_path), "--dry-run"]) == 0 and "3 rows to move" in capsys.readouterr().out
    moves = rekey.rekey(tmp_path)
    new_gpu, new_saved = run_id(compose(["device=cuda"])), run_id(compose(["bits=8", "device=cpu"]))
    new_lplr = run_id(compose(["method=lplr", "bits=4", "device=cpu"]))
    assert sorted(moves) == sorted([("521f5d9592f6", new_gpu, "moved"), ("f425b6e1bb01", new_saved, "moved"),
                                    ("65e0dfa8f47c", new_lplr, "moved")])
    rows = {r.run_id: r for r in read_rows(tmp_path)}
    assert set(rows) == {new_gpu, new_saved, cpu.run_id, "55a32ca50a66", new_lplr, group.run_id}
    assert rows[new_gpu].run_name == f"minilm-svd-{new_gpu}" and rows[new_gpu].device == "cuda:0"
    assert rekey.rekey(tmp_path) == []  # idempotent
