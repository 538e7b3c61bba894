"""A sweep, from Hydra's job overrides to one row per grid point.

The launcher (hydra_plugins/lrsweep_launcher) hands the grid here. Every point is composed and
validated before anything is submitted (a single bad point launches nothing: exit code 2) and
looked up in the results dir: points whose row says ``ok`` are skipped. The rest are packed
into jobs (``hydra.launcher.points_per_job``: 1, K, or ``auto``: the points that share model,
data and calibration in as many jobs as there are parallel slots); a packed job loads the
model and measures the dense model once and runs its points one after another
(:func:`run_pack`); with ``auto`` a job done with its own points takes over its siblings' unstarted
ones. Jobs go to submitit, local processes with bounded parallelism or one SLURM
array (with a manifest for ``python -m lrsweep.status``). A job that dies without writing its
points' rows (killed, out of memory, timed out) gets ``failed`` rows from here for those points
only. ``dry_run=true`` lists the points with their status and estimated time, and stops.
"""

from __future__ import annotations

import copy
import gc
import importlib
import logging
import os
import re
import statistics
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf

from lrsweep import identity, seeds
from lrsweep.errors import ConfigError
from lrsweep.row import ResultRow, now, read_row, read_rows, row_path, row_status

log = logging.getLogger(__name__)


class PointFailed(Exception):
    """The return value of a grid point's FAILED JobReturn: its row says failed."""


@dataclass
class Point:
    index: int
    overrides: list[str]
    cfg: DictConfig
    run_id: str

    @property
    def results_dir(self) -> str:
        return os.path.abspath(str(self.cfg.results_dir))

    def describe(self) -> str:
        return " ".join(o for o in filter_overrides(self.overrides) if not o.startswith("sweep_name="))


@dataclass
class Outcome:
    """What the last sweep (or single run) of this process did; read by :func:`report`."""

    results_dir: str
    run_ids: list[str]
    submitted: int = 0
    skipped: int = 0
    job_ids: list[str] = field(default_factory=list)
    submitit_folder: str = ""
    detached: bool = False
    dry_run: bool = False


LAST: Outcome | None = None


def _row(results_dir: str, run_id: str) -> ResultRow | None:
    try:
        return read_row(row_path(results_dir, run_id))
    except (OSError, ValueError):
        return None


def _written_since(p: Point, since: str) -> ResultRow | None:
    """The point's row if this sweep wrote it (finished at or after the launch), else None."""
    row = _row(p.results_dir, p.run_id)
    return row if row is not None and (row.finished_at or "") >= since else None


# ---------------------------------------------------------------- planning
def plan(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Point]:
    """Compose and validate every point; ConfigError (nothing launched) if any is invalid."""
    from lrsweep.compose import sweep_configs
    from lrsweep.validate import validate

    sweep_name = Path(str(launcher.config.hydra.sweep.dir)).name
    grid = [[*ov, f"sweep_name={sweep_name}"] for ov in job_overrides]
    points, seen, errors = [], set(), []
    for i, (ov, cfg) in enumerate(zip(grid, sweep_configs(launcher.hydra_context.config_loader, launcher.config,
                                                           grid))):
        if isinstance(cfg, Exception):  # Hydra could not compose the point: its error, as before
            raise cfg
        try:
            validate(cfg, check_device=launcher._EXECUTOR == "local")
        except ConfigError as e:
            errors.append(f"point #{initial_job_idx + i} ({' '.join(filter_overrides(ov[:-1]))}): {e}")
            continue
        rid = identity.run_id(cfg)
        if rid not in seen:  # two override lists, one experiment: run it once
            seen.add(rid)
            points.append(Point(initial_job_idx + i, ov, cfg, rid))
    if errors:
        raise ConfigError("sweep", f"{len(errors)} of {len(job_overrides)} grid points are invalid, "
                          "nothing was launched:\n  " + "\n  ".join(errors))
    if note := seeds.single_seed_note(p.cfg for p in points):
        log.warning(note)
    return points


def points_per_job(value: Any) -> int | str:
    """``hydra.launcher.points_per_job``: a positive int or ``auto``."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ConfigError("hydra.launcher.points_per_job", f"{value!r} is not a positive integer or auto",
                      ["auto", "1", "2", "..."])


def pack(points: list[Point], per_job: int | str, slots: int) -> list[list[Point]]:
    """Jobs of points that share the dense model (lrsweep.job.dense_key): K points in grid order, or
    (``auto``) each group's points dealt round-robin into as few jobs of at most ceil(points / slots)
    points, so that the jobs of a method x rank grid hold a similar mix of methods and end together."""
    from lrsweep.job import dense_key

    if per_job == 1:
        return [[p] for p in points]
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(dense_key(p.cfg), []).append(p)
    jobs = []
    for group in groups.values():
        n = len(group)
        if per_job == "auto":
            k = -(-n // min(slots, n))  # points per job (ceil), in as few jobs as that allows
            m = -(-n // k)
            jobs += [group[i::m] for i in range(m)]  # dealt, not cut in runs: grid neighbours (one method) cost alike
        else:
            jobs += [group[i:i + int(per_job)] for i in range(0, n, int(per_job))]
    return jobs


def slots(launcher: Any) -> int:
    key = "parallelism" if launcher._EXECUTOR == "local" else "array_parallelism"
    return max(1, int(launcher.params.get(key) or 1))


def gpus_requested(params: Any) -> int:
    """GPUs per job asked of the launcher (gpus_per_node, gpus_per_task, or a gpu gres)."""
    return int(params.get("gpus_per_node") or 0) or int(params.get("gpus_per_task") or 0) \
        or int("gpu" in str(params.get("gres") or ""))


def auto_device(launcher: Any) -> str | None:
    """What ``device=auto`` is in this sweep's jobs (for their run_ids, lrsweep.identity.auto_device):
    a job sees the GPUs its launcher requests (submitit's local jobs too: CUDA_VISIBLE_DEVICES), none
    without; a local job's are this machine's (None: cuda when available here), a SLURM job's cuda."""
    if not gpus_requested(launcher.params):
        return "cpu"
    return None if launcher._EXECUTOR == "local" else "cuda"


# ---------------------------------------------------------------- launching
def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """Plan, skip what is ok, pack, submit, wait and account for every point: one JobReturn per point run."""
    with identity.auto_device(auto_device(launcher)):
        return _launch(launcher, job_overrides, initial_job_idx)


def _launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    global LAST
    per_job = points_per_job(launcher.params.get("points_per_job", 1))
    points = plan(launcher, job_overrides, initial_job_idx)
    slurm = launcher._EXECUTOR == "slurm"
    if slurm:
        preflight(launcher.params, points)
    check_gpus(launcher.params, points)
    active = _active(points) if slurm else {}
    results_dir = points[0].results_dir if points else ""
    if points and points[0].cfg.get("dry_run"):
        LAST = Outcome(results_dir, [p.run_id for p in points], dry_run=True)
        dry_run(points, active)
        return []
    for p in points:
        if p.run_id in active and not p.cfg.get("force"):
            log.info(f"[lrsweep]   #{p.index} {p.run_id}: still queued or running as job {active[p.run_id]}, "
                     "not submitted again")
    points = [p for p in points if p.run_id not in active or p.cfg.get("force")]
    todo = [p for p in points if p.cfg.get("force") or row_status(p.results_dir, p.run_id) != "ok"]
    LAST = Outcome(results_dir, [p.run_id for p in points], len(todo), len(points) - len(todo))
    log.info(f"[lrsweep] {len(points)} grid points: {len(todo)} to run, {len(points) - len(todo)} already ok")
    if not todo:
        return []
    jobs = pack(todo, per_job, slots(launcher))
    if len(jobs) < len(todo):
        log.info(f"[lrsweep] {len(todo)} points in {len(jobs)} jobs (points_per_job={per_job})")
    executor = launcher.executor([p.overrides[:-1] for p in todo], per_job_points=max(len(j) for j in jobs))
    job_command(executor)
    os.environ["LRSWEEP_THREADS"] = str(launcher.params.get("cpus_per_task") or "")
    since = now()
    state = Singleton.get_state()
    peers = share_points(jobs) if per_job == "auto" else [None] * len(jobs)
    args = [(job, state, since, shared) for job, shared in zip(jobs, peers)]
    submitted = (submit_slurm if slurm else submit_local)(launcher, executor, args)
    if slurm and launcher.params.get("wait", True):  # the jobs run on the cluster's nodes
        prefetch_report()
    LAST.job_ids = [str(j.job_id) for j in submitted]
    LAST.submitit_folder = str(Path(str(launcher.params["submitit_folder"])).parent)
    if not launcher.params.get("wait", True):
        LAST.detached = True
        return []
    return [ret for job, j in zip(jobs, submitted) for ret in collect(launcher, job, j, since)]


def job_command(executor: Any) -> None:
    """Jobs start through :mod:`lrsweep.jobmain` (Python's garbage collector off while they import and
    load), unless the executor's python command is not plain ``python`` (a container's, set by the user)."""
    import shlex

    inner = getattr(executor, "_executor", executor)  # submitit's AutoExecutor wraps the cluster's executor
    if getattr(inner, "python", None) == shlex.quote(sys.executable):
        inner.python = f"{inner.python} -u -m lrsweep.jobmain"


def submit_local(launcher: Any, executor: Any, args: list[tuple]) -> list[Any]:
    """One process per job, at most ``parallelism`` running at once."""
    limit = slots(launcher)
    pending, running, jobs = list(args), [], []
    while pending or running:
        running = [j for j in running if not j.done()]
        while pending and len(running) < limit:
            job = executor.submit(launcher, *pending.pop(0))
            running.append(job)
            jobs.append(job)
        if not pending and len(running) < limit:  # a core is free until the last jobs end
            prefetch_report()
        time.sleep(0.1)
    return jobs


def submit_slurm(launcher: Any, executor: Any, args: list[tuple]) -> list[Any]:
    """One SLURM array (one task per job) and its manifest."""
    from submitit.core.utils import FailedJobError

    from lrsweep.status import write_manifest

    try:
        jobs = executor.map_array(launcher, *zip(*args))
    except FailedJobError as e:  # sbatch said no: its message verbatim, nothing was submitted
        raise ConfigError("hydra/launcher", f"sbatch refused the job array, nothing was submitted:\n"
                          f"{str(e).strip()}") from None
    array = str(jobs[0].job_id).split("_")[0]
    folder = str(Path(str(launcher.params["submitit_folder"])).parent)
    points = [(p, j) for (pts, *_), j in zip(args, jobs) for p in pts]
    write_manifest(points[0][0].results_dir, Path(str(launcher.config.hydra.sweep.dir)).name, array, folder,
                   [{"index": p.index, "run_id": p.run_id, "job_id": str(j.job_id), "overrides": p.describe().split()}
                    for p, j in points])
    log.info(f"[lrsweep] submitted SLURM array {array} ({len(jobs)} jobs); logs in {folder}")
    sys.stdout.flush()
    return jobs


def _returned(p: Point, row: ResultRow | None, error: BaseException | None = None) -> JobReturn:
    """The honest JobReturn of a point: COMPLETED for an ok row, FAILED (PointFailed) otherwise."""
    ret = JobReturn(overrides=p.describe().split())
    if row is not None and row.status == "ok":
        ret.status, ret._return_value = JobStatus.COMPLETED, "ok"
    else:
        msg = (row.error or {}).get("message", "") if row is not None else str(error)
        ret.status, ret._return_value = JobStatus.FAILED, PointFailed(f"{p.run_id} ({p.describe()}): {msg}")
    return ret


def collect(launcher: Any, pts: list[Point], job: Any, since: str) -> list[JobReturn]:
    """The job's JobReturns; a job that died gets failed rows for its points without a row."""
    try:
        while not job.done():  # submitit's results() looks once a second; a result file is a cheap stat
            time.sleep(0.2)
        return job.results()[0]
    except Exception as e:  # killed, timed out, out of memory, ...
        error = e
    out = []
    for p in pts:
        with claimed(p, since, wait=True):  # a sibling job may be running it (auto packing): its row then
            row = _written_since(p, since)
            if row is None:
                row = dead_row(launcher, p, job, error)
        out.append(_returned(p, row))
    return out


def dead_row(launcher: Any, p: Point, job: Any, error: BaseException) -> ResultRow:
    """The failed row of a point whose job ended without writing it, with submitit's view of the job."""
    report_modules()
    from lrsweep.job import write_failed

    state = getattr(job, "state", "")
    # submitit's first two lines say what happened ("... has not produced any output (state: ...)")
    first = " ".join(str(error).strip().splitlines()[:2])
    # without the hydra node: its runtime interpolations are only set inside the job
    return write_failed(OmegaConf.masked_copy(p.cfg, [k for k in p.cfg if k != "hydra"]), error,
                        f"job {job.job_id} ended without a row (state {state}; killed, out of memory or crashed): "
                        f"{first}",
                        (job.stderr() or "")[-4000:] + "\n" + "".join(traceback.format_exception(error)),
                        slurm_job_id=str(job.job_id) if launcher._EXECUTOR == "slurm" else None,
                        log_path=str(job.paths.stdout), extra={"job_state": state})


# ---------------------------------------------------------------- inside a job
def launch_folder(p: Point, since: str) -> Path | None:
    """The folder one launch of a sweep shares between its jobs (``<sweep dir>/.lrsweep/<launch time>``):
    the points' claims and the dense latencies (lrsweep.job).
    Absolute: a point's run_job may chdir (hydra.job.chdir)."""
    sweep_dir = OmegaConf.select(p.cfg, "hydra.sweep.dir")
    if not sweep_dir:
        return None
    return Path(os.path.abspath(str(sweep_dir))) / ".lrsweep" / re.sub(r"[^0-9A-Za-z]", "", since)


@contextmanager
def claimed(p: Point, since: str, wait: bool) -> Iterator[bool]:
    """Hold the point's claim for this launch, a file lock that dies with its process: True once held,
    False when another process holds it and ``wait`` is false. The process holding it is the one
    running the point, or the launcher writing its failed row."""
    from filelock import FileLock, Timeout

    folder = launch_folder(p, since)
    if folder is None:
        yield True
        return
    (folder / "claims").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / "claims" / f"{p.run_id}.lock"))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


# how many sibling jobs (the next ones of its dense model, in a ring) a job may take points over from:
# each job's pickle carries their points too, so it grows (1 + this) times, not with the array's size
SIBLINGS = 3


def share_points(jobs: list[list[Point]]) -> list[tuple[int, list[list[Point]]] | None]:
    """With ``points_per_job=auto`` the jobs of a dense model share their points: each job, once its
    own are done, takes over the points of its next :data:`SIBLINGS` sibling jobs that none has
    started (one job times the dense model while the others already compress; on SLURM, running
    tasks run the points of tasks still queued). Per job: (the points of the launch's largest job,
    which its time limit was sized for; its siblings' points), or None without a sibling."""
    from lrsweep.job import dense_key

    keys = [dense_key(job[0].cfg) for job in jobs]
    largest = max(map(len, jobs), default=0)
    out: list[tuple[int, list[list[Point]]] | None] = []
    for i, key in enumerate(keys):
        group = [j for j in range(len(jobs)) if keys[j] == key]
        at = group.index(i)
        ring = [jobs[group[(at + k) % len(group)]] for k in range(1, min(SIBLINGS, len(group) - 1) + 1)]
        out.append((largest, ring) if ring else None)
    return out


def _takeover(peers: tuple[int, list[list[Point]]] | None) -> tuple[list[Point], int]:
    """(the sibling jobs' points this job may take over, the ones their jobs would reach last first;
    the points of the launch's largest job)."""
    if not peers:
        return [], 0
    largest, siblings = peers
    depth = max((len(job) for job in siblings), default=0)
    return [job[k] for k in reversed(range(depth)) for job in siblings if k < len(job)], largest


def run_pack(launcher: Any, pts: list[Point], since: str, peers: tuple[int, list[list[Point]]] | None = None
             ) -> list[JobReturn]:
    """Run a job's points one after another, each through Hydra's run_job (its own output dir,
    row and W&B run), sharing the dense model (lrsweep.job.packed). An exception of one point is
    that point's failed row; a requeued job skips the points already ok since the launch.

    Each point runs under its claim (:func:`claimed`). With ``peers`` (:func:`share_points`) a job
    that is done with its own points takes over its siblings' unclaimed points without a row while
    its time limit allows (``timeout_min`` x the points of the largest job, less twice its longest
    point so far); an own point a sibling holds is waited for at the end and its row returned (run
    here if that sibling died before writing it).

    The objects of the modules imported by then (torch & co.) and, at the end, all objects are
    frozen out of Python's garbage collection (gc.freeze): its full passes while transformers and
    wandb load, and its last one at the job process's exit (~1-2 s), skip them."""
    import submitit
    from hydra.core.utils import setup_globals

    from lrsweep import job

    gc.freeze()
    setup_globals()
    t0, longest = time.monotonic(), 0.0
    job_id = submitit.JobEnvironment().job_id
    rows: dict[int, ResultRow | None] = {}
    folder = launch_folder(pts[0], since) if pts else None

    def run(p: Point) -> ResultRow:
        nonlocal longest
        t = time.monotonic()
        row = _run_point(launcher, p, since, job_id)
        longest = max(longest, time.monotonic() - t)
        return row

    with job.packed(len(pts), folder):  # the sweep's jobs time each dense model once per host (job._dense_speed)
        held = []
        for p in pts:
            with claimed(p, since, wait=False) as mine:
                if not mine:  # a sibling took it over
                    held.append(p)
                    continue
                done = _written_since(p, since)
                rows[p.index] = done if done is not None and done.status == "ok" else run(p)
        others, largest = _takeover(peers)
        limit = float(launcher.params.get("timeout_min") or 0) * 60 * largest
        for q in others:
            if time.monotonic() - t0 + 2 * longest >= limit:
                break
            with claimed(q, since, wait=False) as mine:
                if mine and _written_since(q, since) is None:
                    log.info(f"[lrsweep] taking over #{q.index} {q.run_id} from a sibling job")
                    job.PACK["taken_over"] = True
                    try:
                        run(q)
                    finally:
                        job.PACK.pop("taken_over", None)
        for p in held:
            with claimed(p, since, wait=True):
                rows[p.index] = _written_since(p, since) or run(p)
    gc.freeze()
    return [_returned(p, rows[p.index]) for p in pts]


def _run_point(launcher: Any, p: Point, since: str, job_id: str) -> ResultRow:
    """One point through Hydra's run_job (lrsweep.job.run inside); its row."""
    from hydra.core.utils import run_job
    from omegaconf import open_dict, read_write

    from lrsweep import job

    # the config composed and validated at launch: a queued job must not pick up conf/ or code
    # edits made after it, or its row would land under another run_id than the sweep waits for
    config = copy.deepcopy(p.cfg)
    with read_write(config.hydra.job), open_dict(config.hydra.job):
        config.hydra.job.id = job_id
        config.hydra.job.num = p.index
    ret = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                  config=config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    row = _written_since(p, since)
    if row is None:  # raised outside lrsweep's row handling: the point's failed row, then the next
        error = ret._return_value if ret.status == JobStatus.FAILED else RuntimeError("no row written")
        row = job.write_failed(p.cfg, error)
    return row


# ---------------------------------------------------------------- SLURM checks
def preflight(params: dict[str, Any], points: list[Point]) -> None:
    """ConfigError (nothing submitted) for no sbatch, an unknown partition, GPUs the partition lacks."""
    import shutil
    import subprocess

    from lrsweep.errors import did_you_mean

    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError("hydra/launcher", "sbatch/sinfo are not on PATH: this machine cannot submit SLURM jobs",
                          ["hydra/launcher=local", "run from a SLURM login node"])
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%G"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ConfigError("hydra/launcher", f"sinfo failed, the SLURM controller is not reachable: "
                          f"{(out.stderr or out.stdout).strip()}")
    gres: dict[str, set[str]] = {}
    default = None
    for line in out.stdout.splitlines():
        name, _, g = line.strip().partition("|")
        if name.endswith("*"):
            name = default = name[:-1]
        gres.setdefault(name, set()).add(g)
    wanted = [q for q in str(params.get("partition") or default or "").split(",") if q]
    for q in wanted:
        if q not in gres:
            raise ConfigError("hydra.launcher.partition", f"{q!r} is not a partition of this cluster"
                              f"{did_you_mean(q, gres)}", sorted(gres))
    gpus = gpus_requested(params)
    for q in wanted if gpus > 0 else []:
        if not any("gpu" in g for g in gres[q]):
            raise ConfigError("hydra.launcher.gpus_per_node", f"{gpus} GPU(s) per node requested but "
                              f"partition {q!r} has no GPUs (gres {sorted(gres[q])})", [0])


def check_gpus(params: dict[str, Any], points: list[Point]) -> None:
    """ConfigError for device=cuda in jobs that ask for no GPU: they see none (submitit's local jobs
    get CUDA_VISIBLE_DEVICES='' unless hydra.launcher.gpus_per_node is set)."""
    if gpus_requested(params):
        return
    for p in points:
        if str(p.cfg.device).startswith("cuda"):
            raise ConfigError("device", f"{p.cfg.device!r} but the jobs ask for no GPU "
                              "(hydra.launcher.gpus_per_node=0)", ["auto", "cpu", "hydra.launcher.gpus_per_node=1"])


def _active(points: list[Point]) -> dict[str, str]:
    """run_id -> job id of the points still queued or running from an earlier submission."""
    if not points:
        return {}
    from lrsweep.status import active_run_ids

    return active_run_ids(points[0].results_dir)


# ---------------------------------------------------------------- dry run
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


# ---------------------------------------------------------------- end of sweep
PREFETCH: list[threading.Thread] = []


def prefetch_report() -> None:
    """Import the modules of the end-of-sweep table and plot (pandas, matplotlib: ~2 s) in a thread
    while the last jobs run, once per process; :func:`report_modules` waits for it."""
    if not PREFETCH:
        PREFETCH.append(threading.Thread(target=importlib.import_module, args=("analysis.summary",), daemon=True,
                                         name="lrsweep-prefetch-report"))
        PREFETCH[0].start()


def report_modules() -> None:
    """Wait for :func:`prefetch_report`'s imports: the main thread imports nothing while they run
    (two threads importing the same modules can deadlock on their import locks)."""
    for t in PREFETCH:
        t.join()


def report() -> int:
    """Print the sweep's table, plot path and summary line; return the exit code."""
    out = LAST
    if out is None or out.dry_run:
        return 0
    if out.detached:
        print(f"[lrsweep] detached: {len(out.job_ids)} jobs submitted ({', '.join(out.job_ids)}) for "
              f"{out.submitted} points, {out.skipped} already ok; logs in {out.submitit_folder}; results in {out.results_dir}")
        print(f"[lrsweep] progress: python -m lrsweep.status {out.results_dir}")
        return 0
    statuses = [row_status(out.results_dir, rid) for rid in out.run_ids]
    ok, failed = statuses.count("ok"), len(statuses) - statuses.count("ok")
    rows = [read_row(row_path(out.results_dir, rid)) for rid, s in zip(out.run_ids, statuses) if s]
    report_modules()
    if rows:
        from analysis.summary import print_summary

        print_summary(rows, out.results_dir)
    for r in rows:
        if r.status != "ok" and r.error:
            print(f"[lrsweep] failed {r.run_id} ({r.run_name}): {r.error['type']}: {r.error['message']}")
    print(f"{ok - out.skipped} ok, {failed} failed, {out.skipped} skipped")
    return 1 if failed else 0
