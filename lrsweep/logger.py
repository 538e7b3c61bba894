"""W&B logging of a finished row: one run per grid point, offline unless configured otherwise.

The run's config is the resolved config, its summary the row's scalars (the same schema as
the JSON row). ``WANDB_MODE`` in the environment wins over ``logger.mode``. The API key is
never read, printed or stored here: wandb takes it from its own settings when online.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from lrsweep.row import ResultRow


def log_row(cfg: DictConfig, row: ResultRow) -> str | None:
    """Log ``row`` as one W&B run; returns the run's directory (None when logging is off)."""
    lcfg = cfg.logger
    if lcfg.name == "none":
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE") or lcfg.mode
    wandb_dir = Path(os.path.abspath(str(lcfg.dir)))
    wandb_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(project=lcfg.project, entity=lcfg.get("entity"), group=row.sweep or None,
                         name=row.run_name, job_type=row.method, tags=list(lcfg.get("tags") or []),
                         config=row.config, mode=mode, dir=str(wandb_dir), reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True))
        run.summary.update(row.summary())
        run.summary["layer_errors"] = row.layer_errors
        run_dir = str(Path(run.dir).parent)
        run.finish(exit_code=0 if row.status == "ok" else 1)
        return run_dir
    except Exception as e:  # the row is already on disk: report, do not fail the job
        print(f"[lrsweep] W&B logging failed for {row.run_id}: {type(e).__name__}: {e}")
        return None
