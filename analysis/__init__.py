"""Result rows → pandas → tables and figures."""

from analysis.load import load

__all__ = ["load"]
