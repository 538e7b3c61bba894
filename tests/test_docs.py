"""The documentation site builds under ``mkdocs build --strict``, and ruff passes.

Strict mode turns every warning into a failure: a link to a missing page or anchor, a page outside
the nav, an API reference (``::: lrsweep.x``) that does not resolve, a docstring mkdocstrings cannot
parse. The two small sites below check that the configuration really fails on the first and the
third (a config that stopped validating links would pass the full build silently).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mkdocs.commands.build import build
from mkdocs.config import load_config
from mkdocs.exceptions import MkDocsException

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def in_repo(monkeypatch):
    """Paths in mkdocs.yml (snippets, the griffe extension) are relative to the repository root."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")


def _build(site: Path, **overrides) -> None:
    build(load_config(str(REPO / "mkdocs.yml"), strict=True, site_dir=str(site), **overrides))


def test_docs_build_strict(in_repo, tmp_path):
    _build(tmp_path / "site")
    site = tmp_path / "site"
    for page in ("guide/installation", "guide/slurm", "guide/own-method", "guide/protocols",
                 "reference/compress", "reference/options", "reference/row", "reference/analysis",
                 "architecture", "benchmarks", "contributing", "changelog"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "reference/compress/index.html").read_text()
    assert "compress_matrix" in api and "Parameters:" in api  # rendered from the docstrings
    options = (site / "reference/options/index.html").read_text()
    assert "gesvda" in options  # a field's trailing comment became its description (docs/_ext)
    changelog = (site / "changelog/index.html").read_text()
    assert "Keep a Changelog" in changelog  # CHANGELOG.md of the repository root, included


def _one_page_site(tmp_path: Path, text: str) -> dict:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(text)
    return {"docs_dir": str(docs), "nav": [{"Home": "index.md"}]}


@pytest.mark.parametrize(("text", "ok"), [
    ("# Home\n\nSee [above](#home).\n\n::: lrsweep.compress.compress_matrix\n", True),
    ("# Home\n\nSee [the methods](guide/methods.md).\n", False),  # a page that does not exist
    ("# Home\n\nSee [here](#no-such-heading).\n", False),  # an anchor that does not exist
    ("# Home\n\n::: lrsweep.compress.no_such_function\n", False),  # no such API object
])
def test_docs_build_fails_on_a_broken_reference(in_repo, tmp_path, text, ok):
    overrides = _one_page_site(tmp_path, text)
    if ok:
        _build(tmp_path / "site", **overrides)
        assert (tmp_path / "site" / "index.html").is_file()
    else:
        with pytest.raises(MkDocsException):
            _build(tmp_path / "site", **overrides)


@pytest.mark.lint
def test_ruff_clean():
    """ruff with pyproject's configuration (its per-file-ignores list the rules still pending)."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_links_resolve():
    """Every relative link of the README names a file of the repository (and a heading there, for
    an anchor into docs/), and the README links each goal a newcomer has straight into the docs."""
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    for link in links:
        if "://" in link:
            continue
        path, _, anchor = link.partition("#")
        assert (REPO / path).is_file(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (REPO / path).read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, link
    goals = ("docs/guide/installation.md", "docs/guide/slurm.md", "docs/guide/analysis.md#paper",
             "docs/guide/own-method.md", "docs/reference/compress.md")  # first sweep ... API
    for goal in goals:
        assert any(link.startswith(goal) for link in links), goal
