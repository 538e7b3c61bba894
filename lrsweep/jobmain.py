"""The command a sweep's jobs start with: submitit's own job entry point, with Python's cyclic
garbage collector off until the job has imported its libraries and loaded its dense model.

A job process spends its first seconds importing torch, transformers' modeling code and lrsweep
and building the model: ~400,000 objects that live as long as the job, which the collector walks
again and again (6 full and ~90 younger passes; ~1.3 s of ~7.8 s on this repo's 2-core VM, for the
job's imports and MiniLM's load alone; ``benchmarks/slurm_overhead.py`` times whole sweeps).
:func:`startup_done` (called once the dense model is loaded) moves everything alive into the
permanent generation (``gc.freeze``) and turns the collector back on, so every grid point runs with
it as usual. ``python -m lrsweep`` imports its CLI the same way (:func:`pause`, then
:func:`startup_done`).

lrsweep.sweep makes submitit start jobs as ``python -u -m lrsweep.jobmain -u -m submitit.core._submit
<folder>`` (the executor's ``python`` command becomes ``python -u -m lrsweep.jobmain`` unless it is not
this interpreter, e.g. a container's), on a local machine or in a SLURM array alike. This module
imports nothing but the standard library.
"""

from __future__ import annotations

import gc
import runpy
import sys

_PAUSED: list[bool] = []  # [True] while this module keeps the collector off


def main(argv: list[str]) -> None:
    """``argv``: ``-u -m <module> <args...>`` (what submitit appends to its python command; this
    interpreter was started with ``-u`` itself): run ``<module>`` as ``__main__`` with ``<args...>``,
    the collector off."""
    if len(argv) < 3 or argv[:2] != ["-u", "-m"]:
        raise SystemExit(f"usage: python -u -m lrsweep.jobmain -u -m <module> [args...] (got {argv})")
    pause()
    sys.argv = [argv[2], *argv[3:]]
    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)


def pause() -> None:
    """Turn the collector off until :func:`startup_done` (unless something else turned it off)."""
    if gc.isenabled():
        gc.disable()
        _PAUSED.append(True)


def startup_done() -> None:
    """The process has loaded what it works on: freeze it and turn the collector on (when :func:`pause`
    turned it off; a no-op otherwise, e.g. in tests or after the CLI's own imports)."""
    if _PAUSED:
        _PAUSED.clear()
        gc.freeze()
        gc.enable()


if __name__ == "__main__":  # run as a script: call the module lrsweep.job will import, not this copy
    import lrsweep.jobmain

    lrsweep.jobmain.main(sys.argv[1:])
