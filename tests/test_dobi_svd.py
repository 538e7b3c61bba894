"""Dobi-SVD (method=dobi_svd): soft truncation of activations, trained positions, IPCA update, remapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lrsweep import methods
from lrsweep.compress import compress_matrix
from lrsweep.methods import LayerStats
from lrsweep.methods.dobi_svd import DobiSVDOptions, Remapped, fit_ranks, remap_bits, soft_truncate, train


def test_soft_truncation_is_the_rank_r_truncation_of_each_sequence_when_sharp():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 12, 8, generator=g, dtype=torch.float64)
    out, _ = soft_truncate(A, torch.tensor(3.5, dtype=torch.float64), beta=60.0)
    for b in range(3):
        U, S, Vh = torch.linalg.svd(A[b], full_matrices=False)
        assert torch.allclose(out[b], (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-9)
    same, _ = soft_truncate(A, torch.tensor(100.0, dtype=torch.float64), beta=1.0)
    assert torch.allclose(same, A, atol=1e-9)


def _P(W, X, r, T=10):
    A = (X @ W.T).reshape(-1, T, W.shape[0])
    Vh = torch.linalg.svd(A, full_matrices=False)[2][:, :r]
    return torch.einsum("bki,bkj->ij", Vh, Vh)


def test_ipca_update_recovers_a_weight_whose_outputs_span_r_directions():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(9, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 14, generator=g, dtype=torch.float64)
    X = torch.randn(60, 14, generator=g, dtype=torch.float64)
    st = LayerStats(prepared={"P": _P(W, X, 3), "gamma": 40.0})
    f = compress_matrix(W, "dobi_svd", rank=3, bits=32, stats=st)
    assert torch.allclose(f.values().double(), W, atol=1e-5)
    with pytest.raises(ValueError, match="trained truncation positions"):
        compress_matrix(W, "dobi_svd", rank=3, inputs=X)


def test_remapped_bits_are_counted_from_the_stored_tensors():
    n, d, r = 10, 24, 4
    g = torch.Generator().manual_seed(2)
    f = Remapped.of(torch.randn(n, r, generator=g), torch.randn(r, d, generator=g))
    assert f.storage_bits == sum(q.storage_bits for q in f.stored.values()) == remap_bits(n, d, r)
    assert remap_bits(n, d, r) == r * (16 * max(n, d) + 32)
    L, R = f.factors()
    assert L.shape == (n, r) and R.shape == (r, d)
    spec = methods.REGISTRY["dobi_svd"]
    # param_ratio is the memory ratio: rank p n d / (max(n, d) + 2), not p n d / (n + d)
    assert methods.rank_for_param_ratio(spec, 100, 40, 0.5, remap=True) == math.floor(0.5 * 100 * 40 / 102)
    assert methods.rank_for_param_ratio(spec, 100, 40, 0.5) == math.floor(0.5 * 100 * 40 / 140)


def test_fit_ranks_stays_within_the_budget():
    shapes = {"a": (8, 8), "b": (8, 16)}

    def cost(n, r):
        return r * sum(shapes[n])

    ranks = fit_ranks({"a": 7.2, "b": 5.1}, shapes, cost, 0.5)
    assert sum(cost(n, r) for n, r in ranks.items()) <= 0.5 * (64 + 128)
    assert all(1 <= r <= min(shapes[n]) for n, r in ranks.items())


def test_training_meets_the_ratio_and_collects_components():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
    dense = nn.Sequential(*list(model))
    batches = [torch.randn(4, 12, 16) for _ in range(3)]
    with torch.no_grad():
        targets = [dense(b) for b in batches]

    def loss_fn(m, batch):
        i = next(k for k, b in enumerate(batches) if b is batch)
        return ((m(batch) - targets[i]) ** 2).mean(dim=(1, 2))

    layers = {"0": model[0], "2": model[2]}
    o = DobiSVDOptions(epochs=3, lr=0.5)
    stats, ranks, info = train(model, layers, batches, loss_fn, 0.5, o)
    assert sum(r * 40 for r in ranks.values()) <= 0.5 * 2 * 16 * 24
    assert all(1 <= r <= 16 for r in ranks.values())
    assert len(info["train_loss"]) == 3 * 3 and all(math.isfinite(x) for x in info["train_loss"])
    for name in layers:
        P = stats[name].prepared["P"]
        assert P.shape == (layers[name].out_features,) * 2
        assert torch.linalg.eigvalsh(P).min() > -1e-8
    assert torch.equal(model[0].weight, dense[0].weight)


@pytest.mark.parametrize("overrides,key", [(["~calib", "param_ratio=0.8"], "calib"), ([], "param_ratio"),
                                           (["param_ratio=0.8", "stream=true"], "stream")])
def test_what_it_cannot_run_exits_with_one_line(config_error, tmp_path, overrides, key):
    msg = config_error("method=dobi_svd", *overrides, f"results_dir={tmp_path}")
    assert msg is not None and msg.startswith(f"lrsweep: config error: {key}:") and "\n" not in msg, msg


@pytest.mark.slow
def test_a_sweep_point_trains_then_compresses(compose, tmp_path):
    from conftest import FAST

    from lrsweep import job

    row = job.run(compose([*FAST, "method=dobi_svd", "param_ratio=0.6", "method.epochs=1", "calib.n_samples=16",
                           "calib.batch_size=8", "calib.seq_len=32", r"model.targets='encoder\.layer\.[01]\..*'",
                           f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]))
    assert row.status == "ok", row.error
    assert row.param_ratio_measured <= 0.6
    prepared = row.extra["calib"]["prepared"]
    assert prepared["train_seconds"] > 0 and len(prepared["train_loss"]) == 2


def test_paper_preset_composes_and_validates(compose):
    from test_protocol import NEWS_CALIB, NEWS_EVAL

    from lrsweep.validate import validate

    cfg = compose(["experiment=dobi_svd_paper", "model=smollm2", "param_ratio=0.8", *NEWS_EVAL, *NEWS_CALIB],
                  hydra_cfg=True)
    assert cfg.method.name == "dobi_svd" and cfg.method.remap is True
    assert cfg.hydra.sweeper.params.param_ratio == "0.8,0.6,0.4"
    cfg.hydra = None
    validate(cfg)
