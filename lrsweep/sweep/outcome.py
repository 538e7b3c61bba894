"""What a sweep tells its user: the dry run's list of points, and the end-of-sweep table, plot path and
summary line (``N ok, N failed, N skipped``)."""

from __future__ import annotations

import importlib
import shlex
import statistics
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn

from lrsweep.row import ResultRow, read_row, read_rows, row_path, row_status
from lrsweep.sweep.planning import Point
from lrsweep.disk import is_full, no_space


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
    todo: list[str] = field(default_factory=list)  # the run_ids submitted
    since: str = ""  # when the jobs were submitted (rows written since are this launch's)
    cancelled: bool = False  # interrupted (Ctrl-C, SIGTERM): the jobs were cancelled
    no_space: list[str] = field(default_factory=list)  # one line per full disk met


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


def estimates(rows: list[ResultRow]) -> dict[tuple[str, str], float]:
    """(model, method) -> median wall_seconds of its ok rows: one pass over the rows."""
    times: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.status == "ok" and r.wall_seconds is not None:
            times.setdefault((r.model, r.method), []).append(r.wall_seconds)
    return {key: statistics.median(t) for key, t in times.items()}


def estimate(by_kind: dict[tuple[str, str], float], cfg: Mapping[str, Any]) -> float | None:
    """The point's estimated seconds (:func:`estimates` of its model and method); None when unknown.
    ``cfg``: its config or resolved config (lrsweep.identity.resolved)."""
    return by_kind.get((str(cfg["model"]["name"]), str(cfg["method"]["name"])))


def dry_run(points: list[Point], active: dict[str, str]) -> None:
    """Print every point's run_id, status, estimated seconds and overrides, and the total; run nothing."""
    results_dir = points[0].results_dir
    rows = list(read_rows(results_dir)) if Path(results_dir).is_dir() else []
    by_id = {r.run_id: r for r in rows}
    by_kind = estimates(rows)
    total, unknown, counts = 0.0, 0, {}
    print(f"[lrsweep] dry run: {len(points)} grid points, results in {results_dir}")
    print(f"{'#':>4}  {'run_id':<12}  {'status':<18}  {'est. s':>8}  overrides")
    for p in points:
        row = by_id.get(p.run_id)
        status = "queued-or-running" if p.run_id in active else (row.status if row else "missing")
        if status == "ok" and p.get("force"):
            status = "ok (force: rerun)"
        counts[status] = counts.get(status, 0) + 1
        est = estimate(by_kind, p.resolved)
        runs = status not in ("ok", "queued-or-running")
        if runs and est is None:
            unknown += 1
        elif runs:
            total += est
        shown = "unknown" if est is None else f"{est:.1f}"
        print(f"{p.index:>4}  {p.run_id:<12}  {status:<18}  {shown:>8}  {p.describe()}")
    print(f"[lrsweep] dry run: {', '.join(f'{n} {s}' for s, n in counts.items())}; to run: about {total:.0f} s "
          f"of job time" + (f" + {unknown} points of unknown time" if unknown else "") + "; nothing was launched")


def rerun_command() -> str:
    """The command line that started this process, to run again."""
    return shlex.join(["python", "-m", "lrsweep", *sys.argv[1:]])


def cancelled(out: Outcome) -> int:
    """The summary of an interrupted sweep (ok, failed, cancelled) and its rerun command; 130."""
    counts = {"ok": 0, "failed": 0, "cancelled": 0}
    for rid in out.todo:
        try:
            row = read_row(row_path(out.results_dir, rid))
        except (OSError, ValueError, TypeError):
            row = None
        if row is None or (row.finished_at or "") < out.since:
            counts["cancelled"] += 1
        else:
            counts["ok" if row.status == "ok" else "failed"] += 1
    print(f"[lrsweep] interrupted: {counts['ok']} ok, {counts['failed']} failed, {counts['cancelled']} cancelled, "
          f"{out.skipped} skipped; results in {out.results_dir}")
    print(f"[lrsweep] to finish the sweep: {rerun_command()}", flush=True)
    return 130


def report(out: Outcome, prefetch: Prefetch | None = None) -> int:
    """Print the sweep's table, plot path and summary line; return the exit code (1: a point failed
    or a disk was full, 130: interrupted)."""
    if out.dry_run:
        return 0
    if out.cancelled:
        return cancelled(out)
    if out.detached:
        print(f"[lrsweep] detached: {len(out.job_ids)} jobs submitted ({', '.join(out.job_ids)}) for "
              f"{out.submitted} points, {out.skipped} already ok; logs in {out.submitit_folder}; "
              f"results in {out.results_dir}")
        print(f"[lrsweep] progress: python -m lrsweep.status {out.results_dir}")
        return 0
    statuses = [row_status(out.results_dir, rid) for rid in out.run_ids]
    ok, failed = statuses.count("ok"), len(statuses) - statuses.count("ok")
    rows = [read_row(row_path(out.results_dir, rid)) for rid, s in zip(out.run_ids, statuses, strict=True) if s]
    if prefetch is not None:
        prefetch.wait()
    if rows:
        from analysis.summary import print_summary

        try:
            print_summary(rows, out.results_dir)
        except OSError as e:  # the plot did not fit: none rather than a truncated one
            if not is_full(e):
                raise
            plot = Path(out.results_dir) / "tradeoff.png"
            for path in (plot, plot.with_suffix(".pdf")):
                path.unlink(missing_ok=True)
            if not out.no_space:  # else the disk the rows did not fit on was named already
                out.no_space.append(no_space(e, plot) + "; no plot")
    for r in rows:
        if r.status != "ok" and r.error:
            print(f"[lrsweep] failed {r.run_id} ({r.run_name}): {r.error['type']}: {r.error['message']}")
    for line in out.no_space:
        print(f"lrsweep: {line}", file=sys.stderr)
    print(f"{ok - out.skipped} ok, {failed} failed, {out.skipped} skipped")
    if out.no_space:
        print(f"[lrsweep] once there is space, rerun the points without an ok row: {rerun_command()}")
    return 1 if failed or out.no_space else 0
