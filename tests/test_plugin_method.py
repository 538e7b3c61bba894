"""A method outside the lrsweep package, plugged in by ``method._target_`` with no edit to lrsweep."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
import torch

from conftest import FAST
from lrsweep import compress_matrix, job
from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRank

PLUGIN = textwrap.dedent('''
    """A user's own methods: a one-pass randomized range finder, and a data-aware variant."""
    import torch

    from lrsweep.factorization import LowRank
    from lrsweep.quant import quantize, tensor_bits


    def rangefinder(W, *, rank, bits=16, seed=0, stats=None, passes: int = 1):
        W = W.float()
        g = torch.Generator(device=W.device).manual_seed(seed)
        Q = torch.linalg.qr(W @ torch.randn(W.shape[1], rank, generator=g, device=W.device)).Q
        for _ in range(passes - 1):
            Q = torch.linalg.qr(W @ (W.T @ Q)).Q
        return LowRank.of(quantize(Q, bits), quantize(Q.T @ W, bits), solver=f"rangefinder(passes={passes})")


    def whitened(W, *, rank, bits=16, seed=0, stats=None):
        d = stats.absmean.float()
        U, S, Vh = torch.linalg.svd(W.float() * d, full_matrices=False)
        return LowRank.of(quantize(U[:, :rank] * S[:rank], bits), quantize(Vh[:rank] / d, bits))


    whitened.needs = ("absmean",)
    rangefinder.storage_bits = lambda n, d, rank, bits, **_: tensor_bits((n, rank), bits, "uniform") + \\
        tensor_bits((rank, d), bits, "uniform")
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "my_lr_methods.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_lr_methods", None)


def test_plugin_through_compress_matrix(plugin_dir):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 6, generator=g) @ torch.randn(6, 64, generator=g)
    f = compress_matrix(W, method="mine", target="my_lr_methods.rangefinder", rank=6, bits=32, passes=2)
    assert isinstance(f, LowRank) and f.rank == 6 and f.info["solver"] == "rangefinder(passes=2)"
    assert f.rel_error(W) < 1e-5
    assert f.storage_bits == 32 * 6 * (96 + 64)
    # the plugin's storage formula drives the budget like a built-in's
    b = compress_matrix(W, method="mine", target="my_lr_methods.rangefinder", budget=1.0, bits=8)
    assert b.rank == max(r for r in range(1, 65) if 8 * r * (96 + 64) + 128 <= 96 * 64)
    # a data-aware plugin declares `needs`; without the statistic the error names it
    with pytest.raises(ValueError, match="method mine needs the calibration statistic 'absmean'"):
        compress_matrix(W, method="mine", target="my_lr_methods.whitened", rank=4)
    X = torch.randn(128, 64, generator=g)
    assert compress_matrix(W, method="mine", target="my_lr_methods.whitened", rank=6, bits=32,
                           inputs=X).rel_error(W) < 1e-5
    with pytest.raises(ConfigError, match=re.escape("method._target_: cannot import")):
        compress_matrix(W, method="mine", target="my_lr_methods.nothing", rank=4)


def test_plugin_through_a_real_run(plugin_dir, compose, config_error, tmp_path):
    overrides = ["method._target_=my_lr_methods.rangefinder", "method.name=mine"]
    results = tmp_path / "results"
    cfg = compose(["method=custom", *overrides, "+method.passes=2", "rank=16", f"results_dir={results}", *FAST,
                   "eval.probe_train=64", "eval.probe_test=64"])
    assert job.run(cfg).status == "ok"
    rows = [json.loads(p.read_text()) for p in (results / "rows").glob("*.json")]
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "ok" and row["method"] == "mine"
    assert row["config"]["method"] == {"name": "mine", "_target_": "my_lr_methods.rangefinder", "passes": 2}
    assert set(row["extra"]["layer_ranks"].values()) == {16}
    assert 0 < row["recon_rel_err"] < 1 and row["accuracy"] is not None
    # an option the plugin does not take is a config error before launch (exit 2)
    bad = config_error("method=custom", *overrides, "+method.alpha=0.5", f"results_dir={results}", *FAST)
    assert bad.startswith("lrsweep: config error: method.alpha"), bad  # plugin_dir is on sys.path here
