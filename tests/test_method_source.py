"""conf/ composes with Hydra's compose API in a fresh interpreter (no import first): the method base
configs come from lrsweep's config source (hydra_plugins/lrsweep_methods), which only lrsweep's app
gets and which imports torch only when a method config is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError
from hydra.test_utils.config_source_common_tests import ConfigSourceTestSuite
from omegaconf import OmegaConf

from conftest import CONF, REPO
from hydra_plugins.lrsweep_methods.source import SCHEME, MethodConfigSource

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem != "custom")

COMPOSE = """
import json, sys
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    loader = GlobalHydra.instance().config_loader()
    out = {"sources": [s.provider for s in loader.get_sources()], "listed": loader.get_group_options(sys.argv[2]),
           "heavy_after_listing": sorted(m for m in ("torch", "lrsweep.methods") if m in sys.modules)}
    cfg = compose(sys.argv[3], overrides=sys.argv[4:])
    out.update(method=OmegaConf.to_container(cfg.method), a=cfg.get("a"),
               heavy=sorted(m for m in ("torch", "lrsweep", "lrsweep.methods") if m in sys.modules))
print(json.dumps(out))
"""


def _compose_fresh(tmp_path, config_dir, group, name, *overrides):
    script = tmp_path / "compose.py"
    script.write_text(COMPOSE)
    proc = subprocess.run([sys.executable, str(script), str(config_dir), group, name, *overrides], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_conf_composes_with_the_compose_api_without_importing_lrsweep_first(tmp_path):
    out = _compose_fresh(tmp_path, CONF, "method/base", "config", "method=asvd", "method.alpha=0.25")
    assert out["sources"] == ["hydra", "main", "lrsweep", "schema"]
    assert out["listed"] == METHODS and out["heavy_after_listing"] == []  # listing imports nothing heavy
    assert out["method"] == {"name": "asvd", "scheme": "uniform", "group_size": 128, "grid": "auto",
                             "observer": "absmax", "driver": "auto", "alpha": 0.25, "eps": 1e-06, "solver": "exact"}


def test_a_foreign_app_composes_as_before_and_imports_nothing_of_lrsweep(tmp_path):
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "app.yaml").write_text("defaults:\n  - method: mine\n  - _self_\na: 1\n")
    (conf / "method" / "mine.yaml").write_text("k: 2\n")
    out = _compose_fresh(tmp_path, conf, "method", "app", "a=3")
    assert out["sources"] == ["hydra", "main", "schema"]  # no lrsweep source in its search path
    assert out["listed"] == ["mine"] and out["method"] == {"k": 2} and out["a"] == 3
    assert out["heavy"] == []  # neither torch nor lrsweep imported


def test_the_source_answers_hydras_questions_without_importing_the_methods(monkeypatch):
    monkeypatch.delitem(sys.modules, "lrsweep.methods", raising=False)  # as in a fresh interpreter
    src = MethodConfigSource(provider="lrsweep", path=f"{SCHEME}://")
    assert src.available() and src.scheme() == SCHEME
    assert [src.is_group(p) for p in ("", "method", "method/base", "method/base/svd", "model", "hydra")] == \
        [True, True, True, False, False, False]
    assert src.is_config("method/base/svd") and src.is_config("method/base/svd.yaml")
    assert not any(src.is_config(p) for p in ("method/svd", "method/base", "method/base/nope", "method/base/svd.json",
                                               "", "hydra/launcher/lrsweep_local"))
    assert src.list("", None) == ["method"] and src.list("method", None) == ["base"]
    assert src.list("method", ObjectType.CONFIG) == [] and src.list("method/base", ObjectType.GROUP) == []
    assert src.list("method/base", ObjectType.CONFIG) == src.list("method/base", None) == METHODS
    assert "lrsweep.methods" not in sys.modules
    with pytest.raises(ConfigLoadError, match="no method config method/base/nope"):
        src.load_config("method/base/nope")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_config_is_its_options_dataclass_at_its_defaults(method):
    from lrsweep.methods import REGISTRY

    ret = MethodConfigSource(provider="lrsweep", path=f"{SCHEME}://").load_config(f"method/base/{method}")
    assert OmegaConf.to_container(ret.config) == {"name": method, **REGISTRY[method].defaults()}
    assert ret.header == {"package": None} and ret.provider == "lrsweep" and ret.path == f"{SCHEME}://"


@pytest.mark.parametrize("type_, path", [(MethodConfigSource, f"{SCHEME}://")])
class TestHydrasConfigSourceContract:
    """The tests of Hydra's ConfigSourceTestSuite that do not need its sample config tree (the others
    ask a source pointed at that tree for its configs: dataset/imagenet, level1/level2, ...)."""

    test_not_available = ConfigSourceTestSuite.test_not_available
