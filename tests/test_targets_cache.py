"""The targets of a model config are kept on disk: later processes skip building the skeleton."""

import json
import re
import shutil

import pytest

from lrsweep import models, validate


def test_targets_read_back_without_the_skeleton(compose, tmp_path, monkeypatch):
    cfg = compose([f"cache_dir={tmp_path}"])
    validate._targets.cache_clear()
    first = validate.targets(cfg)
    assert len(list((tmp_path / "targets").glob("*.json"))) == 1
    validate._targets.cache_clear()
    monkeypatch.setattr(models, "skeleton", lambda mcfg: pytest.fail("the skeleton was built again"))
    assert validate.targets(cfg) == first  # shapes, embedding flags and tied names all round-trip
    validate._targets.cache_clear()


def test_a_changed_config_file_builds_again(compose, tmp_path, monkeypatch):
    src = models.resolve_path(compose().model)
    local = tmp_path / "model"
    shutil.copytree(src, local)
    cfg = compose([f"cache_dir={tmp_path}", f"model.path={local}"])
    validate._targets.cache_clear()
    before = validate.targets(cfg)
    conf = json.loads((local / "config.json").read_text())
    conf["num_hidden_layers"] = 2  # fewer layers: fewer targets
    (local / "config.json").write_text(json.dumps(conf))
    validate._targets.cache_clear()
    after = validate.targets(cfg)
    assert len(after) < len(before)
    assert len(list((tmp_path / "targets").glob("*.json"))) == 2
    validate._targets.cache_clear()


def test_config_errors_are_not_cached(compose, tmp_path):
    from lrsweep.errors import ConfigError

    cfg = compose([f"cache_dir={tmp_path}", "model.targets=nothing_matches"])
    validate._targets.cache_clear()
    with pytest.raises(ConfigError, match=re.escape("model.targets")):
        validate.targets(cfg)
    assert not list((tmp_path / "targets").glob("*.json"))
    validate._targets.cache_clear()
