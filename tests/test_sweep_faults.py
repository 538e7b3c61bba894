"""A sweep's launcher side under faults, in-process with fakelaunch.py's fake launcher and jobs (the
real lrsweep.sweep code): directories it cannot write to (the preflight: exit 2 before any job), full
disks (one line, failed rows where they fit, no partial files, exit 1), Ctrl-C and SIGTERM (the jobs
cancelled, the summary, exit 130), and the dry run's one pass over existing rows. The e2e test at
the end interrupts a real local sweep's driver."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import ClassVar

import pytest

from fakelaunch import FakeExecutor, FakeJob
from faultlib.cli import TINY, env
from lrsweep import sweep
from lrsweep.errors import ConfigError
from lrsweep.row import ResultRow, now, read_rows, write_row
from lrsweep import disk
from lrsweep.sweep import outcome, space, submit

Usage = namedtuple("Usage", "total used free")


def full(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)


@pytest.fixture
def signals():
    """Restore SIGINT and SIGTERM after a test that interrupts a sweep (which makes a second one exit at once)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# ---------------------------------------------------------------- preflight
def test_rows_that_is_a_file_is_a_config_error_before_any_job(launch, tmp_path, monkeypatch, caplog):
    (tmp_path / "rows").write_text("not a directory")
    submitted = []
    monkeypatch.setattr(FakeExecutor, "submit", lambda self, *a: submitted.append(a))
    caplog.set_level(logging.WARNING)
    with pytest.raises(ConfigError, match=r"^results_dir: '.*/rows' is a file, not a directory"):
        launch({"rank": [4, 8]})
    assert submitted == []
    # the one line is the config error: no row exists there, so the skip check reports none as damaged
    assert "damaged row" not in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_rows_not_writable_is_a_config_error_before_any_job(launch, tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows").chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"^results_dir: '.*/rows' is not writable"):
            launch({"rank": [4, 8]})
    finally:
        (tmp_path / "rows").chmod(0o700)


def test_a_read_only_filesystem_is_named_as_such(tmp_path, monkeypatch):
    """A results dir on a read-only mount (root included: access(2) says EROFS): the line says so,
    not "permission denied"."""
    from types import SimpleNamespace

    monkeypatch.setattr(disk.os, "access", lambda *a, **k: False)
    monkeypatch.setattr(disk.os, "statvfs", lambda p: SimpleNamespace(f_flag=os.ST_RDONLY), raising=False)
    with pytest.raises(ConfigError, match=r"^results_dir: '.*/r' is not writable \(a read-only filesystem at '"):
        disk.check_dir("results_dir", str(tmp_path / "r"), 0, write=True)
    monkeypatch.setattr(disk.os, "statvfs", lambda p: SimpleNamespace(f_flag=0), raising=False)
    with pytest.raises(ConfigError, match=r"is not writable \(permission denied on '"):
        disk.check_dir("results_dir", str(tmp_path / "r"), 0, write=True)


def test_too_little_room_is_a_config_error_naming_the_path_and_free_space(launch, tmp_path, monkeypatch):
    real = disk.shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage",
                        lambda p: Usage(1 << 30, 0, 16 * 1024) if str(p).startswith(str(tmp_path)) else real(p))
    submitted = []
    monkeypatch.setattr(FakeExecutor, "submit", lambda self, *a: submitted.append(a))
    with pytest.raises(ConfigError, match=r"^results_dir: '.*' has 16.0 KB free; a sweep needs at least"):
        launch({"rank": [4, 8]})
    assert submitted == [] and not (tmp_path / "rows").exists()


def test_every_directory_of_every_point_that_moves_it_is_checked(compose, tmp_path):
    """The first point's dirs, and those of a later point whose overrides can move them (cache_dir here)."""
    from lrsweep.sweep.planning import Point

    def point(*overrides):
        cfg = compose([f"results_dir={tmp_path / 'r'}", "logger=wandb", f"logger.dir={tmp_path / 'w'}", *overrides])
        return Point(0, list(overrides), cfg, "x")

    got = space.where([point("rank=4"), point("rank=8"), point(f"cache_dir={tmp_path / 'c2'}")],
                      {"submitit_folder": f"{tmp_path}/r/hydra/x/.submitit/%j"})
    assert sorted(got) == sorted([("results_dir", str(tmp_path / "r")), ("results_dir", str(tmp_path / "r" / "rows")),
                                  ("cache_dir", os.path.abspath(os.environ["LRSWEEP_CACHE"])),
                                  ("cache_dir", str(tmp_path / "c2")), ("logger.dir", str(tmp_path / "w")),
                                  ("hydra.launcher.submitit_folder", f"{tmp_path}/r/hydra/x/.submitit")])


def test_the_dry_run_checks_without_writing(launch, tmp_path):
    target = tmp_path / "not-yet"
    _launcher, rets = launch({"rank": [4, 8]}, f"results_dir={target}", "dry_run=true")
    assert rets == [] and not (target / "rows").exists()
    assert not list(target.rglob(".lrsweep-probe-*")) if target.exists() else True
    (tmp_path / "rows").write_text("x")
    with pytest.raises(ConfigError, match=r"^results_dir: '.*/rows' is a file"):
        launch({"rank": [4, 8]}, "dry_run=true")


# ---------------------------------------------------------------- full disks
def test_a_job_that_does_not_fit_fails_its_points_and_later_ones_with_one_line(launch, tmp_path, monkeypatch,
                                                                                capsys):
    """The second job's pickle does not fit: it and the third are not submitted, their points get
    failed rows naming the disk, the summary says it in one line, exit 1; the rerun runs those two."""
    real = FakeExecutor.submit

    def submit_(self, launcher, points, *rest):
        if points[0].cfg.rank != 4:
            raise full(str(tmp_path / ".submitit" / "x.pkl"))
        return real(self, launcher, points, *rest)

    monkeypatch.setattr(FakeExecutor, "submit", submit_)
    launcher, rets = launch({"rank": [4, 8, 16]}, parallelism=1)
    assert [r.status.name for r in rets] == ["COMPLETED", "FAILED", "FAILED"]
    rows = {r.rank: r for r in read_rows(tmp_path)}
    assert rows[4].status == "ok" and rows[8].status == rows[16].status == "failed"
    assert "No space left on device" in rows[8].error["message"] and rows[8].extra["job_state"] == "NOT SUBMITTED"
    assert sweep.report(launcher.outcome) == 1
    out, err = capsys.readouterr()
    assert err.count("no space left on device writing") == 1 and "x.pkl" in err and "free there" in err
    assert "1 ok, 2 failed, 0 skipped" in out and "Traceback" not in out + err

    monkeypatch.setattr(FakeExecutor, "submit", real)
    launcher, rets = launch({"rank": [4, 8, 16]})
    assert sorted(p.cfg.rank for j in launcher._fake.jobs for p in j.points) == [8, 16]
    assert sweep.report(launcher.outcome) == 0


def test_dead_jobs_rows_that_do_not_fit_are_one_line_not_a_traceback(launch, tmp_path, monkeypatch, capsys):
    """A job dies (the disk filled up under it) and its failed row does not fit either: one line with
    the rows dir and its free space, the rows written before stay, exit 1."""
    from lrsweep import job

    launch({"rank": [4]})
    monkeypatch.setattr(job, "write_row", lambda *a: (_ for _ in ()).throw(full()))
    launcher, rets = launch({"rank": [4, 8, 16]}, die_at={8, 16})
    assert [r.status.name for r in rets] == ["COMPLETED", "FAILED", "FAILED"]
    assert "has not produced any output" in str(rets[1]._return_value)  # the job's own error
    assert sweep.report(launcher.outcome) == 1
    out, err = capsys.readouterr()
    assert err.strip().count("\n") == 0 and f"writing {tmp_path / 'rows'} (" in err and "free there)" in err
    assert "rerun the points without an ok row: python -m lrsweep" in out
    assert {r.rank: r.status for r in read_rows(tmp_path)} == {4: "ok"}


def test_a_job_that_died_on_a_full_disk_leaves_no_partial_result_pickle(launch, tmp_path, monkeypatch):
    """submitit's job writes its result to ``<result>.pkl.save_tmp`` and renames it: a job that died
    with the disk full leaves that file, empty or cut short; the launcher removes it."""
    from types import SimpleNamespace

    from fakelaunch import FakeJob

    partial = []

    def submit_(self, launcher, points, single, since, peers=None):
        result = tmp_path / ".submitit" / f"{len(self.jobs)}_0_result.pkl"
        result.parent.mkdir(exist_ok=True)
        Path(f"{result}.save_tmp").write_bytes(b"")  # what the job began before the disk said no
        partial.append(Path(f"{result}.save_tmp"))
        self.jobs.append(FakeJob(str(len(self.jobs)), points, since, dies=points[0].cfg.rank == 8,
                                 paths=SimpleNamespace(stdout="/dev/null", result_pickle=result)))
        return self.jobs[-1]

    monkeypatch.setattr(FakeExecutor, "submit", submit_)
    _launcher, rets = launch({"rank": [4, 8]})
    assert [r.status.name for r in rets] == ["COMPLETED", "FAILED"]
    assert partial[0].exists() and not partial[1].exists()  # a job that ended well: not the launcher's to touch


def test_a_failed_point_raises_through_the_sweeper_without_hydras_extra_line(tmp_path, capsys):
    """The summary names the failed points; Hydra's JobReturn.return_value would add a line of every
    override ("Error executing job with overrides: [...]") to stderr: the sweeper raises without it."""
    from types import SimpleNamespace

    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from hydra_plugins.lrsweep_launcher.launcher import GridSweeper, LocalLauncher
    from lrsweep.job import PointFailed

    sweeper = GridSweeper(max_batch_size=None)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    sweeper.hydra_context = SimpleNamespace(config_loader=None)
    sweeper.launcher = LocalLauncher.__new__(LocalLauncher)
    sweeper.launcher.launch = lambda batch, initial_job_idx: [
        JobReturn(overrides=b, status=JobStatus.FAILED, _return_value=PointFailed("abc (rank=8): boom")) for b in batch]
    with pytest.raises(PointFailed, match=r"^1 of 1 grid points failed$"):
        sweeper.sweep(["rank=8"])
    assert capsys.readouterr().err == ""


def test_a_sweep_refused_before_any_job_leaves_no_sweep_dir(tmp_path):
    """A config error out of the launcher (a preflight check): the sweeper removes the multirun.yaml
    and the directories it made for it; a directory that was there stays."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from hydra_plugins.lrsweep_launcher.launcher import GridSweeper, LocalLauncher

    def refuse(batch, initial_job_idx):
        assert (tmp_path / "results" / "hydra" / "t" / "multirun.yaml").is_file()
        raise ConfigError("results_dir", "refused")

    sweeper = GridSweeper(max_batch_size=None)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "results" / "hydra" / "t")}}})
    sweeper.hydra_context = SimpleNamespace(config_loader=None)
    sweeper.launcher = LocalLauncher.__new__(LocalLauncher)
    sweeper.launcher.launch = refuse
    with pytest.raises(ConfigError, match="refused"):
        sweeper.sweep(["rank=8"])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "results").mkdir()
    with pytest.raises(ConfigError, match="refused"):
        sweeper.sweep(["rank=8"])
    assert list(tmp_path.rglob("*")) == [tmp_path / "results"]


def test_a_submission_that_does_not_fit_leaves_no_partial_pickle(tmp_path, monkeypatch):
    """submitit writes the job's pickle then moves it: the part written before the disk filled up is removed."""
    import submitit
    from submitit.core.utils import DelayedSubmission

    def dump(self, path):
        Path(path).write_bytes(b"\x80\x04partial")
        raise full(str(path))

    monkeypatch.setattr(DelayedSubmission, "dump", dump)
    ex = submitit.AutoExecutor(folder=tmp_path / "jobs" / "%j", cluster="local")
    with pytest.raises(OSError) as e:
        submit.submit_one(ex, print, ("x",))
    assert disk.is_full(e.value) and not list(tmp_path.rglob("*.pkl"))


def test_the_cli_says_a_full_disk_in_one_line(monkeypatch, capsys):
    from lrsweep import cli

    monkeypatch.setattr(cli, "_task", lambda: (_ for _ in ()).throw(full("/somewhere/multirun.yaml")))
    monkeypatch.setattr(sys, "argv", ["lrsweep"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("lrsweep: no space left on device writing /somewhere/multirun.yaml (")
    assert err.count("\n") == 1


# ---------------------------------------------------------------- Ctrl-C, SIGTERM
class Interrupting(FakeJob):
    """A running job: done() is False until ``interrupt`` fires (KeyboardInterrupt or a signal);
    cancel() is recorded."""

    cancelled: ClassVar[list[str]] = []
    interrupt = None

    def done(self) -> bool:
        if self.job_id in Interrupting.cancelled:
            return True
        if Interrupting.interrupt is not None:
            fire, Interrupting.interrupt = Interrupting.interrupt, None
            fire()
        return False

    def cancel(self, check: bool = True) -> None:
        Interrupting.cancelled.append(self.job_id)


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGTERM", "SIGINT"])
def test_an_interrupted_sweep_cancels_its_jobs_and_says_what_ran(launch, tmp_path, monkeypatch, capsys, signals, how):
    """Two jobs start (one point already ok from before, one finished now), then Ctrl-C / SIGTERM while
    waiting: both running jobs cancelled, summary ok / failed / cancelled, the rerun command, 130."""
    launch({"rank": [2]})
    real = FakeExecutor.submit

    def submit_(self, launcher, points, single, since, peers=None):
        if points[0].cfg.rank == 4:
            return real(self, launcher, points, single, since, peers)  # finished, its row written
        self.jobs.append(Interrupting(str(len(self.jobs)), points, since, dies=True))
        return self.jobs[-1]

    fire = {"KeyboardInterrupt": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
            "SIGTERM": lambda: os.kill(os.getpid(), signal.SIGTERM),
            "SIGINT": lambda: os.kill(os.getpid(), signal.SIGINT)}[how]
    Interrupting.cancelled, Interrupting.interrupt = [], fire
    monkeypatch.setattr(FakeExecutor, "submit", submit_)
    monkeypatch.setattr(sys, "argv", ["lrsweep", "-m", "rank=2,4,8,16"])
    launcher, _ = launch({"rank": [2, 4, 8, 16]}, parallelism=4)
    assert launcher.outcome.cancelled and sorted(Interrupting.cancelled) == ["1", "2"]
    assert sweep.report(launcher.outcome) == 130
    out = capsys.readouterr().out
    assert "[lrsweep] interrupted: cancelling the sweep's jobs (Ctrl-C again to exit at once)" in out
    assert "[lrsweep] interrupted: 1 ok, 0 failed, 2 cancelled, 1 skipped" in out
    assert "[lrsweep] to finish the sweep: python -m lrsweep -m rank=2,4,8,16" in out
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the second Ctrl-C
    assert exits == [130]


def test_ctrl_c_while_submitting_cancels_the_jobs_started(launch, monkeypatch, capsys, signals):
    started = []

    def submit_(self, launcher, points, single, since, peers=None):
        if started:
            raise KeyboardInterrupt
        started.append(Interrupting("0", points, since, dies=True))
        return started[-1]

    Interrupting.cancelled, Interrupting.interrupt = [], None
    monkeypatch.setattr(FakeExecutor, "submit", submit_)
    launcher, _ = launch({"rank": [4, 8]})
    assert launcher.outcome.cancelled and Interrupting.cancelled == [started[0].job_id]
    assert sweep.report(launcher.outcome) == 130
    assert "0 ok, 0 failed, 2 cancelled, 0 skipped" in capsys.readouterr().out


def test_a_slurm_sweep_is_cancelled_with_one_scancel_of_its_array(monkeypatch):
    calls = []
    monkeypatch.setattr(submit.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    jobs = [FakeJob(f"4711_{i}", [], "") for i in range(3)]
    submit.cancel(jobs, slurm=True)
    assert calls == [["scancel", "4711"]]


def test_the_cli_exits_130_without_a_traceback(monkeypatch, capsys):
    from lrsweep import cli

    monkeypatch.setattr(cli, "_task", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(sys, "argv", ["lrsweep"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130 and capsys.readouterr().err == "lrsweep: interrupted\n"


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C in the first seconds of ``python -m lrsweep``, while it imports Hydra and torch (before
    lrsweep.cli.main runs): one line and exit 130, not a KeyboardInterrupt traceback."""
    import runpy

    class CtrlC:  # a Ctrl-C arriving while lrsweep.cli is imported
        def find_spec(self, name, path=None, target=None):
            if name == "lrsweep.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "lrsweep.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [CtrlC(), *sys.meta_path])
    try:
        runpy.run_module("lrsweep", run_name="__main__")
        raised = None
    except BaseException as e:  # a KeyboardInterrupt must not end the test session
        raised = e
    assert isinstance(raised, SystemExit) and raised.code == 130, repr(raised)
    assert capsys.readouterr().err == "lrsweep: interrupted\n"


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                out.append(int(proc.name))
        except OSError:
            pass
    return out


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigint_to_a_local_sweeps_driver_cancels_its_jobs_and_exits_130(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lrsweep", "-m", f"results_dir={tmp_path / 'results'}", *TINY,
                             "method._target_=faultlib.faults.faulty_svd", f"+method.state_dir={state}",
                             "+method.sleep_at=4", "rank=4,8", "hydra.launcher.points_per_job=1"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 300
        while not (state / "fired-sleep-4").exists():  # the job of rank 4 sleeps in its method
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        assert _processes_mentioning(str(tmp_path / "results")) != [proc.pid]  # its jobs run
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, out + err
        assert "[lrsweep] interrupted: " in out and " cancelled, 0 skipped" in out, out
        assert "[lrsweep] to finish the sweep: python -m lrsweep -m" in out
        assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
        assert _processes_mentioning(str(tmp_path / "results")) == []  # the jobs' processes are gone
    finally:  # whatever failed, no sleeping job outlives the test
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_mentioning(str(tmp_path / "results")):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the dry run over existing rows
def test_the_dry_runs_estimate_reads_the_rows_once(launch, tmp_path, monkeypatch, capsys):
    """Estimates come from one pass over the rows, not one per point."""
    for i in range(30):
        write_row(tmp_path, ResultRow(run_id=f"old{i:03d}", status="ok", model="minilm", method="svd",
                                      wall_seconds=float(i % 3), finished_at=now()))
    reads = []
    monkeypatch.setattr(outcome, "read_rows", lambda d: [Counted(r, reads) for r in read_rows(d)])
    launch({"rank": [4, 8, 16, 32, 64]}, "dry_run=true")
    assert len(reads) <= 2 * 30  # one pass (status and model per row), not one per point
    assert "about 5 s of job time" in capsys.readouterr().out  # median 1.0 s for each of the 5 points


class Counted:
    """A row whose attribute reads are counted."""

    def __init__(self, row: ResultRow, reads: list):
        self.__dict__["_row"], self.__dict__["_reads"] = row, reads

    def __getattr__(self, name: str):
        if name == "status":
            self._reads.append(name)
        return getattr(self._row, name)
