"""svd.reuse(): allocation reads each layer's spectrum through the method, compression reuses its SVD."""

from __future__ import annotations

import pytest
import torch

from lrsweep import allocate, methods
from lrsweep.methods import LayerStats
from lrsweep.methods import svd as svd_mod


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W, X = torch.randn(24, 16, generator=g), torch.randn(200, 16, generator=g).abs() + 0.1
    stats = LayerStats.from_inputs(X)
    stats.fisher = torch.rand(24, 16, generator=g)
    return W, stats


def test_reused_truncation_is_bitwise_the_fresh_one():
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    fresh = svd_mod.truncated_svd(W, 7)
    with svd_mod.reuse() as scope:
        first = svd_mod.truncated_svd(W, 3)
        again = svd_mod.truncated_svd(W.clone(), 7)  # same bytes, another tensor: a hit
        other = svd_mod.truncated_svd(W + 1e-6, 7)  # other bytes: decomposed on its own
    assert scope["hits"] == 1 and len(scope["svds"]) == 2
    for a, b in zip(fresh[:3], again[:3], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first[1], fresh[1][:3])
    assert not torch.equal(other[1], fresh[1])
    assert not svd_mod.in_scope()


def test_content_key_hashes_a_storage_once_and_sees_in_place_changes(monkeypatch):
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(4))
    hashed = []
    real = svd_mod._hash
    monkeypatch.setattr(svd_mod, "_hash", lambda t: hashed.append(1) or real(t))
    with svd_mod.reuse():
        first = svd_mod.content_key(W)
        assert svd_mod.content_key(W.detach()) == first and len(hashed) == 1  # same storage: not hashed again
        W[3, 4] += 1.0  # changed in place: the fingerprint differs, hashed again
        changed = svd_mod.content_key(W)
        assert changed != first and len(hashed) == 2
        assert svd_mod.content_key(W[:10]) != changed  # another view of the storage is its own matrix
    assert changed == real(W) and svd_mod.content_key(W) == changed  # outside a scope: always hashed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["svdllm", "drone", "asvd", "fwsvd"])
def test_scaled_methods_key_their_matrix_by_its_inputs(method, dtype, monkeypatch):
    """Inside a scope svdllm (W C), drone (W V S), asvd (W S) and fwsvd (diag(w) W) neither hash nor
    recompute the matrix they decompose for a layer seen before, and derive C, V S, S or w once for
    the layers sharing the statistic (fwsvd's Fisher is per layer); a bf16 W is hashed as stored, once
    (not its fp32 copy, new at every call)."""
    W, stats = _data()
    W = W.to(dtype)
    hashed = []
    real_hash = svd_mod._hash
    monkeypatch.setattr(svd_mod, "_hash", lambda t: hashed.append(t.dtype) or real_hash(t))
    fn = methods.REGISTRY[method].fn
    with svd_mod.reuse() as scope:
        a = fn(W, rank=3, bits=32, seed=0, stats=stats)
        b = fn(W, rank=5, bits=32, seed=0, stats=stats)
        if method != "fwsvd":
            fn(W[:7], rank=2, bits=32, seed=0, stats=stats)  # another layer reading the same statistic
    layers = 1 if method == "fwsvd" else 2
    assert hashed == [dtype] * layers and scope["hits"] == 1  # each W hashed once, the product never
    assert sum(scope["memo_hits"].values()) == layers  # the statistic's factor derived once for all calls
    monkeypatch.setattr(svd_mod, "_hash", real_hash)
    fresh = fn(W, rank=5, bits=32, seed=0, stats=stats)
    assert torch.equal(b.reconstruct(), fresh.reconstruct()) and a.rank == 3


@pytest.mark.parametrize("method,opts", [("svd", {}), ("svdllm", {}), ("asvd", {}), ("fwsvd", {}),
                                         ("fwsvd", {"side": "input"}), ("drone", {})])
def test_method_spectrum_is_the_methods_own(method, opts):
    """The spectrum read through the method equals the one computed in its metric, its rank-r weight is
    the method's output, and compressing again in the scope decomposes nothing."""
    W, stats = _data()
    spec = methods.REGISTRY[method]
    with svd_mod.reuse() as scope:
        sp = allocate.method_spectrum(W, spec, stats, opts, bits=32, seed=5)
        assert sp is not None and sp.source == "method"
        computed = 1
        assert len(scope["svds"]) == computed
        for r in (2, 6):
            f = spec.fn(W, rank=r, bits=32, seed=5, stats=stats, **opts)
            assert torch.equal(sp.approx(r), f.reconstruct())
        assert len(scope["svds"]) == computed and scope["hits"] == 4
    ref = allocate.spectrum(W, spec, stats, opts)  # from the method's metric hook (W itself for svd)
    assert torch.allclose(sp.S, ref.S, rtol=1e-4, atol=1e-6)
    fresh = spec.fn(W, rank=6, bits=32, seed=5, stats=stats, **opts).reconstruct()
    assert torch.allclose(sp.approx(6), fresh, atol=1e-5)


def test_methods_without_a_reusable_svd_fall_back():
    W, stats = _data()
    with svd_mod.reuse():
        assert allocate.method_spectrum(W, methods.REGISTRY["lplr"], None, {}, bits=8, seed=0) is None
        assert allocate.method_spectrum(W, methods.REGISTRY["asvd"], stats, {"solver": "lowrank"}, 32, 0) is None


def test_allocated_compression_decomposes_each_layer_once(compose, tmp_path, monkeypatch):
    """A whole allocation + compression: every layer's SVD is computed once (by the allocation)."""
    from conftest import FAST
    from lrsweep.job import run

    from lrsweep.methods import svdllm as svdllm_mod

    monkeypatch.setitem(allocate.CHECK_SAMPLES, "encoder", 64)  # the check's plumbing, not its power
    calls, runs = [], []
    real, real_t = svd_mod._truncated_svd, svdllm_mod.truncated_svd
    monkeypatch.setattr(svd_mod, "_truncated_svd", lambda W, r, d: calls.append(W.shape) or real(W, r, d))
    # one per svdllm run
    monkeypatch.setattr(svdllm_mod, "truncated_svd", lambda *a, **k: runs.append(1) or real_t(*a, **k))
    cfg = compose([*FAST, "param_ratio=0.5", "allocation=spectrum", "method=svdllm", "calib.n_samples=16",
                   "model.targets='encoder\\.layer\\.0\\..*'", f"results_dir={tmp_path}", "logger=none",
                   "eval.latency.repeats=1", "eval.latency.shapes=[]"])
    row = run(cfg)
    assert row.status == "ok", row.error
    assert len(calls) == row.layers_compressed == 6
    info = row.extra["allocation"]
    assert info["spectra"] == {"method": 6, "metric": 0}
    # svdllm runs at rank 1 to expose each spectrum and once per (layer, rank) the check scores; the
    # compression at the shipped ranks takes the check's results instead of running it again
    checked = {(n, r) for ranks in (info["uniform_ranks"], info["candidate_ranks"]) for n, r in ranks.items()}
    assert len(runs) == 6 + len(checked)
