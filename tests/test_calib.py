"""Calibration statistics: values against direct computations, the on-disk cache, the job path."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import FAST
from lrsweep import calib, evaluate, job, models, schedule
from lrsweep import provenance
from lrsweep.errors import ConfigError
from lrsweep.factorization import LowRank
from lrsweep.quant import quantize
from lrsweep.validate import validate

CALIB = ["+calib=default", "calib.n_samples=8", "calib.batch_size=4", "calib.seq_len=64"]
QUICK = ["eval.latency.batch_size=2", "eval.latency.seq_len=16", "eval.latency.shapes=[]", "eval.probe_train=64",
         "eval.probe_test=64"]  # job runs: a small latency shape and probe
Q0 = "encoder.layer.0.attention.self.query"


def whitened_svd(W, *, rank, bits=16, seed=0, stats=None, **_):
    """A data-aware method defined outside the package (``method._target_``): SVD of W C, C C^T = XᵀX."""
    xtx = stats.xtx.double()
    C = torch.linalg.cholesky(xtx + 1e-6 * xtx.diagonal().mean() * torch.eye(len(xtx), dtype=xtx.dtype))
    U, S, Vh = torch.linalg.svd(W.double() @ C, full_matrices=False)
    R = torch.linalg.solve_triangular(C, Vh[:rank], upper=False, left=False)  # Vh_r C^-1
    return LowRank.of(quantize((U[:, :rank] * S[:rank]).float(), bits), quantize(R.float(), bits))


whitened_svd.needs = ("xtx",)
TARGET = ["method._target_=test_calib.whitened_svd", "method.name=whitened"]


def _ctx(cfg, tokenizer, cache_dir):
    return evaluate.Context(cfg, tokenizer, "cpu", str(cache_dir), provenance.model_key(cfg))


def test_xtx_absmean_equal_direct_inputs_without_padding(minilm):
    model, tok = minilm
    texts = ["a short one", "a much longer sentence with quite a few more tokens in it", "mid length text here"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    layers = {Q0: model.get_submodule(Q0)}
    stats = calib.collect(model, layers, [batch], ("xtx", "absmean"), "cpu")[Q0]
    with torch.no_grad():  # the query projection of block 0 reads the embedding output
        X = torch.cat([model.embeddings(input_ids=tok(t, return_tensors="pt").input_ids)[0] for t in texts]).double()
    assert stats.n_tokens == X.shape[0] == int(batch["attention_mask"].sum())
    assert stats.fisher is None and stats.xtx.dtype == torch.float64
    torch.testing.assert_close(stats.xtx, X.T @ X, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.absmean, X.abs().mean(0), rtol=1e-5, atol=1e-7)


def test_layers_reading_one_input_share_statistics(minilm):
    """q, k, v read the same tensor: one xtx, computed once, equal to collecting k on its own."""
    model, tok = minilm
    batch = dict(tok(["a short one", "another, longer, text for the batch"], padding=True, return_tensors="pt"))
    names = [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    layers = {n: model.get_submodule(n) for n in names}
    stats = calib.collect(model, layers, [batch, batch], ("xtx", "absmean"), "cpu")
    alone = calib.collect(model, {names[1]: layers[names[1]]}, [batch, batch], ("xtx", "absmean"), "cpu")[names[1]]
    assert stats[names[1]].xtx is stats[names[0]].xtx and stats[names[2]].absmean is stats[names[0]].absmean
    torch.testing.assert_close(stats[names[1]].xtx, alone.xtx)
    assert stats[names[2]].n_tokens == alone.n_tokens
    tensors, info = calib.stats._flatten(stats)
    assert len(tensors) == 2 and len(info["alias"]) == 4
    back = calib.stats._unflatten(tensors, info)
    assert all(torch.equal(back[n].xtx, alone.xtx) for n in names)


def test_batch_fisher_is_the_sum_of_squared_batch_gradients(minilm):
    """calib.fisher=batch: the square of each batch's mean-loss gradient (per-sample: test_parity.py)."""
    model, tok = minilm
    layers = {Q0: model.get_submodule(Q0)}
    batches = [dict(tok(t, padding=True, return_tensors="pt")) for t in (["one text", "and another"], ["third"])]

    def loss(m, b):  # one value per text
        return m(**b).last_hidden_state.pow(2).mean((1, 2))

    fisher = calib.collect(model, layers, batches, ("fisher",), "cpu", loss, "batch")[Q0].fisher
    W = layers[Q0].weight
    expected = sum(torch.autograd.grad(loss(model, b).mean(), W)[0].double() ** 2 for b in batches)
    torch.testing.assert_close(fisher, expected.float(), rtol=1e-4, atol=1e-12)
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())
    assert fisher.abs().sum() > 0


def test_stats_cache_hit_and_recompute_per_key_field(minilm, compose, tmp_path):
    model, tok = minilm
    layers = models.target_modules(model, r"encoder\.layer\.0\.attention\.self\.(query|key)")

    def get(*overrides, needs=("xtx",)):
        cfg = compose([*FAST, *CALIB, *overrides])
        return calib.layer_stats(model, layers, _ctx(cfg, tok, tmp_path), needs)

    base, info = get()
    assert not info["cache_hit"] and info["n_tokens"] > 0
    again, info = get()
    assert info["cache_hit"] and torch.equal(again[Q0].xtx, base[Q0].xtx)
    for field in ("calib.seed=1", "calib.n_samples=4", "calib.seq_len=8", "data.split_seed=3"):
        stats, info = get(field)
        assert not info["cache_hit"], field
        assert not torch.equal(stats[Q0].xtx, base[Q0].xtx), field
    assert not get(r"model.targets='encoder\.layer\.[01]\..*'")[1]["cache_hit"]
    assert not get(needs=("xtx", "absmean"))[1]["cache_hit"]
    assert get("calib.seed=1")[1]["cache_hit"]
    assert len(list((tmp_path / "calib").glob("*.safetensors"))) == 7


def test_encoder_fisher_from_probe_loss(minilm, compose, tmp_path):
    model, tok = minilm
    layers = models.target_modules(model, r"encoder\.layer\.5\.output\.dense")
    cfg = compose([*FAST, *CALIB])
    stats, _ = calib.layer_stats(model, layers, _ctx(cfg, tok, tmp_path), ("fisher", "absmean"))
    s = stats["encoder.layer.5.output.dense"]
    assert s.fisher.shape == (384, 1536) and torch.isfinite(s.fisher).all() and s.fisher.sum() > 0
    assert s.absmean.shape == (1536,) and s.xtx is None


def test_calibrated_method_lowers_output_error(minilm, compose, tmp_path):
    """With the statistics passed, whitening beats plain SVD on ||(W - W_hat) Xᵀ||² = tr(E XᵀX Eᵀ)."""
    from lrsweep.compress import compress_matrix

    model, tok = minilm
    name = "encoder.layer.2.intermediate.dense"
    cfg = compose([*FAST, *CALIB, *TARGET])
    stats, _ = calib.layer_stats(model, {name: model.get_submodule(name)}, _ctx(cfg, tok, tmp_path), ("xtx",))
    W, xtx = model.get_submodule(name).weight.detach(), stats[name].xtx

    def out_err(f):
        E = (W - f.reconstruct()).double()
        return float(torch.trace(E @ xtx @ E.T))

    plain = compress_matrix(W, "svd", rank=32)
    white = compress_matrix(W, rank=32, stats=stats[name], target="test_calib.whitened_svd")
    assert out_err(white) < 0.9 * out_err(plain)


def test_data_aware_method_without_calib_is_a_config_error(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"needs calibration statistics.*\+calib=default"):
        validate(compose([*FAST, *TARGET, f"results_dir={tmp_path}"]))
    cfg = compose([*FAST, *TARGET, *CALIB, f"results_dir={tmp_path}"])
    validate(cfg)
    with pytest.raises(ConfigError, match="stream=true propagates"):
        validate(compose([*FAST, "method=fwsvd", "stream=true", f"results_dir={tmp_path}"]))
    assert compose(["method=fwsvd"]).calib.n_samples > 0  # data-aware method yamls pull in calib/default
    assert cfg.calib.labelled.name == cfg.data.name  # encoders calibrate on the task's labelled texts


def test_sweep_points_share_the_statistics(compose, tmp_path):
    """Two grid points of one model: the first computes the statistics, the second reads them."""
    rows = [job.run(compose([*FAST, *QUICK, *TARGET, *CALIB, f"rank={r}", f"results_dir={tmp_path}",
                             r"model.targets='encoder\.layer\.0\..*'", f"cache_dir={tmp_path}/cache"]))
            for r in (8, 32)]
    assert [r.status for r in rows] == ["ok", "ok"], rows[0].error
    assert [r.extra["calib"]["cache_hit"] for r in rows] == [False, True]
    assert rows[1].recon_rel_err < rows[0].recon_rel_err


def test_sequential_calibration_reads_the_compressed_model(minilm, compose, tmp_path):
    """Block 0 sees the dense model either way; block 1's statistics come from a compressed block 0."""
    model, tok = minilm
    cfg = compose([*FAST, *TARGET, *CALIB, "rank=8", r"model.targets='encoder\.layer\.[01]\..*'"])
    results = {}
    for sequential in (False, True):
        cfg.calib.sequential = sequential
        m = copy.deepcopy(model)  # the model cfg.model loads, compressed in place
        layers = models.target_modules(m, cfg.model.targets)
        out, info = schedule.compress(m, layers, _ctx(cfg, tok, tmp_path), progress=False)
        results[sequential] = {r.name: r.rel_err for r in out}
        assert info.get("sequential", False) == sequential
    block0 = [n for n in results[True] if n.startswith("encoder.layer.0.")]
    block1 = [n for n in results[True] if n.startswith("encoder.layer.1.")]
    assert len(block0) == len(block1) == 6
    assert all(results[True][n] == pytest.approx(results[False][n], rel=1e-6) for n in block0)
    assert any(abs(results[True][n] - results[False][n]) > 1e-4 for n in block1)
    assert list(models.blocks(layers)) == ["encoder.layer.0", "encoder.layer.1"]


def test_carried_block_inputs_give_a_whole_model_passs_statistics(minilm, compose, tmp_path):
    """schedule.Propagation: each block's statistics from the inputs carried from block to block equal
    those of a pass through the whole model, with the earlier blocks compressed (calib.sequential)."""
    model, tok = minilm
    cfg = compose([*FAST, *TARGET, *CALIB, "rank=8", r"model.targets='encoder\.layer\.[012]\..*'"])
    m = copy.deepcopy(model)
    layers = models.target_modules(m, cfg.model.targets)
    batches, _ = calib.calibration(m, _ctx(cfg, tok, tmp_path), ())
    carried = schedule.Propagation(m, layers, batches, "cpu")
    needs = ("xtx", "absmean")
    for name, block in models.blocks(layers).items():
        got = carried.stats(m.get_submodule(name), block, needs)
        want = calib.collect(m, block, batches, needs, "cpu")
        assert got.keys() == want.keys() == block.keys()
        for n in block:
            assert got[n].n_tokens == want[n].n_tokens > 0
            torch.testing.assert_close(got[n].xtx, want[n].xtx, rtol=1e-6, atol=1e-6 * want[n].xtx.abs().max())
            torch.testing.assert_close(got[n].absmean, want[n].absmean, rtol=1e-6, atol=1e-8)
        schedule.compress_model(m, block, cfg, stats=got, progress=False)
        carried.advance(m.get_submodule(name))  # the next block's inputs through this one, compressed


def _rel_errs(model_cfg_overrides, compose, tmp_path, *extra):
    cfg = compose([*FAST, *TARGET, *CALIB, "rank=8", r"model.targets='encoder\.layer\.[01]\..*'", *extra,
                   *model_cfg_overrides])
    m, tok = models.load(cfg.model, "cpu", os.environ["LRSWEEP_CACHE"])
    out, info = schedule.compress(m, models.target_modules(m, cfg.model.targets), _ctx(cfg, tok, tmp_path),
                                  progress=False)
    return {r.name: r.rel_err for r in out}, info


@pytest.mark.parametrize("sequential", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_streamed_blocks_match_whole_model_calibration(compose, tmp_path, sequential):
    """Block-by-block propagation (stream=true) gives the statistics of a whole-model pass."""
    seq = f"calib.sequential={str(sequential).lower()}"
    whole, _ = _rel_errs([], compose, tmp_path, seq)
    streamed, info = _rel_errs([], compose, tmp_path, seq, "stream=true")
    assert info["stream"] and list(info["blocks"]) == ["encoder.layer.0", "encoder.layer.1"]
    assert info["sequential"] == sequential
    assert streamed.keys() == whole.keys()
    for name in whole:
        assert streamed[name] == pytest.approx(whole[name], rel=1e-4), name


def test_llama_random_streamed_job_on_cpu(compose, tmp_path):
    """model=llama7b_random (reduced width, 2 blocks) through the whole job with stream=true."""
    small = ["model=llama7b_random", "model.num_layers=2", "model.random_init.hidden_size=128",
             "model.random_init.intermediate_size=344", "model.random_init.num_attention_heads=4",
             "model.random_init.num_key_value_heads=4", "model.random_init.vocab_size=30528"]
    cfg = compose([*FAST, *QUICK, *small, "stream=true", "method=svd", "rank=16", f"results_dir={tmp_path}",
                   "eval.ppl_tokens=256", "eval.ppl_context=128", "eval.ppl_stride=128",
                   "eval.latency.batch_size=1", "eval.latency.seq_len=16", "eval.latency.shapes=[]"])
    row = job.run(cfg)
    assert row.status == "ok", row.error
    assert list(row.extra["stream"]["blocks"]) == ["model.layers.0", "model.layers.1"]
    assert row.layers_compressed == 14 and row.perplexity_dense > 1 and row.perplexity > 1
    assert row.perplexity != row.perplexity_dense and row.recon_rel_err > 0.5  # random weights: no low-rank structure
    again = provenance.model_key(compose([*FAST, *small, "model.seed=1"]))
    assert again != provenance.model_key(cfg)  # the seed is part of the random model's identity


@pytest.mark.gpu
def test_llama7b_block_streamed_on_gpu_peak_memory(compose, tmp_path):
    """Full 7B layer sizes: peak GPU memory while compressing is one block and its SVD's workspace, the
    same for every block (no block's dense layers left behind on the device), below the whole model."""
    cfg = compose([*FAST, "model=llama7b_random", "model.num_layers=4", "stream=true", "device=cuda",
                   "method=svd", "rank=256", f"results_dir={tmp_path}", "eval.ppl_tokens=1024"])
    row = job.run(cfg)
    assert row.status == "ok", row.error
    block_mb = 202_375_168 * 4 / 2**20  # parameters of one LLaMA-7B block in fp32 (772 MiB)
    model_mb = (4 * 202_375_168 + 2 * 32000 * 4096) * 4 / 2**20  # 4 blocks, embedding and head (4088 MiB)
    peaks = [b["peak_mem_mb"] for b in row.extra["stream"]["blocks"].values()]
    assert max(peaks) - min(peaks) < 0.05 * block_mb, peaks  # H200: 2505 MiB for every block
    assert row.extra["stream"]["peak_mem_mb"] < min(3.5 * block_mb, 0.75 * model_mb), peaks
    assert row.peak_mem_mb > model_mb, row.peak_mem_mb  # the job's: the dense model evaluated whole on the device


def test_replaced_layers_wait_on_cpu_only_when_compressing_elsewhere(compose, tmp_path):
    """schedule.offload: a job on a GPU moves the dense layers it replaces to CPU; on CPU nothing moves."""
    cfg = compose([*FAST, f"results_dir={tmp_path}"])
    ctx = lambda device: evaluate.Context(cfg, None, device, str(tmp_path), {})  # noqa: E731
    assert schedule.offload(ctx("cuda:0")) == "cpu" and schedule.offload(ctx("cpu")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["stream=true"]])
def test_on_gpu_the_replaced_dense_layers_leave_the_device(compose, tmp_path, extra):
    """Whole or streamed on CUDA: every replaced dense layer waits on CPU, the compressed model is all on
    the GPU and runs there (finite outputs)."""
    cfg = compose([*FAST, "method=svd", "rank=8", "device=cuda", f"results_dir={tmp_path}",
                   r"model.targets='encoder\.layer\.[01]\..*'", *extra])
    m, tok = models.load(cfg.model, "cuda", os.environ["LRSWEEP_CACHE"])
    layers = models.target_modules(m, cfg.model.targets)
    ctx = evaluate.Context(cfg, tok, "cuda", str(tmp_path), provenance.model_key(cfg))
    schedule.compress(m, layers, ctx, progress=False)
    assert all(p.device.type == "cpu" for layer in layers.values() for p in layer.parameters())
    assert all(p.device.type == "cuda" for p in m.parameters())
    batch = tok(["a short text", "and another one"], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        assert torch.isfinite(m(**batch).last_hidden_state).all()


@pytest.mark.parametrize("extra", [[], ["stream=true"], [*TARGET, *CALIB, "calib.sequential=true"]],
                         ids=["whole", "streamed", "sequential"])
def test_every_schedule_offloads_the_replaced_layers(compose, tmp_path, monkeypatch, extra):
    """The GPU test above on CPU: with ``meta`` standing in for the CPU a GPU job offloads to, every
    schedule sends each replaced dense layer there and keeps the compressed model whole."""
    monkeypatch.setattr(schedule, "offload", lambda ctx: "meta")
    cfg = compose([*FAST, "method=svd", "rank=8", f"results_dir={tmp_path}",
                   r"model.targets='encoder\.layer\.[01]\..*'", *extra])
    m, tok = models.load(cfg.model, "cpu", os.environ["LRSWEEP_CACHE"])
    layers = models.target_modules(m, cfg.model.targets)
    schedule.compress(m, layers, _ctx(cfg, tok, tmp_path), progress=False)
    assert len(layers) == 12 and all(p.is_meta for layer in layers.values() for p in layer.parameters())
    assert not any(p.is_meta for p in m.parameters())
    batch = tok(["a short text", "and another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.isfinite(m(**batch).last_hidden_state).all()
