"""Auto-packed jobs share their points (lrsweep.sweep.worker.run_pack with peers): a job done with its own
points takes over its siblings' unstarted ones, waits for its own points a sibling holds, and the
launcher never writes a dead job's failed row for a point a live sibling is running. Siblings are
forked processes holding a point's claim; a point's run is a fake that writes its row."""

from __future__ import annotations

import multiprocessing as mp
from types import SimpleNamespace

import pytest
import submitit
from omegaconf import OmegaConf

from lrsweep import sweep
from lrsweep.pack import Pack
from lrsweep.sweep import returns, worker
from lrsweep.row import ResultRow, now, read_row, row_path, write_row

FORK = mp.get_context("fork")


def point(tmp_path, i: int, model: str = "m") -> sweep.Point:
    cfg = OmegaConf.create({"results_dir": str(tmp_path / "results"), "model": model,
                            "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    return sweep.Point(i, [f"rank={i}"], cfg, f"run{i:02d}")


def ok_row(p: sweep.Point, by: str, finished_at: str | None = None) -> ResultRow:
    write_row(p.results_dir, ResultRow(run_id=p.run_id, status="ok", finished_at=finished_at or now(),
                                       extra={"by": by}))
    return read_row(row_path(p.results_dir, p.run_id))


@pytest.fixture
def job(monkeypatch):
    """run_pack in this process as job 0 of the launch; returns the points it ran, in order."""
    ran = []

    def fake_run(launcher, pack, p, job_id, since):
        ran.append(p.index)
        return returns.job_return(p, ok_row(p, "me"), job_id)

    monkeypatch.setattr(worker, "run_point", fake_run)
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: SimpleNamespace(job_id="7"))
    monkeypatch.setattr("lrsweep.job.dense_key", lambda cfg: str(cfg.model))
    return ran


def hold(p: sweep.Point, since: str, ready, release, write: bool) -> None:
    """A sibling job running ``p``: holds its claim until released, writes its row unless it 'dies'."""
    with worker.claimed(p, since, wait=True):
        ready.set()
        release.wait(30)
        if write:
            ok_row(p, "sibling")


def sibling(p: sweep.Point, since: str, write: bool = True):
    ready, release = FORK.Event(), FORK.Event()
    proc = FORK.Process(target=hold, args=(p, since, ready, release, write))
    proc.start()
    assert ready.wait(30)
    return proc, release


def test_a_job_done_with_its_points_takes_over_its_siblings_unstarted_ones_last_first(tmp_path, job):
    since = now()
    jobs = [[point(tmp_path, 0), point(tmp_path, 2)], [point(tmp_path, 1), point(tmp_path, 3), point(tmp_path, 5)],
            [point(tmp_path, 4, model="other")]]
    peers = worker.share_points(jobs)
    assert peers[2] is None and [len(sib) for _, sib in peers[:2]] == [1, 1]
    ok_row(jobs[1][0], "earlier", finished_at="2026-01-01T00:00:00")  # not this launch's row: run again
    proc, release = sibling(jobs[1][1], since)  # job 1 is running its second point
    try:
        out = worker.run_pack(SimpleNamespace(params={"timeout_min": 60}), Pack(), jobs[0], since, peers[0])
    finally:
        release.set()
        proc.join()
    # its own two, then job 1's points from the last: 5, (3 is held), 1; never the other model's 4
    assert job == [0, 2, 5, 1]
    assert [r.status.name for r in out] == ["COMPLETED", "COMPLETED"] and len(out) == 2
    assert read_row(row_path(jobs[1][1].results_dir, "run03")).extra["by"] == "sibling"


def test_no_takeover_past_the_jobs_time_limit_or_without_siblings(tmp_path, job):
    since = now()
    jobs = [[point(tmp_path, 0)], [point(tmp_path, 1)]]
    worker.run_pack(SimpleNamespace(params={"timeout_min": 0}), Pack(), jobs[0], since, worker.share_points(jobs)[0])
    assert job == [0]
    assert worker.share_points([[point(tmp_path, 2)], [point(tmp_path, 3, model="other")]]) == [None, None]


def test_a_job_knows_the_points_of_at_most_three_siblings_in_a_ring(tmp_path, job):
    jobs = [[point(tmp_path, i)] for i in range(6)]
    peers = worker.share_points(jobs)
    assert [[job[0].index for job in sib] for _, sib in peers] == [
        [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 0], [5, 0, 1], [0, 1, 2]]
    assert {largest for largest, _ in peers} == {1}


@pytest.mark.parametrize("writes", [True, False], ids=["sibling writes it", "sibling dies"])
def test_an_own_point_a_sibling_holds_is_waited_for_then_run_here_only_without_a_row(tmp_path, job, writes):
    since = now()
    pts = [point(tmp_path, 0), point(tmp_path, 1)]
    proc, release = sibling(pts[0], since, write=writes)
    FORK.Process(target=lambda: (__import__("time").sleep(0.5), release.set())).start()
    out = worker.run_pack(SimpleNamespace(params={"timeout_min": 60}), Pack(), pts, since)
    proc.join()
    assert job == ([1] if writes else [1, 0]) and [r.status.name for r in out] == ["COMPLETED"] * 2
    assert read_row(row_path(pts[0].results_dir, "run00")).extra["by"] == ("sibling" if writes else "me")


def test_a_dead_jobs_point_a_live_sibling_runs_gets_its_row_not_a_failed_one(tmp_path, monkeypatch):
    since = now()
    pts = [point(tmp_path, 0), point(tmp_path, 1)]
    dead = SimpleNamespace(job_id="9", done=lambda: True, results=lambda: (_ for _ in ()).throw(RuntimeError("killed")))
    written = []
    dead_row = lambda p, job, error: written.append(p.index) or ResultRow(run_id=p.run_id, status="failed")  # noqa: E731
    proc, release = sibling(pts[0], since)
    FORK.Process(target=lambda: (__import__("time").sleep(0.5), release.set())).start()
    out = returns.collect(pts, dead, since, dead_row, worker.claimed)
    proc.join()
    assert written == [1] and [r.status.name for r in out] == ["COMPLETED", "FAILED"]
