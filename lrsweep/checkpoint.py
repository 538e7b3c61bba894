"""What a preempted grid point leaves for its requeued self.

A SLURM job of a sweep is a submitit Checkpointable: on USR2 (preemption, or the time limit
approaching) the launcher's ``checkpoint`` saves the :class:`Attempt` of the grid point running in
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


def path(results_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(results_dir) / "checkpoints" / f"{run_id}.json"


def attempts(results_dir: str | os.PathLike, run_id: str) -> list[dict[str, Any]]:
    """The earlier, interrupted attempts of this grid point (oldest first)."""
    p = path(results_dir, run_id)
    try:
        return json.loads(p.read_text())["attempts"]
    except (OSError, ValueError, KeyError):
        return []


class Attempt:
    """One attempt at a grid point: how far it got (:meth:`stage`), saved on preemption (:meth:`save`)."""

    def __init__(self, results_dir: str | os.PathLike, run_id: str):
        self.results_dir, self.run_id = str(results_dir), run_id
        self.state: dict[str, Any] = {"stage": "start"}

    def earlier(self) -> dict[str, Any]:
        """What the row records about earlier, interrupted attempts ({} when there were none)."""
        earlier = attempts(self.results_dir, self.run_id)
        if not earlier:
            return {}
        return {"requeues": len(earlier),
                "interrupted": [{k: a.get(k) for k in ("job_id", "stage", "at")} for a in earlier]}

    def stage(self, name: str, **details: Any) -> None:
        """Record how far the point got."""
        self.state.update(stage=name, **details)

    def save(self, reason: str) -> Path:
        """Append this attempt's state to the point's checkpoint file (atomically)."""
        record = {**self.state, "job_id": slurm.job_id(), "reason": reason, "at": now()}
        data = {"run_id": self.run_id, "attempts": [*attempts(self.results_dir, self.run_id), record]}
        return atomic.write_json(path(self.results_dir, self.run_id), data)

    def clear(self) -> None:
        """The row is written: the attempts are in it, drop the file."""
        path(self.results_dir, self.run_id).unlink(missing_ok=True)
