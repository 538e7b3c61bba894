"""``python -m lrsweep.rekey <results_dir>``: give rows written under the earlier run identity their run_id now.

Before the device type was part of the identity, a GPU run had its CPU run's id, and
``save_compressed=true`` changed the id. A row whose id is that earlier one (its recorded config
hashed without the device, with save_compressed as set) moves to its id now
(:func:`lrsweep.identity.run_id` of the config on the row's device); CPU rows without
save_compressed have the same id under both and stay. Rows written before the quantizer's grid rule
(``method.grid``) was an option keep the id of ``method.grid=narrow``, which they computed; those
with ``method.scheme=uniform``, whose numbers no grid rule changes, move to the id at the default.
A row is not moved onto an existing one, nor when its device is unknown (failed before choosing it
on ``device=auto``). ``--dry-run`` lists the moves.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lrsweep import identity
from lrsweep.row import ResultRow, read_row, row_path, rows_dir, write_row


def earlier_id(cfg: DictConfig) -> str:
    """The run_id before the device type was part of it and save_compressed was not."""
    experiment = identity.experiment_config(OmegaConf.merge(cfg, {"device": "cpu"}))
    if "save_compressed" in cfg:
        experiment["save_compressed"] = cfg.save_compressed
    return identity.digest(experiment)


def new_id(row: ResultRow) -> str | None:
    """The row's run_id now when it is keyed by the earlier identity and that differs; else None."""
    device = row.device or str(row.config.get("device", ""))
    if not row.config or device in ("", "auto"):
        return None
    cfg = OmegaConf.create({**row.config, "device": device})
    if row.run_id not in (earlier_id(cfg), identity.run_id(cfg)):
        return None
    new = identity.run_id(default_grid(cfg))
    return None if new == row.run_id else new


def default_grid(cfg: DictConfig) -> DictConfig:
    """``cfg`` at the quantizer's default grid rule and observer when it was written before they were
    options (no ``method.grid``: the narrow grid) and its numbers cannot depend on them (scheme
    ``uniform``: per-tensor min/max, untouched by the symmetric grid's rule); else ``cfg`` itself."""
    from lrsweep.methods import REGISTRY, QuantizerOptions

    method = cfg.get("method")
    spec = REGISTRY.get(str(method.get("name"))) if isinstance(method, DictConfig) else None
    if (spec is None or spec.option_type is None or not issubclass(spec.option_type, QuantizerOptions)
            or "grid" in method or method.get("scheme") != "uniform"):
        return cfg
    defaults = spec.option_type()
    return OmegaConf.merge(cfg, {"method": {"grid": defaults.grid, "observer": defaults.observer}})


def rekey(results_dir: str | os.PathLike, dry_run: bool = False) -> list[tuple[str, str, str]]:
    """(old id, new id, what happened) for every row keyed by the earlier identity."""
    out = []
    for path in sorted(rows_dir(results_dir).glob("*.json")) if rows_dir(results_dir).is_dir() else []:
        row = read_row(path)
        new = new_id(row)
        if new is None:
            continue
        old = row.run_id
        if row_path(results_dir, new).exists():
            out.append((old, new, "kept: a row with the new id exists"))
            continue
        if not dry_run:
            row.run_id, row.run_name = new, row.run_name.removesuffix(old) + new
            write_row(results_dir, row)
            Path(path).unlink()
        out.append((old, new, "would move" if dry_run else "moved"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrsweep.rekey", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir")
    ap.add_argument("--dry-run", action="store_true", help="list the moves, change nothing")
    args = ap.parse_args(argv)
    moves = rekey(args.results_dir, args.dry_run)
    for old, new, what in moves:
        print(f"{old} -> {new}: {what}")
    moved = sum(what != "kept: a row with the new id exists" for _, _, what in moves)
    print(f"{moved} rows {'to move' if args.dry_run else 'moved'}, the others keep their run_id")
    return 0


if __name__ == "__main__":
    sys.exit(main())
