"""``python -m lrsweep.rekey <results_dir>``: move rows written under an earlier identity to their run_id now.

A row's run_id hashes its config with the row schema's version (lrsweep.identity), so a new version
changes every run_id and a sweep would rerun the rows written before. This migration gives each row
of an earlier schema its config as written now (:data:`SCHEMA_1`; :data:`SCHEMA_2` for the keys added
since, which a schema-2 row written before them lacks too) and the run_id that config has
now (the device type that ran it, for ``device=auto``), moves the row there and sets its
schema_version. A row is not moved onto an existing one, nor when its device is unknown (it failed
before choosing one on ``device=auto``); a row already keyed by its config stays. ``--dry-run``
lists the moves. Running it again changes nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lrsweep import identity
from lrsweep.row import SCHEMA_VERSION, ResultRow, load_row, row_path, rows_dir, write_row

# What a schema-1 row's config meant by a key it lacks (keys added while rows had schema 1, each with
# the value that ran as before it existed); method options only for the methods that take them.
SCHEMA_1: dict[str, Any] = {"param_ratio": None, "allocation": "uniform",
                            "eval.ppl_drop_last": False, "eval.ppl_bos": False, "eval.probe_refit": False,
                            "calib.sampling": "stream", "calib.bos": False, "calib.fisher": "batch",
                            "method.solver": "exact", "method.side": "output", "method.power": 0.5,
                            "method.update": False,  # svdllm's layer-wise update
                            # the quantizer's symmetric grid before method.grid: absmax / (2^(b-1) - 1)
                            "method.grid": "narrow", "method.observer": "absmax"}

# What a row's config meant by a key added while rows have schema 2 (a row of schema 1 or 2 without it
# was written before it existed): gptq's scale search (observer mse; gptq, lqer, caldera) minimized
# the plain squared error. A row without the search (observer absmax; grid best came with the key)
# computed what the default computes.
SCHEMA_2: dict[str, Any] = {"method.scale_error": "weight"}

KEPT, UNKNOWN = "kept: a row with the new id exists", "left: device=auto and no device recorded"


def current_config(row: ResultRow) -> dict[str, Any]:
    """The row's config as written under the current schema."""
    config = copy.deepcopy(row.config)
    spec = _builtin(config.get("method"))
    options, defaults = (spec.options() or set(), spec.defaults()) if spec else (set(), {})
    for path, value in {**(SCHEMA_1 if row.schema_version < 2 else {}), **SCHEMA_2}.items():
        *parents, leaf = path.split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf in node or (parents == ["method"] and leaf not in options):
            continue
        if path == "method.grid" and node.get("scheme") == "uniform":
            value = defaults["grid"]  # min/max grids: no grid rule changes their numbers
        if path == "method.scale_error" and node.get("observer") != "mse":
            value = defaults["scale_error"]  # no scale search ran
        node[leaf] = value
    return config


def _builtin(method: Any) -> Any:
    """The built-in whose base config ``method/<name>`` composes (whatever its ``_target_``); None for
    another name (``method=custom``: only the options it was given)."""
    from lrsweep.methods import REGISTRY

    spec = REGISTRY.get(str(method.get("name"))) if isinstance(method, dict) else None
    return spec if spec is not None and spec.builtin else None


def current_id(row: ResultRow, config: dict[str, Any]) -> str | None:
    """The run_id of ``config`` (the row's, as written now) on the device that ran it; None when unknown."""
    cfg = OmegaConf.create(config)
    device = row.device.split(":")[0] or None
    if str(cfg.get("device", "cpu")) == "auto" and device is None:
        return None
    return identity.run_id(cfg, auto_device=device)


def rekey(results_dir: str | os.PathLike, dry_run: bool = False) -> list[tuple[str, str, str]]:
    """(old id, new id, what happened) for every row whose run_id is not its config's now."""
    out, taken = [], set()
    paths = sorted(rows_dir(results_dir).glob("*.json")) if rows_dir(results_dir).is_dir() else []
    for path in paths:
        row = load_row(path)  # a damaged row is reported and left where it is
        if row is None or not row.config:
            continue
        config = current_config(row)
        new, old = current_id(row, config), row.run_id
        if new is None:
            out.append((old, "?", UNKNOWN))
            continue
        if new == old and row.schema_version == SCHEMA_VERSION:
            continue
        if new != old and (row_path(results_dir, new).exists() or new in taken):
            out.append((old, new, KEPT))
            continue
        taken.add(new)
        if not dry_run:
            row.run_id, row.run_name = new, row.run_name.removesuffix(old) + new
            row.config, row.schema_version = config, SCHEMA_VERSION
            write_row(results_dir, row)
            if new != old:
                Path(path).unlink()
        out.append((old, new, ("would move" if dry_run else "moved") if new != old else "schema updated"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrsweep.rekey", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir")
    ap.add_argument("--dry-run", action="store_true", help="list the moves, change nothing")
    args = ap.parse_args(argv)
    moves = rekey(args.results_dir, args.dry_run)
    for old, new, what in moves:
        print(f"{old} -> {new}: {what}")
    moved = sum(what in ("moved", "would move") for _, _, what in moves)
    print(f"{moved} rows {'to move' if args.dry_run else 'moved'}, the others keep their run_id")
    return 0


if __name__ == "__main__":
    sys.exit(main())
