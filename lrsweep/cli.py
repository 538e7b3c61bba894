"""``python -m lrsweep``: a Hydra app whose multirun launches every grid point through submitit.

Exit codes: 0 all ok, 1 a grid point failed, 2 a config error (nothing was launched).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.lrsweep_launcher import launcher  # registers the launcher configs
from lrsweep.errors import ConfigError, did_you_mean
from lrsweep.validate import StopLaunch


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _task(cfg: DictConfig) -> str:
    from lrsweep import job
    from lrsweep.identity import run_id

    if HydraConfig.get().mode == RunMode.RUN:
        launcher.LAST = launcher.SweepOutcome(os.path.abspath(str(cfg.results_dir)), [run_id(cfg)], 1, 0)
        return job.run(cfg).status
    try:
        return job.run(cfg).status
    except ConfigError as e:  # inside a sweep job (e.g. no GPU on this node): a failed row
        from lrsweep.row import write_row

        row = job.new_row(cfg)
        row.error = {"type": "ConfigError", "message": str(e), "traceback": ""}
        write_row(os.path.abspath(str(cfg.results_dir)), row)
        return "failed"


def _one_line(e: BaseException) -> str:
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        return str(ConfigError(group or "config", f"{name!r} is unknown{did_you_mean(name, e.options)}", e.options))
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    hint = _swept_group_hint(lines[0]) if lines else None
    if hint:
        return hint
    return " ".join(lines[:2]) if lines else type(e).__name__


def _swept_group_hint(message: str) -> str | None:
    """Hydra composes a sweep's master config without the swept config groups, so ``heal=distill,dsee
    heal.steps=5`` fails there (heal defaults to null) though it is fine in every job: ``++`` works in both."""
    m = re.match(r"Could not override '([^']+)'", message)
    if not m or not any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        return None
    key = m.group(1)
    group = key.split(".")[0]
    if not any(re.fullmatch(rf"\+?{group}=[^=]*,.*", a) for a in sys.argv[1:]):
        return None
    value = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"{key}=")), "...")
    return str(ConfigError(key, f"belongs to the config group {group!r} swept in this command; set it with "
                           f"++{key}={value} (Hydra composes the sweep's base config without swept groups)"))


def report() -> int:
    """Print the sweep's table, plot path and summary line; return the exit code."""
    out = launcher.LAST
    if out is None:
        return 0
    from lrsweep.row import row_path, read_row, row_status

    if out.detached:
        print(f"[lrsweep] detached: {out.submitted} jobs submitted ({', '.join(out.job_ids)}), "
              f"{out.skipped} already ok; logs in {out.submitit_folder}; results in {out.results_dir}")
        print(f"[lrsweep] progress: python -m lrsweep.status {out.results_dir}")
        return 0
    statuses = [row_status(out.results_dir, rid) for rid in out.run_ids]
    ok, failed = statuses.count("ok"), len(statuses) - statuses.count("ok")
    rows = [read_row(row_path(out.results_dir, rid)) for rid, s in zip(out.run_ids, statuses) if s]
    if rows:
        from analysis.summary import print_summary

        print_summary(rows, out.results_dir)
    for r in rows:
        if r.status != "ok" and r.error:
            print(f"[lrsweep] failed {r.run_id} ({r.run_name}): {r.error['type']}: {r.error['message']}")
    print(f"{ok - out.skipped} ok, {failed} failed, {out.skipped} skipped")
    return 1 if failed else 0


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, to print them in one line
    verbose = any(a.lower() in ("verbose=true", "verbose=1") for a in sys.argv[1:])
    try:
        try:
            _task()
        except StopLaunch as stop:  # raised by lrsweep.validate.ValidateCallback
            raise stop.error from None
    except ConfigError as e:
        if verbose:
            raise
        print(f"lrsweep: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        if verbose:
            raise
        print(f"lrsweep: config error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(report())
