"""The method base configs of lrsweep's app (``method/base/<name>``) as a Hydra config source.

conf/method/<name>.yaml extends ``base/<name>``: the method's ``name`` and every option at its
default, built from its options dataclass (lrsweep.methods.config_node). :class:`MethodConfigSource`
serves them, and :class:`LrsweepSearchPath` adds it to the config search path of lrsweep's app
alone (the one whose search path holds the conf/ next to the lrsweep package), so composing conf/
with Hydra's compose API needs no earlier import. Hydra imports this module in every Hydra app of
the environment: it imports nothing of lrsweep (the package is found, not imported) nor torch.
Which methods exist is answered from the package's files (one per method,
lrsweep/methods/<name>.py) and, once imported, its registry (typed methods registered elsewhere);
loading a config imports lrsweep.methods.
"""

import importlib.util
import sys
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

SCHEME = "lrsweep-methods"
GROUP = "method/base"


def _package_dir() -> Path | None:
    """The lrsweep package's directory, found without importing it (None: not installed)."""
    try:
        spec = importlib.util.find_spec("lrsweep")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _file_dir(path: str) -> Path | None:
    """The directory of a search path element on the file system (None: another scheme)."""
    scheme, sep, rest = path.partition("://")
    if sep and scheme != "file":
        return None
    try:
        return Path(rest if sep else path).resolve()
    except (OSError, ValueError, RuntimeError):
        return None


class LrsweepSearchPath(SearchPathPlugin):
    """Adds :class:`MethodConfigSource` after lrsweep's conf/ (the app's config dir); other apps' search
    paths stay as they are."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        package = _package_dir()
        if package is None:
            return
        conf = package.parent / "conf"
        for element in search_path.get_path():
            if _file_dir(element.path) == conf:
                search_path.append("lrsweep", f"{SCHEME}://")
                return


class MethodConfigSource(ConfigSource):
    """``method/base/<name>`` of every registered typed method: groups ``method`` and ``method/base``."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def available(self) -> bool:
        package = _package_dir()
        return self.path == "" and package is not None and (package / "methods").is_dir()

    def _names(self) -> list[str]:
        package = _package_dir()
        names = {p.stem for p in (package / "methods").glob("*.py") if not p.stem.startswith("_")} if package else set()
        methods = sys.modules.get("lrsweep.methods")
        if methods is not None:
            names |= {name for name, spec in methods.REGISTRY.items() if spec.option_type is not None}
        return sorted(names)

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", "method", GROUP)

    def is_config(self, config_path: str) -> bool:
        group, _, name = config_path.strip("/").rpartition("/")
        name = name.removesuffix(".yaml")
        return group == GROUP and name in self._names()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        path = config_path.strip("/")
        groups = {"": ["method"], "method": ["base"]}.get(path, [])
        configs = self._names() if path == GROUP else []
        return sorted((groups if results_filter in (None, ObjectType.GROUP) else [])
                      + (configs if results_filter in (None, ObjectType.CONFIG) else []))

    def load_config(self, config_path: str) -> ConfigResult:
        if not self.is_config(config_path):
            raise ConfigLoadError(f"lrsweep has no method config {config_path}")
        name = config_path.strip("/").rpartition("/")[2].removesuffix(".yaml")
        from lrsweep.methods import config_node  # torch & co.: only lrsweep's app gets here

        try:
            node = config_node(name)
        except KeyError:
            raise ConfigLoadError(f"lrsweep/methods/{name}.py registers no method {name!r} with an options "
                                  "dataclass") from None
        return ConfigResult(provider=self.provider, path=f"{self.scheme()}://{self.path}", config=node,
                            header={"package": None})
