"""Property tests of every registered method (a new method is picked up by the parametrization).

Small matrices (96 x 64) keep the whole file to a few seconds on one core.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from lrsweep import compress_matrix
from lrsweep.errors import ConfigError
from lrsweep.methods import REGISTRY, LayerStats
from lrsweep.methods.kronecker import auto_a_shape
from lrsweep.methods.lplr import cr_rank
from lrsweep.quant import SUPPORTED_BITS

N, D, R = 96, 64, 8
# methods that factorize one matrix alone; basis_sharing (one basis across layers) and dobi_svd
# (truncation trained on the model) are tested on models: tests/test_basis_sharing.py, test_dobi_svd.py
ALL = sorted(m for m in REGISTRY if REGISTRY[m].spans is None and REGISTRY[m].prepare is None)
RANKED = [m for m in ALL if REGISTRY[m].has_rank]
XTX = [m for m in ALL if "xtx" in REGISTRY[m].needs]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def typical(n=N, d=D, seed=0) -> torch.Tensor:
    """A weight-like matrix: decaying spectrum plus noise."""
    g = gen(seed)
    U = torch.linalg.qr(torch.randn(n, d, generator=g)).Q
    V = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    return (U * torch.logspace(0, -1.5, d)) @ V.T + 0.01 * torch.randn(n, d, generator=g)


def exact_input(method: str, rank: int, seed: int = 0) -> torch.Tensor:
    """A matrix the method represents exactly at ``rank``: a sum of ``rank`` terms of its structure."""
    g = gen(seed)
    if method == "kronecker":
        n1, d1 = auto_a_shape(N, D)
        return sum(torch.kron(torch.randn(n1, d1, generator=g), torch.randn(N // n1, D // d1, generator=g))
                   for _ in range(rank))
    return torch.randn(N, rank, generator=g) @ torch.randn(rank, D, generator=g)


def calib(seed: int = 1, n_tokens: int = 256, x_rank: int | None = None) -> dict:
    """inputs= and fisher= arguments accepted by every method (methods ignore what they do not need)."""
    g = gen(seed)
    mix = torch.randn(x_rank, D, generator=g) if x_rank else torch.eye(D)
    X = torch.randn(n_tokens, x_rank or D, generator=g) @ mix
    X = X * torch.rand(D, generator=g) * 2  # uneven channel magnitudes
    F = torch.rand(N, D, generator=g) * torch.logspace(-3, 1, N)[:, None]  # uneven row importance
    return {"inputs": X, "fisher": F}


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W.double() - W_hat.double()) @ X.double().T))


def fisher_error(W: torch.Tensor, W_hat: torch.Tensor, F: torch.Tensor) -> float:
    w = F.double().sum(1).sqrt()
    return float(torch.linalg.norm(w[:, None] * (W.double() - W_hat.double())))


# ---- exactness -----------------------------------------------------------------------------


def test_svd_eckart_young_equality():
    W = typical()
    S = torch.linalg.svdvals(W.double())
    for r in (1, 8, 40):
        f = compress_matrix(W, "svd", rank=r, bits=32)
        err2 = float(torch.linalg.norm(W.double() - f.reconstruct().double()) ** 2)
        assert err2 == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-4)


def test_rsvd_near_eckart_young():
    W = typical()
    best = compress_matrix(W, "svd", rank=8, bits=32).rel_error(W)
    assert compress_matrix(W, "rsvd", rank=8, bits=32).rel_error(W) <= best * 1.01


@pytest.mark.parametrize("method", ALL)
def test_unquantized_factorization_recovers_exact_input(method):
    W = exact_input(method, R)
    f = compress_matrix(W, method, rank=R, bits=32, **calib())
    assert f.rel_error(W) < 1e-4, f"{method}: {f.rel_error(W)}"


def test_kronecker_recovers_a_kron_b_and_applies_without_materializing():
    g = gen(3)
    A, B = torch.randn(8, 4, generator=g), torch.randn(12, 16, generator=g)
    W = torch.kron(A, B)
    f = compress_matrix(W, "kronecker", rank=1, bits=32, a_shape=[8, 4])
    assert f.rel_error(W) < 1e-6
    A_hat, B_hat = f.factors()
    assert torch.allclose(torch.kron(A_hat[0], B_hat[0]), W, atol=1e-5)
    x = torch.randn(5, 3, D, generator=g)
    with torch.no_grad():
        assert torch.allclose(f.as_module(None)(x), x @ W.T, atol=1e-4)
    # a sum of two products needs two terms; one term is the best single product, not exact
    W2 = W + torch.kron(torch.randn(8, 4, generator=g), torch.randn(12, 16, generator=g))
    assert compress_matrix(W2, "kronecker", rank=2, bits=32, a_shape=[8, 4]).rel_error(W2) < 1e-6
    assert compress_matrix(W2, "kronecker", rank=1, bits=32, a_shape=[8, 4]).rel_error(W2) > 0.1


# ---- data- and task-aware ----------------------------------------------------------------------


@pytest.mark.parametrize("method", XTX)
def test_xtx_methods_zero_output_error_when_inputs_have_low_rank(method):
    W = typical()
    kw = calib(x_rank=R)
    f = compress_matrix(W, method, rank=R, bits=32, **kw)
    X = kw["inputs"]
    assert output_error(W, f.reconstruct(), X) <= 1e-5 * output_error(W, torch.zeros_like(W), X)
    svd = compress_matrix(W, "svd", rank=R, bits=32)
    assert output_error(W, svd.reconstruct(), X) > 1e-2 * output_error(W, torch.zeros_like(W), X)


@pytest.mark.parametrize("method", XTX)
@pytest.mark.parametrize("rank", [4, 16, 48])
def test_xtx_methods_never_more_output_error_than_svd(method, rank):
    W = typical(seed=rank)
    kw = calib(seed=rank)
    f = compress_matrix(W, method, rank=rank, bits=32, **kw)
    svd = compress_matrix(W, "svd", rank=rank, bits=32)
    X = kw["inputs"]
    assert output_error(W, f.reconstruct(), X) <= output_error(W, svd.reconstruct(), X) * (1 + 1e-6)


@pytest.mark.parametrize("rank", [4, 16, 48])
def test_fwsvd_never_more_fisher_weighted_error_than_svd(rank):
    W = typical(seed=rank)
    F = calib(seed=rank)["fisher"]
    f = compress_matrix(W, "fwsvd", rank=rank, bits=32, fisher=F)
    svd = compress_matrix(W, "svd", rank=rank, bits=32)
    assert fisher_error(W, f.reconstruct(), F) <= fisher_error(W, svd.reconstruct(), F) * (1 + 1e-6)
    assert fisher_error(W, f.reconstruct(), F) < 0.9 * fisher_error(W, svd.reconstruct(), F)


def test_asvd_with_alpha_zero_is_svd():
    W = typical()
    kw = calib()
    a = compress_matrix(W, "asvd", rank=R, bits=32, alpha=0.0, **kw)
    assert torch.allclose(a.reconstruct(), compress_matrix(W, "svd", rank=R, bits=32).reconstruct(), atol=1e-5)
    b = compress_matrix(W, "asvd", rank=R, bits=32, alpha=1.0, **kw)
    assert b.info["alpha"] == 1.0 and not torch.allclose(a.reconstruct(), b.reconstruct(), atol=1e-3)


def test_svdllm_records_shift_on_singular_xtx():
    W = typical()
    pd = compress_matrix(W, "svdllm", rank=R, bits=32, **calib())
    singular = compress_matrix(W, "svdllm", rank=R, bits=32, **calib(x_rank=R))
    assert pd.info["cholesky_shift"] == 0.0
    assert singular.info["cholesky_shift"] > 0.0


@pytest.mark.parametrize("method", [m for m in ALL if REGISTRY[m].needs])
def test_missing_statistics_name_the_statistic(method):
    need = REGISTRY[method].needs[0]
    with pytest.raises(ValueError, match=f"method {method} needs the calibration statistic '{need}'"):
        compress_matrix(typical(), method, rank=R)
    stats = LayerStats.from_inputs(calib()["inputs"])  # precomputed statistics work like inputs=
    stats.fisher = calib()["fisher"]
    expected = R if REGISTRY[method].has_rank else min(typical().shape)  # gptq: no rank, like quant
    assert compress_matrix(typical(), method, rank=R, stats=stats).rank == expected


# ---- quantized variants ------------------------------------------------------------------------


def test_lplr_error_falls_as_bits_rise():
    W = typical()
    errs = [compress_matrix(W, "lplr", rank=16, bits=b, seed=0).rel_error(W) for b in (2, 3, 4, 8, 16, 32)]
    assert all(a > b for a, b in itertools.pairwise(errs[:-1])), errs
    assert errs[-1] <= errs[-2] * (1 + 1e-4)


@pytest.mark.parametrize("kind", ["typical", "gaussian"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsvd_no_worse_than_dsvd_at_equal_bits(kind, bits):
    W = typical() if kind == "typical" else torch.randn(N, D, generator=gen(5))
    lsvd = compress_matrix(W, "lsvd", rank=16, bits=bits)
    dsvd = compress_matrix(W, "dsvd", rank=16, bits=bits)
    assert lsvd.storage_bits == dsvd.storage_bits
    assert lsvd.rel_error(W) <= dsvd.rel_error(W) * (1 + 1e-6)


def test_losparse_sparse_residual_helps_and_density_counts():
    W = typical()
    svd = compress_matrix(W, "svd", rank=R, bits=8)
    sparse = [compress_matrix(W, "losparse", rank=R, bits=8, density=p) for p in (0.01, 0.05, 0.2)]
    errs = [f.rel_error(W) for f in sparse]
    assert errs[0] < svd.rel_error(W) and errs[0] > errs[1] > errs[2]
    assert [f.info["nnz"] for f in sparse] == [round(p * N * D) for p in (0.01, 0.05, 0.2)]
    assert sparse[0].storage_bits < sparse[1].storage_bits < sparse[2].storage_bits


# ---- storage accounting ------------------------------------------------------------------------


def stored_bits(f) -> int:
    """Bits of the tensors written: entries at their bits (codes must fit), metadata at dtype width."""
    total = 0
    for q in f.stored.values():
        entries = q.codes if q.codes is not None else q.value
        if q.codes is not None:
            assert int(q.codes.min()) >= 0 and int(q.codes.max()) < 2**q.bits
        total += entries.numel() * q.bits + sum(t.numel() * t.element_size() * 8 for t in q.meta.values())
    return total


@pytest.mark.parametrize("scheme", ["uniform", "channel", "group"])
@pytest.mark.parametrize("bits", [3, 8, 16, 32])
@pytest.mark.parametrize("method", ALL)
def test_storage_bits_match_stored_tensors_and_formula(method, bits, scheme):
    W = typical()
    opts = {"scheme": scheme, "group_size": 32}
    f = compress_matrix(W, method, rank=R, bits=bits, **calib(), **opts)
    spec = REGISTRY[method]
    assert f.storage_bits == stored_bits(f) == spec.storage_bits(N, D, f.rank, bits, **opts)
    if bits < 16 and spec.has_rank:
        assert f.storage_bits < N * D * 16


@pytest.mark.parametrize("method", RANKED)
def test_budget_picks_largest_rank_that_fits(method):
    W = typical()
    spec = REGISTRY[method]
    budget = 2.0 + spec.storage_bits(N, D, 0, 8) / (N * D)  # above what every rank stores (Q of Q + L R)
    f = compress_matrix(W, method, budget=budget, bits=8, **calib())
    assert f.storage_bits <= budget * N * D
    if f.rank < spec.rank_limit(N, D):
        assert spec.storage_bits(N, D, f.rank + 1, 8) > budget * N * D
    with pytest.raises(ConfigError, match="budget"):
        compress_matrix(W, method, budget=0.01, bits=8, **calib())


def test_lplr_cr_rule_overrides_rank():
    W = typical()
    f = compress_matrix(W, "lplr", rank=3, bits=8, cr=1.0, b_nq=2)
    assert f.rank == cr_rank(N, D, 1.0, 8, 8, 2) == math.floor(N * D * 2 / (8 * (N + D)))
    naive = compress_matrix(W, "quant", bits=2)
    assert f.storage_bits <= naive.storage_bits + 2 * 64  # equal bits up to the quantizers' metadata
    assert compress_matrix(W, "lplr", rank=3, bits=4, b1=8, b2=2).info == {"b1": 8, "b2": 2, "sketch": "gaussian"}


# ---- determinism, dtypes, modules ----------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_deterministic_under_fixed_seed(method):
    W = typical()
    a = compress_matrix(W, method, rank=R, bits=4, seed=7, **calib())
    b = compress_matrix(W, method, rank=R, bits=4, seed=7, **calib())
    assert torch.equal(a.reconstruct(), b.reconstruct())


def test_randomized_methods_use_the_seed():
    W = typical()
    for method in ("lplr", "rsvd"):
        a = compress_matrix(W, method, rank=R, bits=4, seed=1).reconstruct()
        assert not torch.equal(a, compress_matrix(W, method, rank=R, bits=4, seed=2).reconstruct())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ALL)
def test_half_precision_weights(method, dtype):
    W = typical().to(dtype)
    f = compress_matrix(W, method, rank=R, bits=8, **calib())
    ref = compress_matrix(W.float(), method, rank=R, bits=8, **calib())
    assert f.rel_error(W) == pytest.approx(ref.rel_error(W), rel=0.05, abs=1e-3)
    assert f.reconstruct().dtype == dtype and ref.reconstruct().dtype == torch.float32
    bias = torch.randn(N).to(dtype)
    x = torch.randn(4, D).to(dtype)
    with torch.no_grad():
        y = f.as_module(bias)(x)  # the module computes in W's dtype without being told
    assert y.dtype == dtype and torch.isfinite(y).all()
    expect = x.float() @ f.reconstruct().float().T + bias.float()
    assert torch.allclose(y.float(), expect, atol=0.05 * float(expect.abs().max()))


@pytest.mark.parametrize("method", ALL)
def test_module_matches_reconstruction(method):
    W = typical()
    f = compress_matrix(W, method, rank=R, bits=4, **calib())
    bias = torch.randn(N)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        y = f.as_module(bias)(x)
    assert y.shape == (2, 5, N)
    assert torch.allclose(y, x @ f.reconstruct().T + bias, atol=1e-4)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RANKED)
def test_bad_rank_is_a_config_error(method):
    for rank in (0, -1, REGISTRY[method].rank_limit(N, D) + 1):
        with pytest.raises(ConfigError, match="rank"):
            compress_matrix(typical(), method, rank=rank, **calib())


def test_bad_bits_method_and_options():
    W = typical()
    for bits in (1, 17, 64):
        assert bits not in SUPPORTED_BITS
        with pytest.raises(ValueError, match=f"bits={bits}"):
            compress_matrix(W, "svd", rank=R, bits=bits)
    with pytest.raises(ConfigError, match="method: 'svdd' is unknown"):
        compress_matrix(W, "svdd", rank=R)
    with pytest.raises(ConfigError, match=r"method\.a_shape.*does not divide"):
        compress_matrix(W, "kronecker", rank=R, a_shape=[5, 4])
    with pytest.raises(ConfigError, match=re.escape("method.density")):
        compress_matrix(W, "losparse", rank=R, density=1.5)
    with pytest.raises(ConfigError, match=re.escape("method.b1")):
        compress_matrix(W, "lplr", rank=R, b1=17)
    with pytest.raises(ConfigError, match=r"method.alpha: is not an option of method svd "
                                          r"\(valid: driver, grid, group_size, observer, scheme\)"):
        compress_matrix(W, "svd", rank=R, alpha=0.5)
    with pytest.raises(ConfigError, match=r"method.group_size: '64' is not an integer"):
        compress_matrix(W, "svd", rank=R, group_size="64")


# ---- the real runner -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_method_gives_an_ok_row_in_a_real_sweep(tmp_path):
    """``python -m lrsweep -m method=<each> rank=32`` on minilm: one ok row per method.

    The first encoder block only and a small probe keep it to a few minutes on 2 cores."""
    import json

    from conftest import FAST, run_cli

    proc = run_cli("-m", f"method={','.join(ALL)}", "rank=32", f"results_dir={tmp_path}", *FAST,
                   "eval.probe_train=64", "eval.probe_test=64", r"model.targets=encoder\.layer\.0\..*",
                   timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["method"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "rows").glob("*.json"))}
    assert sorted(rows) == ALL
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["error"])
        assert 0 < row["bits_per_weight"] <= 32 and row["accuracy"] is not None
        assert row["layers_compressed"] == 6
        if REGISTRY[name].needs:
            assert row["extra"]["calib"]["stats"] == list(REGISTRY[name].needs)


@pytest.mark.parametrize("overrides,key", [
    (["method=kronecker", "method.a_shape=[5,4]"], "method.a_shape"),
    (["method=kronecker", "rank=400"], "rank"),
    (["method=losparse", "method.density=1.5"], "method.density"),
    (["method=lplr", "method.cr=0.0001"], "method"),
    (["method=lplr", "method.b1=17"], "method.b1"),
    (["method=svd", "+method.alpha=0.5"], "method.alpha"),
    (["method=drone", "~calib"], "calib"),
    (["method=asvd", "budget=0.001"], "budget"),
])
def test_bad_method_config_fails_validation_before_launch(compose, tmp_path, overrides, key):
    from lrsweep.validate import validate

    cfg = compose([*overrides, f"results_dir={tmp_path}", "logger=none"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, check_device=False)
    assert e.value.key == key, str(e.value)


def test_good_method_configs_validate(compose, tmp_path):
    from lrsweep.validate import validate

    for method in ALL:
        validate(compose([f"method={method}", f"results_dir={tmp_path}", "logger=none"]), check_device=False)
    validate(compose(["method=lplr", "method.cr=1.0", "method.b_nq=4", "bits=8", f"results_dir={tmp_path}"]),
             check_device=False)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ALL)
def test_cuda_matches_cpu(method):
    """On CUDA every method runs on the device (gesvda for the SVD family) at the CPU's error."""
    W = typical()
    kw = calib()
    cpu = compress_matrix(W, method, rank=R, bits=8, **kw)
    gpu = compress_matrix(W.cuda(), method, rank=R, bits=8, inputs=kw["inputs"].cuda(), fisher=kw["fisher"].cuda())
    assert gpu.reconstruct().is_cuda
    assert gpu.rel_error(W.cuda()) == pytest.approx(cpu.rel_error(W), rel=0.05, abs=1e-3)
    if "solver" in gpu.info and method != "rsvd":
        assert gpu.info["solver"] == "torch.linalg.svd[gesvda]"
    x = torch.randn(3, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = gpu.as_module(torch.zeros(N, device="cuda"), dtype=torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e7])
def test_lplr_least_squares_matches_lstsq(cond):
    """The fast QR path (CholeskyQR2 or Householder) solves min ||L Z - W|| like LAPACK's lstsq."""
    from lrsweep.methods.lplr import least_squares, tall_qr

    g = gen(11)
    U = torch.linalg.qr(torch.randn(N, 16, generator=g)).Q
    V = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q
    L = (U * torch.logspace(0, -math.log10(cond), 16)) @ V.T
    W = torch.randn(N, D, generator=g)
    Q, Rq = tall_qr(L)
    assert torch.allclose(Q.T @ Q, torch.eye(16), atol=1e-4) and torch.allclose(Q @ Rq, L, atol=1e-5)
    ref = torch.linalg.lstsq(L.double(), W.double()).solution
    res = lambda Z: float(torch.linalg.norm(L.double() @ Z.double() - W.double()))  # noqa: E731
    Z = least_squares(L, W)
    assert res(Z) <= res(ref) * (1 + 1e-4)  # Z is returned in fp32
    if cond <= 1e4:  # the solution itself, to the accuracy fp32 allows at this conditioning
        assert float(torch.linalg.norm(Z.double() - ref) / torch.linalg.norm(ref)) <= 1e-5 * cond
