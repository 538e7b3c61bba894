"""Errors that end a launch before any job starts (exit code 2)."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A bad config value: names the key, the bad value and what would be valid."""

    def __init__(self, key: str, message: str, valid: Iterable[object] | None = None):
        self.key = key
        text = f"{key}: {message}"
        if valid is not None:
            text += f" (valid: {', '.join(str(v) for v in valid)})"
        super().__init__(text)


def did_you_mean(value: str, options: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
