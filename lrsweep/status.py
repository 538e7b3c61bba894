"""``python -m lrsweep.status <results_dir>``: where the sweeps of a results dir stand.

Counts ok / failed / missing grid points from the result rows and the sweep manifests the
SLURM launcher writes at submission (``<results_dir>/sweeps/*.json``: run_id, job id and
overrides of every submitted point, and the command that launched them); a missing point is
shown with its SLURM state from ``squeue`` (pending / running) or ``sacct`` (FAILED,
OUT_OF_MEMORY, CANCELLED, ...). It prints the command that resubmits what is failed or lost —
the sweep's own command: the launcher skips points whose row is ok or whose job is still
queued — and ``--resubmit`` runs it (detached).

Exit code: 0 when every known grid point is ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrsweep import atomic
from lrsweep.row import scan_rows

# SLURM states of a job that has not ended yet
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                    "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})


def manifest_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "sweeps"


def write_manifest(results_dir: str | os.PathLike, sweep: str, array_job_id: str, submitit_folder: str,
                   points: list[dict[str, Any]]) -> Path:
    """Record a submitted array: its points (index, run_id, job_id, overrides) and its command."""
    data = {"sweep": sweep, "array_job_id": array_job_id, "submitit_folder": submitit_folder,
            "submitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cwd": os.getcwd(), "argv": [sys.executable, "-m", "lrsweep", *sys.argv[1:]], "points": points}
    return atomic.write_json(manifest_dir(results_dir) / f"{sweep}-{array_job_id}.json", data)


def read_manifests(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every sweep manifest of the results dir, oldest submission first (a damaged one is reported
    by its path and skipped: lrsweep.atomic.read_json)."""
    d = manifest_dir(results_dir)
    found = [atomic.read_json(p, "sweep manifest", _manifest) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    return sorted((m for m in found if m is not None), key=lambda m: m["submitted_at"])


def _manifest(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not isinstance(data.get("submitted_at"), str) or not all(
            {"run_id", "job_id", "overrides"} <= set(p) for p in data["points"]):
        raise ValueError("not a sweep manifest: submitted_at and points with run_id, job_id and overrides")
    return data


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job id (``123`` or ``123_4``): squeue for live jobs, sacct for ended ones."""
    states: dict[str, str] = {}
    for line in (_run(["squeue", "-h", "-r", "-o", "%i|%T"]) or "").splitlines():
        jid, _, state = line.partition("|")
        states[jid.strip()] = state.strip()
    arrays = sorted({j.split("_")[0] for j in job_ids if j and j not in states})
    if arrays:
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)]) or ""
        for line in out.splitlines():
            jid, _, state = line.partition("|")
            if jid and jid not in states:
                states[jid] = state.split()[0] if state.strip() else ""
    return {j: states[j] for j in job_ids if j in states}


def active_run_ids(results_dir: str | os.PathLike) -> dict[str, str]:
    """run_id -> job id of the points whose latest job is still queued or running."""
    latest = _latest_jobs(read_manifests(results_dir))
    states = slurm_states([p["job_id"] for p in latest.values()]) if latest else {}
    return {rid: p["job_id"] for rid, p in latest.items() if states.get(p["job_id"]) in ACTIVE}


def _latest_jobs(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for m in manifests:
        for p in m["points"]:
            latest[p["run_id"]] = {**p, "manifest": m}
    return latest


@dataclass
class PointStatus:
    run_id: str
    status: str  # ok | failed | pending | running | missing
    job_id: str | None = None
    slurm_state: str | None = None
    detail: str = ""


def collect(results_dir: str | os.PathLike, query_slurm: bool = True) -> tuple[list[PointStatus], list[dict]]:
    """The status of every grid point known from rows or manifests, and the manifests."""
    found, damaged = scan_rows(results_dir)
    rows = {r.run_id: r for r in found}
    manifests = read_manifests(results_dir)
    latest = _latest_jobs(manifests)
    states = slurm_states([p["job_id"] for p in latest.values()]) if latest and query_slurm else {}
    out = []
    lost = {p.stem: p for p in damaged}  # a damaged row's point is missing (its file names it)
    for rid in sorted(set(rows) | set(latest) | set(lost)):
        row, point = rows.get(rid), latest.get(rid)
        job_id = point["job_id"] if point else (row.slurm_job_id if row else None)
        state = states.get(job_id) if job_id else None
        overrides = " ".join(point["overrides"]) if point else (row.run_name if row else "")
        if row is not None and row.status == "ok":
            out.append(PointStatus(rid, "ok", job_id, state, row.run_name))
        elif state in ACTIVE:
            out.append(PointStatus(rid, "pending" if state == "PENDING" else "running", job_id, state, overrides))
        elif row is not None:
            err = row.error or {}
            first_line = str(err.get("message", "")).splitlines()[0] if err.get("message") else ""
            out.append(PointStatus(rid, "failed", row.slurm_job_id or job_id, state,
                                   f"{row.run_name}: {err.get('type', '')}: {first_line}"))
        else:
            detail = f"damaged row {lost[rid]}: a rerun rewrites it" if rid in lost and not overrides else overrides
            out.append(PointStatus(rid, "missing", job_id, state, detail))
    return out, manifests


def resubmit_commands(points: list[PointStatus], manifests: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(cwd, argv) of each sweep that has failed or lost points: rerunning it submits only those."""
    redo = {p.run_id for p in points if p.status in ("failed", "missing")}
    cmds: list[tuple[str, list[str]]] = []
    for m in manifests:
        if redo & {p["run_id"] for p in m["points"]} and (m["cwd"], m["argv"]) not in cmds:
            cmds.append((m["cwd"], m["argv"]))
    return cmds


def _detached(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("hydra.launcher.wait=")] + ["hydra.launcher.wait=false"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lrsweep.status", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir")
    ap.add_argument("--resubmit", action="store_true", help="rerun the sweeps with failed or lost points (detached)")
    ap.add_argument("--no-slurm", action="store_true", help="rows and manifests only, no squeue/sacct")
    ap.add_argument("--json", action="store_true", help="one JSON object per grid point")
    args = ap.parse_args(argv)
    results_dir = os.path.abspath(args.results_dir)
    points, manifests = collect(results_dir, query_slurm=not args.no_slurm)
    if args.json:
        for p in points:
            print(json.dumps(p.__dict__))
    else:
        n = {s: sum(p.status == s for p in points) for s in ("ok", "failed", "pending", "running", "missing")}
        print(f"{results_dir}: {len(points)} grid points in {len(manifests)} submitted sweeps")
        for p in points:
            if p.status != "ok":
                state = f" [{p.slurm_state}]" if p.slurm_state else ""
                print(f"  {p.status:8} {p.run_id} job {p.job_id or '-'}{state} {p.detail}")
        print(f"ok {n['ok']}, failed {n['failed']}, missing {n['missing'] + n['pending'] + n['running']} "
              f"(pending {n['pending']}, running {n['running']})")
    cmds = resubmit_commands(points, manifests)
    for cwd, cmd in cmds:
        line = f"cd {shlex.quote(cwd)} && {shlex.join(_detached(cmd))}"
        if args.resubmit:
            print(f"[lrsweep.status] resubmitting: {line}", flush=True)
            subprocess.run(_detached(cmd), cwd=cwd, check=False)
        elif not args.json:
            print(f"resubmit failed/missing: {line}")
    return 0 if points and all(p.status == "ok" for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
