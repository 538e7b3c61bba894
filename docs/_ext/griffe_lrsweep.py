"""A griffe extension for lrsweep's API pages (mkdocstrings-python loads it; see mkdocs.yml).

lrsweep documents dataclass fields with a trailing comment (``rank: int = 32  # per-layer rank``)
and writes Sphinx roles (``:func:`x```) in docstrings. Without changing the code, this extension
- takes a field's trailing comment as its docstring when it has none,
- gives an options dataclass without a docstring the first line of its method module's docstring,
- renders Sphinx roles as code spans (``:func:`lrsweep.quant.f``` -> `lrsweep.quant.f`).
"""

from __future__ import annotations

import io
import re
import tokenize
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def _plain(text: str) -> str:
    return ROLE.sub(lambda m: f"`{m.group(1)}`", text)


def trailing_comment(line: str) -> str | None:
    """The comment ending a line of code, if any (tokenized: a ``#`` in a string is none)."""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip() or None
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    return None


class LrsweepDocs(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _plain(obj.docstring.value)

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        lines = attr.lines  # the attribute's source lines
        comment = trailing_comment(lines[-1]) if lines else None
        if comment:
            attr.docstring = griffe.Docstring(_plain(comment), lineno=attr.lineno, parent=attr)

    def on_class_instance(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        module = cls.module
        if cls.docstring is None and cls.name.endswith("Options") and module.docstring is not None:
            summary = module.docstring.value.strip().splitlines()[0]
            name = module.name
            text = f"Options of method `{name}`: {_plain(summary)}"
            head = next((ln for ln in cls.lines if ln.lstrip().startswith("class ")), "")
            comment = trailing_comment(head)
            if comment:
                text += f"\n\n{_plain(comment)}"
            cls.docstring = griffe.Docstring(text, lineno=cls.lineno, parent=cls)
