"""No remote code unless configured, no unpickling of weights, no W&B key anywhere we write,
no run name or id that escapes results_dir."""

from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from faultlib.cli import REPO, TINY, lrsweep

CODE_DIRS = [REPO / "lrsweep", REPO / "analysis"]
FAKE_KEY = "f4ke0c0ffee0123456789abcdef0123456789abc"  # 40 hex-ish characters, like a real key


# ---------------------------------------------------------------- remote code
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
def test_trust_remote_code_is_false_by_default(compose, name):
    overrides = [f"model={name}"] + (["model.path=some/model"] if name == "hf" else [])
    assert compose(overrides).model.trust_remote_code is False


def remote_code_model(folder: Path) -> Path:
    """A model folder whose config asks for custom code; importing that code leaves a marker."""
    folder.mkdir()
    marker = folder / "REMOTE_CODE_RAN"
    (folder / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", '
        '"AutoModel": "configuration_evil.EvilModel"}}')
    (folder / "configuration_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n")
    return marker


def test_remote_code_is_refused_unless_configured(config_error, tmp_path):
    marker = remote_code_model(tmp_path / "evil")
    line = config_error(f"results_dir={tmp_path / 'out'}", *TINY, "model=hf", f"model.path={tmp_path / 'evil'}",
                        "model.kind=encoder")
    assert line.startswith("lrsweep: config error: model.path") and "contains custom code" in line, line
    assert not marker.exists()


def test_trust_remote_code_true_is_passed_through(tmp_path):
    from lrsweep import models

    marker = remote_code_model(tmp_path / "evil")
    mcfg = OmegaConf.create({"name": "evil", "path": str(tmp_path / "evil"), "gguf_file": None, "revision": None,
                             "kind": "encoder", "dtype": "float32", "trust_remote_code": True})
    with contextlib.suppress(Exception):  # the fake model need not build: the point is that its code was allowed to run
        models.skeleton(mcfg)
    assert marker.read_text() == "ran"


# ---------------------------------------------------------------- no unpickling
def calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            yield node, owner_name, node.func.attr


def python_files():
    return [p for d in CODE_DIRS for p in sorted(d.rglob("*.py"))]


def test_code_scan_sees_the_package():
    assert len(python_files()) > 20


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_deserialization(path):
    for node, owner, attr in calls(path):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if owner == "torch" and attr == "load":
            kw = {k.arg: k.value for k in node.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{where}: torch.load without weights_only=True"
        assert not (owner in ("pickle", "cloudpickle", "dill", "joblib", "_pickle") and attr in ("load", "loads")), \
            f"{where}: {owner}.{attr} unpickles"
        if owner in ("np", "numpy") and attr == "load":
            kw = {k.arg: k.value for k in node.keywords}
            assert not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value), where
        for k in node.keywords:
            if k.arg == "trust_remote_code":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), \
                    f"{where}: trust_remote_code=True hard-coded"
            if k.arg == "use_safetensors":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is False), where


# ---------------------------------------------------------------- W&B key
@pytest.mark.e2e
def test_wandb_key_never_written(tmp_path):
    out = tmp_path / "results"
    args = [a for a in TINY if a != "logger=none"]
    res = lrsweep(f"results_dir={out}", *args, "logger=wandb", "logger.mode=offline", "rank=4",
                  WANDB_API_KEY=FAKE_KEY, WANDB_MODE="offline")
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(out.rglob("offline-run-*")), "no W&B run was written"
    assert list((out / "rows").glob("*.json")) and list(out.rglob("config.yaml"))
    assert FAKE_KEY not in res.stdout + res.stderr
    scanned = 0
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert FAKE_KEY.encode() not in data, f"W&B key found in {f}"
            assert FAKE_KEY[:16].encode() not in data, f"part of the W&B key found in {f}"
            scanned += 1
    assert scanned >= 5


# ---------------------------------------------------------------- path traversal
@pytest.mark.parametrize("name", ["../../x", "/tmp/x"])
def test_user_given_sweep_name_cannot_escape(config_error, tmp_path, name):
    out = tmp_path / "results"
    line = config_error(f"results_dir={out}", *TINY, f"sweep_name='{name}'")
    assert line.startswith("lrsweep: config error: sweep_name:") and "not a plain name" in line, line
    assert not (out / "rows").exists()


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "x.json", "/etc/passwd", "a\\b", "a b"])
def test_row_path_rejects_run_ids_outside_results_dir(tmp_path, bad):
    from lrsweep.row import row_path

    with pytest.raises(ValueError):
        row_path(tmp_path, bad)


def test_run_name_is_a_plain_name(compose):
    from lrsweep.identity import run_name

    cfg = compose(["model=hf", "model.path=../../evil/../model", "model.name=../../x"])
    name = run_name(cfg)
    assert "/" not in name and os.sep not in name and name not in (".", "..")
