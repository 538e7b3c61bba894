"""What a sweep tells its user: the dry run's list of points, and the end-of-sweep table, plot path and
summary line (``N ok, N failed, N skipped``)."""

from __future__ import annotations

import importlib
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.utils import JobReturn
from omegaconf import DictConfig

from lrsweep.row import ResultRow, read_row, read_rows, row_path, row_status
from lrsweep.sweep.planning import Point


@dataclass
class Outcome:
    """What a sweep (or a single run) did: its points' run_ids, how many were submitted and skipped,
    the jobs, and the points' JobReturns in grid order."""

    results_dir: str
    run_ids: list[str]
    submitted: int = 0
    skipped: int = 0
    job_ids: list[str] = field(default_factory=list)
    submitit_folder: str = ""
    detached: bool = False
    dry_run: bool = False
    returns: list[JobReturn] = field(default_factory=list)


class Prefetch:
    """Imports the modules of the end-of-sweep table and plot (pandas, matplotlib) in a thread while the
    last jobs run; :meth:`wait` before the main thread imports anything (two threads importing the same
    modules can deadlock on their import locks)."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=importlib.import_module, args=("analysis.summary",), daemon=True,
                                           name="lrsweep-prefetch-report")
            self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


def estimate(rows: list[ResultRow], cfg: DictConfig) -> float | None:
    """Median wall_seconds of the ok rows of the same model and method; None when there is none."""
    times = [r.wall_seconds for r in rows if r.status == "ok" and r.wall_seconds is not None
             and r.model == str(cfg.model.name) and r.method == str(cfg.method.name)]
    return statistics.median(times) if times else None


def dry_run(points: list[Point], active: dict[str, str]) -> None:
    """Print every point's run_id, status, estimated seconds and overrides, and the total; run nothing."""
    results_dir = points[0].results_dir
    rows = list(read_rows(results_dir)) if Path(results_dir).is_dir() else []
    by_id = {r.run_id: r for r in rows}
    total, unknown, counts = 0.0, 0, {}
    print(f"[lrsweep] dry run: {len(points)} grid points, results in {results_dir}")
    print(f"{'#':>4}  {'run_id':<12}  {'status':<18}  {'est. s':>8}  overrides")
    for p in points:
        row = by_id.get(p.run_id)
        status = "queued-or-running" if p.run_id in active else (row.status if row else "missing")
        if status == "ok" and p.cfg.get("force"):
            status = "ok (force: rerun)"
        counts[status] = counts.get(status, 0) + 1
        est = estimate(rows, p.cfg)
        runs = status not in ("ok", "queued-or-running")
        if runs and est is None:
            unknown += 1
        elif runs:
            total += est
        shown = "unknown" if est is None else f"{est:.1f}"
        print(f"{p.index:>4}  {p.run_id:<12}  {status:<18}  {shown:>8}  {p.describe()}")
    print(f"[lrsweep] dry run: {', '.join(f'{n} {s}' for s, n in counts.items())}; to run: about {total:.0f} s "
          f"of job time" + (f" + {unknown} points of unknown time" if unknown else "") + "; nothing was launched")


def report(out: Outcome, prefetch: Prefetch | None = None) -> int:
    """Print the sweep's table, plot path and summary line; return the exit code (1: a point failed)."""
    if out.dry_run:
        return 0
    if out.detached:
        print(f"[lrsweep] detached: {len(out.job_ids)} jobs submitted ({', '.join(out.job_ids)}) for "
              f"{out.submitted} points, {out.skipped} already ok; logs in {out.submitit_folder}; "
              f"results in {out.results_dir}")
        print(f"[lrsweep] progress: python -m lrsweep.status {out.results_dir}")
        return 0
    statuses = [row_status(out.results_dir, rid) for rid in out.run_ids]
    ok, failed = statuses.count("ok"), len(statuses) - statuses.count("ok")
    rows = [read_row(row_path(out.results_dir, rid)) for rid, s in zip(out.run_ids, statuses) if s]
    if prefetch is not None:
        prefetch.wait()
    if rows:
        from analysis.summary import print_summary

        print_summary(rows, out.results_dir)
    for r in rows:
        if r.status != "ok" and r.error:
            print(f"[lrsweep] failed {r.run_id} ({r.run_name}): {r.error['type']}: {r.error['message']}")
    print(f"{ok - out.skipped} ok, {failed} failed, {out.skipped} skipped")
    return 1 if failed else 0
