"""W&B logging of a finished row: one run per grid point, offline unless configured otherwise.

The run's config is the resolved config, its summary the row's scalars (the same schema as
the JSON row). ``WANDB_MODE`` in the environment wins over ``logger.mode``. The API key is
never read, printed or stored here: wandb takes it from its own settings when online.

Unless ``logger.system_info`` is true, a run records no requirements.txt, git state, machine info
or system metrics (collecting them cost ~0.7 s per run, mostly listing every installed package;
the row has ``versions``, ``git_sha`` and ``host``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from lrsweep.row import ResultRow

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> None:
    """Import wandb and start its service ahead of the first run (a job does it while it waits for
    a sibling job's timing); a problem is left for :func:`log_row` to report."""
    if cfg.logger.name == "none" or (os.environ.get("WANDB_MODE") or cfg.logger.mode) == "disabled":
        return
    try:
        import wandb

        wandb.setup()
    except Exception as e:
        log.debug(f"[lrsweep] W&B not prepared ahead: {type(e).__name__}: {e}")


def log_row(cfg: DictConfig, row: ResultRow) -> str | None:
    """Log ``row`` as one W&B run; returns the run's directory (None when logging is off)."""
    lcfg = cfg.logger
    if lcfg.name == "none":
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE") or lcfg.mode
    quiet = {} if lcfg.get("system_info", False) else \
        {"x_save_requirements": False, "disable_git": True, "x_disable_machine_info": True, "x_disable_stats": True}
    wandb_dir = Path(os.path.abspath(str(lcfg.dir)))
    wandb_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(project=lcfg.project, entity=lcfg.get("entity"), group=row.sweep or None,
                         name=row.run_name, job_type=row.method, tags=list(lcfg.get("tags") or []),
                         config=row.config, mode=mode, dir=str(wandb_dir), reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True, **quiet))
        for step, loss in (row.extra.get("heal") or {}).get("loss_curve", []):  # the healing fine-tune's curve
            run.log({"heal/loss": loss}, step=int(step))
        run.summary.update(row.summary())
        run.summary["layer_errors"] = row.layer_errors
        run.summary["task_metrics"], run.summary["task_metrics_dense"] = row.task_metrics, row.task_metrics_dense
        run_dir = str(Path(run.dir).parent)
        run.finish(exit_code=0 if row.status == "ok" else 1)
        return run_dir
    except Exception as e:  # the row is already on disk: report, do not fail the job
        log.warning(f"[lrsweep] W&B logging failed for {row.run_id}: {type(e).__name__}: {e}")
        return None


def read_offline_run(run_dir: str | Path) -> dict:
    """Read back what an offline W&B run recorded: {"run_id", "name", "group", "config", "summary",
    "history" (the logged steps, in order)}.

    wandb writes no summary json offline; the records live in ``run-*.wandb``, a LevelDB-style
    log (7-byte file header, 32 KiB blocks, records with a 7-byte header: crc32, length,
    type) of protobuf ``Record`` messages. Later summary/config updates override earlier ones.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    path = next(Path(run_dir).glob("run-*.wandb"))
    raw = path.read_bytes()
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL / FIRST
            pending = data
        elif kind in (3, 4):  # MIDDLE / LAST
            pending += data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    out: dict = {"config": {}, "summary": {}, "history": []}

    def items(update) -> dict:
        return {(u.key or ".".join(u.nested_key)): json.loads(u.value_json) for u in update}

    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group,
                       project=rec.run.project)
            out["config"].update(items(rec.run.config.update))
            out["summary"].update(items(rec.run.summary.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
        elif kind == "history":
            out["history"].append(items(rec.history.item))
    out["config"].pop("_wandb", None)
    return out
