"""Basis Sharing (method=basis_sharing): one whitened basis per group of same-type layers, counted once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrsweep.compress import compress_, compress_matrix
from lrsweep.errors import ConfigError
from lrsweep.methods import LayerStats
from lrsweep.methods.basis_sharing import BasisSharingOptions, group_rank, joint
from lrsweep.methods.svdllm import cholesky_shifted


def _group(k=3, n=6, d=10, N=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ws = {f"layers.{i}.up": torch.randn(n, d, generator=g, dtype=torch.float64) for i in range(k)}
    stats = {}
    for name in Ws:
        X = torch.randn(N, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2, d, dtype=torch.float64)
        stats[name] = LayerStats.from_inputs(X)
    return Ws, stats


def test_truncation_loss_is_the_sum_of_discarded_squared_singular_values():
    """Σ_i ||(W_i - L_i R) C||^2 (C C^T = Σ_i X_i^T X_i) equals the tail of the stacked whitened spectrum."""
    Ws, stats = _group()
    C, _ = cholesky_shifted(sum(s.xtx for s in stats.values()), 1e-6)
    S = torch.linalg.svdvals(torch.cat(list(Ws.values())) @ C)
    for r in (2, 5):
        fs = joint(Ws, stats, BasisSharingOptions(group=3), rank=r, bits=32)
        loss = sum(float(((W - fs[nm].values().double()) @ C).norm() ** 2) for nm, W in Ws.items())
        assert loss == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-5)


def test_layers_built_on_one_basis_are_recovered_exactly():
    Ws, stats = _group()
    B = torch.randn(3, 10, dtype=torch.float64)
    Ws = {nm: torch.randn(6, 3, dtype=torch.float64) @ B for nm in Ws}
    fs = joint(Ws, stats, BasisSharingOptions(group=3), rank=3, bits=32)
    for nm, W in Ws.items():
        assert torch.allclose(fs[nm].values().double(), W, atol=1e-5)


def test_the_shared_basis_is_stored_and_counted_once():
    Ws, stats = _group(k=2, n=6, d=10)
    o = BasisSharingOptions(group=2)
    r = group_rank(2, 6, 10, o, rank=None, bits=16, budget=None, param_ratio=0.6)
    assert r == int(2 * 6 * 10 * 0.6 / (10 + 2 * 6))  # the reference's rule
    fs = list(joint(Ws, stats, o, rank=None, bits=16, param_ratio=0.6).values())
    assert [f.rank for f in fs] == [r, r]
    assert fs[0].params == r * (6 + 10) and fs[1].params == r * 6
    assert sum(f.params for f in fs) <= 0.6 * 2 * 6 * 10
    bits = sum(f.storage_bits for f in fs)
    assert bits == sum(q.storage_bits for f in fs for q in f.stored.values()) == 16 * r * (10 + 2 * 6)
    b = group_rank(2, 6, 10, o, rank=None, bits=16, budget=8.0, param_ratio=None)
    assert 16 * b * (10 + 12) <= 8.0 * 120 < 16 * (b + 1) * (10 + 12)


def test_one_matrix_is_svdllm_and_a_group_needs_a_model():
    Ws, stats = _group(k=1)
    W, st = next(iter(Ws.values())), next(iter(stats.values()))
    a = compress_matrix(W, "basis_sharing", rank=4, bits=32, stats=st, group=1).values().double()
    b = compress_matrix(W, "svdllm", rank=4, bits=32, stats=st).values().double()
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="shares a basis across layers"):
        compress_matrix(W, "basis_sharing", rank=4, stats=st)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(8, 12)
        self.mlp.down_proj = nn.Linear(12, 8)


def _model(blocks=4):
    torch.manual_seed(0)
    m = nn.Module()
    m.layers = nn.ModuleList([_Block() for _ in range(blocks)])
    stats = {}
    for name, lin in m.named_modules():
        if isinstance(lin, nn.Linear):
            stats[name] = LayerStats.from_inputs(torch.randn(40, lin.in_features))
    return m, stats


def test_compress_model_shares_one_basis_module_per_group():
    m, stats = _model()
    x = torch.randn(5, 8)
    res = compress_(m, "basis_sharing", rank=3, bits=32, stats=stats, group=2)
    by = {r.name: r for r in res}
    up0, up1, up2 = (m.layers[i].mlp.up_proj for i in range(3))
    assert up0.first is up1.first and up0.first is not up2.first  # groups (0, 1), (2, 3)
    assert m.layers[0].mlp.down_proj.first is not m.layers[1].mlp.down_proj.first  # private
    assert by["layers.0.mlp.up_proj"].params == 3 * (8 + 12) and by["layers.1.mlp.up_proj"].params == 3 * 12
    assert by["layers.0.mlp.down_proj"].params == 3 * (12 + 8)
    stored = sum(r.params for r in res)
    held = sum(p.numel() for nm, p in m.named_parameters() if not nm.endswith("bias"))
    assert stored == held  # what the model holds is what the row counts
    assert torch.isfinite(m.layers[1].mlp.up_proj(x)).all()


def test_a_group_that_does_not_divide_the_layers_names_both_numbers():
    m, stats = _model(blocks=4)
    with pytest.raises(ConfigError, match=r"3 does not divide the 4 layers of type layers\.\*\.mlp\.up_proj"):
        compress_(m, "basis_sharing", rank=3, stats=stats, group=3)


@pytest.mark.parametrize("overrides,key,fragment", [
    (["method.group=4"], "method.group", "4 does not divide the 6 layers"),
    (["stream=true"], "stream", "one block at a time"),
    (["calib.sequential=true"], "calib.sequential", "one block at a time"),
    (["allocation=spectrum", "param_ratio=0.5"], "allocation", "one per group"),
    (["save_compressed=true"], "save_compressed", "once per layer"),
    (["~calib"], "calib", "no calibration data"),
])
def test_what_it_cannot_do_exits_with_one_line(config_error, tmp_path, overrides, key, fragment):
    msg = config_error("method=basis_sharing", *overrides, f"results_dir={tmp_path}")
    assert msg is not None and msg.startswith(f"lrsweep: config error: {key}:") and fragment in msg, msg
    assert "\n" not in msg


def test_paper_preset_composes_and_validates(compose):
    from test_protocol import NEWS_CALIB, NEWS_EVAL

    from lrsweep.validate import validate

    cfg = compose(["experiment=basis_sharing_paper", "model=smollm2", "param_ratio=0.8", *NEWS_EVAL, *NEWS_CALIB],
                  hydra_cfg=True)
    assert cfg.method.name == "basis_sharing" and cfg.method.group == 2
    assert cfg.hydra.sweeper.params.param_ratio == "0.8,0.7,0.6,0.5"
    cfg.hydra = None
    validate(cfg)


def test_per_layer_kept_fractions_are_refused_ranks_are_plotted():
    import pandas as pd

    from analysis.layers import rank_frame

    extra = {"layer_ranks": {"layers.0.mlp.up_proj": 3, "layers.1.mlp.up_proj": 3},
             "layer_shapes": {"layers.0.mlp.up_proj": [12, 8], "layers.1.mlp.up_proj": [12, 8]}}
    df = pd.DataFrame([{"model": "m", "method": "basis_sharing", "extra": extra}])
    assert list(rank_frame(df)["value"]) == [3.0, 3.0]
    with pytest.raises(ValueError, match="shares factors across layers"):
        rank_frame(df, fraction=True)
    df["method"] = "svdllm"
    assert rank_frame(df, fraction=True)["value"].iloc[0] == pytest.approx(3 * 20 / 96)


@pytest.mark.slow
def test_a_sweep_point_counts_each_basis_once(compose, tmp_path):
    from conftest import FAST

    from lrsweep import job

    row = job.run(compose([*FAST, "method=basis_sharing", "param_ratio=0.6", "calib.n_samples=8",
                           "calib.batch_size=8", "calib.seq_len=32", f"results_dir={tmp_path}",
                           f"cache_dir={tmp_path}/cache"]))
    assert row.status == "ok", row.error
    assert row.param_ratio_measured <= 0.6
    assert row.param_ratio_measured > 0.55  # the shared bases are not counted per layer (that would exceed 0.6)
