"""``python -m lrsweep``: a Hydra app whose multirun launches every grid point through submitit.

Exit codes: 0 all ok, 1 a grid point failed, 2 a config error (nothing was launched). A sweep's
table and summary are printed by its launcher (lrsweep.sweep.outcome), a single run's here.
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

from lrsweep import sweep
from lrsweep.errors import ConfigError, did_you_mean
from lrsweep.validate import StopLaunch


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _task(cfg: DictConfig) -> str:
    """A single run (its row, table and summary; PointFailed when it failed), or a grid point of a
    sweep run by another Hydra launcher (lrsweep's own run points through lrsweep.sweep.worker)."""
    from lrsweep import job
    from lrsweep.identity import run_id
    from lrsweep.pack import Pack

    if HydraConfig.get().mode != RunMode.RUN:
        return job.sweep_point(cfg, Pack())
    point = sweep.Point(0, list(HydraConfig.get().overrides.task), cfg, run_id(cfg))
    if cfg.get("dry_run"):
        sweep.dry_run([point], {})
        return "dry_run"
    row = job.run(cfg)
    sweep.report(sweep.Outcome(point.results_dir, [point.run_id], 1, 0))
    if row.status != "ok":
        raise sweep.PointFailed(row.run_id)
    return row.status


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


def _dry_run_dirs() -> str | None:
    """A dry run writes nothing: Hydra's run/sweep dirs go to a temporary dir, removed at exit."""
    if not any(a.lower().lstrip("+") in ("dry_run=true", "dry_run=1") for a in sys.argv[1:]):
        return None
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="lrsweep-dry-run-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    sys.argv += [f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/sweep"]
    return tmp


def main() -> None:
    import signal

    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, to print them in one line
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the launch as Ctrl-C does
    verbose = any(a.lower() in ("verbose=true", "verbose=1") for a in sys.argv[1:])
    _dry_run_dirs()
    try:
        try:
            _task()
        except StopLaunch as stop:  # raised by lrsweep.validate.ValidateCallback
            raise stop.error from None
        except sweep.PointFailed:  # a failed point's JobReturn, raised by Hydra: the summary said which
            sys.exit(1)
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
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a sweep has cancelled its jobs and said what ran
        print("lrsweep: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        from lrsweep import disk

        if verbose or not disk.is_full(e):
            raise
        print(f"lrsweep: {disk.no_space(e)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
