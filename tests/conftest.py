"""Shared test setup: offline W&B, one model/probe cache per test session, Hydra compose helper."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PLUGINS = Path(__file__).resolve().parent / "plugins"

# Small, fast grid points: a fraction of the probe data, few latency repeats at one small shape, no W&B.
FAST = ["logger=none", "eval.probe_train=64", "eval.probe_test=64", "eval.latency.repeats=2",
        "eval.latency.warmup=1", "eval.latency.batch_size=2", "eval.latency.seq_len=16", "eval.latency.shapes=[]",
        "progress=false"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The default run spreads the test files over pytest-xdist workers (pyproject's addopts): each worker
# gets its share of the cores, so torch's threads do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One cache dir for the whole session (unless LRSWEEP_CACHE is set by the caller)."""
    if "LRSWEEP_CACHE" not in os.environ:
        os.environ["LRSWEEP_CACHE"] = str(tmp_path_factory.mktemp("lrsweep-cache"))
    yield


@pytest.fixture
def compose():
    """compose(overrides) -> the real config from conf/ through Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides: list[str] | None = None, hydra_cfg: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose("config", overrides=overrides or [], return_hydra_config=hydra_cfg)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def config_error(compose):
    """config_error(*overrides) -> the one line ``python -m lrsweep <overrides>`` prints on stderr for
    a refused single run (None: the config is valid), found in-process: Hydra composes the config and
    lrsweep.validate.validate runs the checks lrsweep.validate.ValidateCallback runs before launch.
    A few tests spawn the CLI itself to hold the contract around it (exit code 2, stderr is that line)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lrsweep.cli import _one_line
    from lrsweep.errors import ConfigError
    from lrsweep.validate import validate

    def _error(*overrides: str) -> str | None:
        try:
            validate(compose(list(overrides), hydra_cfg=True))
        except ConfigError as e:
            return f"lrsweep: config error: {e}"
        except (HydraException, OmegaConfBaseException) as e:
            return f"lrsweep: config error: {_one_line(e)}"
        return None

    return _error


@pytest.fixture(scope="session")
def _minilm_loaded(_session_cache):
    from omegaconf import OmegaConf

    from lrsweep import models

    return models.load(OmegaConf.load(CONF / "model" / "minilm.yaml"), "cpu", os.environ["LRSWEEP_CACHE"])


@pytest.fixture(scope="module")
def minilm(_minilm_loaded):
    """(MiniLM on CPU, its tokenizer), loaded once per session; each test module gets its own copy."""
    model, tok = _minilm_loaded
    return copy.deepcopy(model), tok


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m lrsweep <args>`` as a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "lrsweep", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def in_process_jobs(monkeypatch):
    """A local sweep's jobs run one after another in this process (submitit's job environment faked);
    the list it returns gets each launch's submitit executor."""
    from types import SimpleNamespace

    import submitit

    from lrsweep.sweep import submit

    executors = []

    class Done:  # a job that ran: its JobReturns, computed in this process
        def __init__(self, job_id: str, returns):
            self.job_id, self.returns = job_id, returns

        def done(self) -> bool:
            return True

        def results(self):
            return [self.returns]

    def submit_in_process(launcher, executor, args, while_last):
        executors.append(executor)
        return [Done(str(i), launcher(*a)) for i, a in enumerate(args)]

    monkeypatch.setattr(submit, "submit_local", submit_in_process)
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: SimpleNamespace(job_id="in-process"))
    return executors


@pytest.fixture
def launch(compose, tmp_path, monkeypatch):
    """launch(grid, *overrides, **launcher params) -> (launcher, JobReturns): grid is e.g. {"rank": [4, 8]};
    lrsweep.sweep.launch with fakelaunch.py's fake launcher and jobs, in-process."""
    from fakelaunch import BLOCK0, FakeLauncher

    from lrsweep import sweep

    base = [*FAST, BLOCK0, f"results_dir={tmp_path}"]
    monkeypatch.setenv("LRSWEEP_THREADS", "")  # launch() sets it for its jobs: restored after the test

    def _launch(grid: dict[str, list], *overrides: str, die_at=(), rows_before_death=0, **params):
        launcher = FakeLauncher(compose, [*base, *overrides], die_at, rows_before_death, **params)
        points = [[]]
        for key, values in grid.items():
            points = [[*p, f"{key}={v}"] for p in points for v in values]
        launcher.outcome = sweep.launch(launcher, points, 0)
        return launcher, launcher.outcome.returns

    yield _launch


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """cli(*args) -> (exit code, stdout, stderr) of ``python -m lrsweep <args> results_dir=<tmp>``,
    in-process (``lrsweep.cli.main`` with ``sys.argv`` set as the shell would)."""
    from hydra.core.global_hydra import GlobalHydra

    from lrsweep.cli import main

    monkeypatch.setenv("LRSWEEP_THREADS", "")  # a launch sets it for its jobs: restored after the test

    def _cli(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["lrsweep", *args, f"results_dir={tmp_path / 'results'}"])
        GlobalHydra.instance().clear()
        try:
            with pytest.raises(SystemExit) as e:
                main()
        finally:
            GlobalHydra.instance().clear()
        out = capsys.readouterr()
        return e.value.code, out.out, out.err

    return _cli


@pytest.fixture(scope="module")
def tiny_lm():
    """A real (random-weight) Llama causal LM, small enough to score by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _logging_restored():
    """Put the logging configuration back after each test: Hydra's apps and run_job configure the root
    logger with handlers on the streams of the moment (pytest's captured stdout), which a later test
    would find closed ("--- Logging error ---" on its stderr)."""
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    saved = {lg: (lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers}
    yield
    for lg in [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger))]:
        handlers, level, propagate, disabled = saved.get(lg, ([], logging.NOTSET, True, False))
        pytests = [h for h in lg.handlers if type(h).__module__.startswith("_pytest")]  # pytest's own capture
        for h in lg.handlers:
            if h not in handlers and h not in pytests:
                h.close()
        lg.handlers[:] = [*(h for h in handlers if h not in pytests), *pytests]
        lg.level, lg.propagate, lg.disabled = level, propagate, disabled
