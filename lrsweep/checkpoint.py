"""What a preempted grid point leaves for its requeued self.

A SLURM job of a sweep is a submitit Checkpointable: on USR2 (preemption, or the time limit
approaching) the launcher's ``checkpoint`` records the state of the grid point running in
that process — its stage and the job id — in ``<results_dir>/checkpoints/<run_id>.json``, and
submitit requeues the job. The requeued job reruns the point from scratch (compressing one
model takes minutes, not hours) and its row carries ``extra["requeues"]`` and the stages at
which earlier attempts were stopped; the file is removed once the row is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lrsweep import atomic, slurm
from lrsweep.row import now

# the grid point running in this process: results_dir, run_id, stage (set by lrsweep.job)
STATE: dict[str, Any] = {}


def path(results_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(results_dir) / "checkpoints" / f"{run_id}.json"


def attempts(results_dir: str | os.PathLike, run_id: str) -> list[dict[str, Any]]:
    """The earlier, interrupted attempts of this grid point (oldest first)."""
    p = path(results_dir, run_id)
    try:
        return json.loads(p.read_text())["attempts"]
    except (OSError, ValueError, KeyError):
        return []


def begin(results_dir: str | os.PathLike, run_id: str) -> dict[str, Any]:
    """Start tracking a grid point; return what its row should record about earlier attempts."""
    STATE.clear()
    STATE.update(results_dir=str(results_dir), run_id=run_id, stage="start")
    earlier = attempts(results_dir, run_id)
    if not earlier:
        return {}
    return {"requeues": len(earlier), "interrupted": [{k: a.get(k) for k in ("job_id", "stage", "at")} for a in earlier]}


def stage(name: str, **details: Any) -> None:
    """Record how far the running grid point got (read by :func:`save` on preemption)."""
    if STATE:
        STATE.update(stage=name, **details)


def save(reason: str) -> Path | None:
    """Append the running point's state to its checkpoint file (atomically); None if no point runs."""
    if not STATE.get("run_id"):
        return None
    record = {k: v for k, v in STATE.items() if k not in ("results_dir", "run_id")}
    record.update(job_id=slurm.job_id(), reason=reason, at=now())
    data = {"run_id": STATE["run_id"], "attempts": [*attempts(STATE["results_dir"], STATE["run_id"]), record]}
    return atomic.write_json(path(STATE["results_dir"], STATE["run_id"]), data)


def clear(results_dir: str | os.PathLike, run_id: str) -> None:
    """The row is written: the attempts are in it, drop the file."""
    path(results_dir, run_id).unlink(missing_ok=True)
    STATE.clear()
