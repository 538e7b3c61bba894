"""Factorized (ALBERT-style) embeddings in ``model.targets``, tied input/output embeddings kept tied.

Small shapes and a tiny random LLaMA with tied embeddings; one MiniLM grid point end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import lrsweep
from conftest import FAST
from lrsweep import compress_matrix, evaluate, job, methods, models
from lrsweep.compress import compress_model
from lrsweep.errors import ConfigError
from lrsweep.factorization import Dense, LowRank, LowRankEmbedding, LowRankHead
from lrsweep.save import save_compressed
from lrsweep.validate import targets, validate

V, H = 320, 48
# data-aware: statistics of a layer's inputs, or trained on calibration data (dobi_svd's prepare)
DATA_FREE = sorted(m for m, s in methods.REGISTRY.items() if not s.needs and s.prepare is None)
DATA_AWARE = sorted(m for m, s in methods.REGISTRY.items() if s.needs or s.prepare is not None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ids(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, n // 2), generator=gen(seed))


# ---- the factorized embedding module -------------------------------------------------------


def test_exact_low_rank_table_is_reproduced():
    E = torch.randn(V, 6, generator=gen()) @ torch.randn(6, H, generator=gen(1))
    f = compress_matrix(E, "svd", rank=6, bits=32)
    emb = f.as_embedding()
    assert isinstance(emb, LowRankEmbedding)
    torch.testing.assert_close(emb(ids()), E[ids()], rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in emb.parameters()) == 6 * (V + H)


@pytest.mark.parametrize("bits", [4, 16])
def test_module_is_the_reconstruction_and_bits_are_those_of_L_and_R(bits):
    E = torch.randn(V, H, generator=gen())
    f = compress_matrix(E, "svd", rank=12, bits=bits)
    torch.testing.assert_close(f.as_embedding()(ids()), f.reconstruct()[ids()], rtol=1e-5, atol=1e-5)
    assert f.storage_bits == f.stored["L"].storage_bits + f.stored["R"].storage_bits
    assert f.storage_bits == methods.lowrank_bits(V, H, 12, bits)  # what budget= resolves ranks with


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_data_free_method_embeds_and_heads_its_reconstruction(method):
    """as_embedding / tied_head compute W_hat (materialized when the method has no factored form),
    the head shares the embedding's parameters, and trainable maps stored tensors onto them."""
    E = torch.randn(V, H, generator=gen())
    f = compress_matrix(E, method, rank=8, bits=8)
    W_hat = f.reconstruct()
    emb = f.as_embedding()
    head = f.tied_head(emb)
    x = torch.randn(5, H, generator=gen(2))
    torch.testing.assert_close(emb(ids()), W_hat[ids()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(x), x @ W_hat.T, rtol=1e-4, atol=1e-4)
    assert {id(p) for p in head.parameters()} <= {id(p) for p in emb.parameters()}
    assert not hasattr(emb, "in_features")  # evaluate.layer_fallback feeds floats to what has one
    trainable = f.trainable(emb)
    factored = isinstance(f, LowRank)
    expected = {"L", "R"} if factored else {"W"} if isinstance(f, Dense) else set()  # a materialized W_hat: none
    assert set(trainable) == expected and isinstance(emb, LowRankEmbedding) == factored
    for key, p in trainable.items():
        assert p.numel() == f.stored[key].value.numel()
        torch.testing.assert_close(p.detach().reshape(f.stored[key].value.shape), f.stored[key].value)
        assert any(p is q for q in head.parameters())


def test_layer_fallback_skips_embeddings():
    model = nn.Sequential()
    model.add_module("emb", compress_matrix(torch.randn(V, H, generator=gen()), "svd", rank=8).as_embedding())
    cfg = OmegaConf.create({"inference": {"fallback": "auto"}, "eval": {"latency": {
        "batch_size": 2, "seq_len": 4, "warmup": 0, "repeats": 1, "per_layer": True}}})
    out = evaluate.layer_fallback(model, ["emb"], evaluate.Context(cfg, None, "cpu", "", {}))
    assert out == {"layer_latency": {}, "layer_latency_tokens": 8, "fallback_layers": []}
    assert isinstance(model.emb, LowRankEmbedding)


# ---- tied input/output embeddings (a tiny random LLaMA) ------------------------------------


def tied_llama(seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def cfg_of(method: str = "svd", rank: int = 8, bits: int = 32, **extra) -> OmegaConf:
    return OmegaConf.create({"method": {"name": method}, "rank": rank, "bits": bits, "budget": None, "seed": 0,
                             "save_compressed": True, **extra})


def compress(model: nn.Module, pattern: str, **cfg) -> list:
    return compress_model(model, models.target_modules(model, pattern), cfg_of(**cfg), progress=False)


def logits_and_hidden(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids(), output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("pattern, leader, tied", [
    (r"model\.embed_tokens|model\.layers\.0\.mlp\..*", "model.embed_tokens", ["lm_head"]),
    (r"model\.embed_tokens|lm_head", "model.embed_tokens", ["lm_head"]),  # both targets: compressed once
    (r"lm_head", "lm_head", ["model.embed_tokens"]),                      # a Linear leads the group
])
def test_tied_group_is_compressed_once_and_stays_tied(pattern, leader, tied):
    model = tied_llama()
    n_params = sum(p.numel() for p in model.parameters())
    results = compress(model, pattern, bits=32)
    group = [r for r in results if r.name == leader]
    assert len(group) == 1 and not any(r.name in tied for r in results)
    r = group[0]
    assert r.info["tied"] == tied and r.shape == (V, H)
    assert r.storage_bits == r.factorization.storage_bits == 32 * 8 * (V + H)  # counted once for the group
    assert r.dense_bits == 32 * V * H
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, LowRankEmbedding) and isinstance(head, LowRankHead)
    assert head.L is emb.L and head.R is emb.R
    others = sum(x.shape[0] * x.shape[1] - x.rank * sum(x.shape) for x in results if x.name != leader)
    assert sum(p.numel() for p in model.parameters()) == n_params - V * H + 8 * (V + H) - others
    logits, hidden = logits_and_hidden(model)
    torch.testing.assert_close(logits, hidden @ r.factorization.reconstruct().T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emb(ids()), r.factorization.reconstruct()[ids()])
    model(input_ids=ids(), labels=ids()).loss.backward()  # one parameter, gradients of both uses
    assert emb.L.grad is not None and head.L.grad is emb.L.grad


def test_materialized_tie_is_one_parameter_like_hf():
    model = tied_llama()
    (r,) = compress(model, r"model\.embed_tokens", method="quant", bits=8)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is emb.weight
    assert r.factorization.trainable(emb) == {"W": emb.weight}
    assert r.storage_bits == r.factorization.storage_bits < V * H * 8 + 100
    logits, hidden = logits_and_hidden(model)
    torch.testing.assert_close(logits, hidden @ r.factorization.reconstruct().T, rtol=1e-4, atol=1e-4)


def test_budget_resolves_the_embedding_rank():
    model = tied_llama()
    (r,) = compress(model, r"model\.embed_tokens", bits=8, budget=2.0)
    assert r.rank == methods.rank_for_budget(methods.REGISTRY["svd"], V, H, 8, 2.0) > 1
    assert r.storage_bits <= 2.0 * V * H


@pytest.mark.parametrize("method", ["svd", "quant"])
def test_save_load_restores_the_embedding_and_the_tie(tmp_path, method):
    model = tied_llama()
    results = compress(model, r"model\.embed_tokens|model\.layers\.0\.self_attn\..*", method=method, bits=4)
    path = save_compressed(model, {r.name: r.factorization for r in results}, tmp_path / "m", None, "causal_lm")
    desc = json.loads((path / "compressed.json").read_text())
    assert desc["modules"]["model.embed_tokens"]["tied"] == ["lm_head"] and "lm_head" not in desc["modules"]
    loaded, _ = lrsweep.load_compressed(path)
    emb, head = loaded.model.embed_tokens, loaded.lm_head
    assert type(emb) is type(model.model.embed_tokens) and type(head) is type(model.lm_head)
    assert {id(p) for p in head.parameters()} == {id(p) for p in emb.parameters()}
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids()).logits, model(input_ids=ids()).logits, rtol=1e-5, atol=1e-5)


# ---- config checks and whole runs ----------------------------------------------------------

TINY_TIED = ["model=llama7b_random", "model.num_layers=1", "model.random_init.hidden_size=64",
             "model.random_init.intermediate_size=128", "model.random_init.num_attention_heads=4",
             "model.random_init.num_key_value_heads=4", "model.random_init.vocab_size=30528",
             "+model.random_init.tie_word_embeddings=true"]


def test_validation_sees_the_tie_and_refuses_data_aware_methods(compose, tmp_path):
    both = r"model.targets='model\.embed_tokens|lm_head|model\.layers\.\d+\..*'"
    t = targets(compose([*FAST, *TINY_TIED, both]))
    assert next(iter(t)) == "model.embed_tokens" and "lm_head" not in t  # the skeleton keeps the tie
    assert t["model.embed_tokens"].tied == ("lm_head",) and t["model.embed_tokens"].embedding
    for method in DATA_AWARE:
        with pytest.raises(ConfigError, match=rf"^model.targets: selects the embedding model.embed_tokens, which "
                                              rf"method {method} cannot compress.*\(valid: {', '.join(DATA_FREE)}\)"):
            validate(compose([*FAST, *TINY_TIED, both, f"method={method}", f"results_dir={tmp_path}"]))
    only_head = compose([*FAST, *TINY_TIED, r"model.targets=lm_head", "method=drone", f"results_dir={tmp_path}"])
    validate(only_head)  # a Linear leads: the head's inputs have statistics


def test_streamed_job_with_a_tied_embedding(compose, tmp_path):
    cfg = compose([*FAST, *TINY_TIED, r"model.targets='model\.embed_tokens|model\.layers\.\d+\..*'", "stream=true",
                   "method=svd", "rank=16", f"results_dir={tmp_path}", "eval.ppl_tokens=256", "eval.ppl_context=128",
                   "eval.ppl_stride=128", "eval.latency.batch_size=1", "eval.latency.seq_len=16",
                   "eval.latency.shapes=[]"])
    row = job.run(cfg)
    assert row.status == "ok", row.error
    assert list(row.extra["stream"]["blocks"]) == ["model.embed_tokens", "model.layers.0"]
    assert row.extra["method_info"]["model.embed_tokens"]["tied"] == ["lm_head"]
    assert row.layers_compressed == 8 and "lm_head" not in row.layer_errors
    assert row.bits_dense == 32 * (30528 * 64 + 4 * 64 * 64 + 3 * 64 * 128)  # the tied matrix once
    saved = 30528 * 64 - 16 * (30528 + 64) + 4 * (64 * 64 - 16 * 128) + 3 * (64 * 128 - 16 * 192)
    assert row.params_dense - row.params_compressed == saved


def test_minilm_run_with_the_word_embedding(compose, config_error, tmp_path):
    targets_ = r"model.targets=embeddings\.word_embeddings|encoder\.layer\.0\.attention\.self\.query"
    cfg = compose([*FAST, targets_, "method=svd", "rank=32", f"results_dir={tmp_path}", "eval.latency.batch_size=2",
                   "eval.latency.seq_len=16", "eval.latency.shapes=[]"])
    assert job.run(cfg).status == "ok"
    (row,) = [json.loads(p.read_text()) for p in (tmp_path / "rows").glob("*.json")]
    assert row["status"] == "ok" and row["layers_compressed"] == 2
    assert 0 < row["layer_errors"]["embeddings.word_embeddings"] < 1
    assert row["params_dense"] - row["params_compressed"] == 30522 * 384 - 32 * (30522 + 384) + 384 * 384 - 32 * 768
    assert row["accuracy"] is not None and row["bits_per_weight"] < 4

    line = config_error(*FAST, targets_, "method=asvd", f"results_dir={tmp_path / 'bad'}")
    assert line.startswith("lrsweep: config error: model.targets: selects the embedding "
                           "embeddings.word_embeddings"), line
    assert "method asvd" in line and "valid: " in line and "svd" in line and "Traceback" not in line
    assert not (tmp_path / "bad" / "rows").exists()


def test_calibration_hooks_only_linears():
    from lrsweep import calib

    model = tied_llama()
    layers = models.target_modules(model, r"model\.embed_tokens|model\.layers\.0\.self_attn\.q_proj")
    stats = calib.collect(model, layers, [{"input_ids": ids()}], ("xtx", "absmean"), "cpu")
    assert set(stats) == {"model.layers.0.self_attn.q_proj"} and stats["model.layers.0.self_attn.q_proj"].n_tokens == 40
    assert not any(m._forward_hooks for m in model.modules())
