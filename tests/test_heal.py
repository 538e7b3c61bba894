"""Healing after compression (heal=distill, heal=dsee): what trains, what is stored, what the row says."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch

import lrsweep
from conftest import FAST, run_cli
from lrsweep import heal, identity, job, models
from lrsweep.compress import compress_model
from lrsweep.errors import ConfigError
from lrsweep.heal.dsee import Delta, DeltaLinear
from lrsweep.logger import read_offline_run
from lrsweep.quant import requantize, tensor_bits
from lrsweep.save import save_compressed
from lrsweep.validate import validate

BLOCKS = r"model.targets='encoder\.layer\.[01]\..*'"
DATA = ["heal.data.n_samples=16", "heal.data.batch_size=8", "heal.data.seq_len=64"]
TEXTS = ["a film to remember", "nothing works in this one, sadly", "the cast is great but the plot drags"]


def compressed(minilm, compose, overrides):
    """(cfg, compressed copy of minilm, dense copy, layer results, originals) for a heal config."""
    base, _tok = minilm
    cfg = compose([*FAST, BLOCKS, *DATA, *overrides])
    model = copy.deepcopy(base)
    before = heal.snapshot(model)
    layers = models.target_modules(model, cfg.model.targets)
    results = compress_model(model, layers, cfg, progress=False)
    return cfg, model, results, heal.replaced(before, model)


def hidden(model, tok, texts=TEXTS):
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state


def ctx_for(cfg, tok):
    return SimpleNamespace(cfg=cfg, tokenizer=tok, device="cpu")


def test_replaced_and_swapped_give_the_dense_teacher(minilm, compose):
    _cfg, model, results, originals = compressed(minilm, compose, ["method=svd", "rank=8", "heal=distill"])
    assert set(originals) == {r.name for r in results} and len(originals) == 12
    assert all(isinstance(m, torch.nn.Linear) for m in originals.values())
    base, tok = minilm
    student = hidden(model, tok)
    with heal.swapped(model, originals):
        torch.testing.assert_close(hidden(model, tok), hidden(base, tok))  # the teacher is the dense model
    torch.testing.assert_close(hidden(model, tok), student)  # and the compressed modules are back


@pytest.mark.parametrize("overrides", [
    ["method=svd", "bits=4"],                                                   # uniform codes
    ["method=lplr", "bits=3", "method.scheme=group", "method.group_size=32"],   # absmax groups
    ["method=kronecker", "bits=8"],                                             # A, B reshaped
    ["method=svd", "bits=4", "heal.qat=true", "heal.lr=1e-4"],                  # through the quantizer
])
def test_distill_lowers_the_loss_and_stores_requantized_factors(minilm, compose, overrides):
    cfg, model, results, originals = compressed(
        minilm, compose, ["rank=8", "heal=distill", "heal.steps=12", "heal.lr=1e-3", "heal.log_every=1", *overrides])
    bits_before = {r.name: r.storage_bits for r in results}
    grids = {(r.name, k): dict(q.meta) for r in results for k, q in r.factorization.stored.items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "LayerNorm" in n or n.endswith("bias")}
    info = heal.apply(model, originals, results, ctx_for(cfg, minilm[1]))
    losses = [loss for _, loss in info["loss_curve"]]
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0], losses
    assert info["trained_params"] == sum(q.value.numel() for r in results for q in r.factorization.stored.values())
    for r in results:
        f, module = r.factorization, model.get_submodule(r.name)
        assert r.storage_bits == f.storage_bits == bits_before[r.name]  # same tensors, same quantizer
        for key, p in f.trainable(module).items():
            q = f.stored[key]
            assert torch.equal(requantize(q, q.value).value, q.value)  # on the quantizer's grid ...
            assert all(torch.equal(q.meta[m], grids[r.name, key][m]) for m in q.meta)  # ... the factor's own
            assert torch.equal(p.detach().reshape(q.value.shape), q.value)  # the model computes with it
        x = torch.randn(5, r.shape[1])
        torch.testing.assert_close(module(x), x @ f.reconstruct().T + originals[r.name].bias.detach(),
                                   rtol=1e-4, atol=1e-4)
        assert r.rel_err == pytest.approx(f.rel_error(originals[r.name].weight.detach()))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} is not a stored factor and must not train"


def test_dsee_update_is_exact_and_counted(minilm, compose, tmp_path):
    cfg, model, results, originals = compressed(
        minilm, compose, ["method=svd", "rank=8", "bits=8", "heal=dsee", "heal.rank=4", "heal.density=0.002",
                          "heal.steps=10", "heal.lr=1e-3", "save_compressed=true"])
    before = {r.name: (r.storage_bits, r.factorization.reconstruct()) for r in results}
    info = heal.apply(model, originals, results, ctx_for(cfg, minilm[1]))
    assert info["skipped_layers"] == [] and info["loss_curve"][-1][1] < info["loss_curve"][0][1]
    for r in results:
        f, module = r.factorization, model.get_submodule(r.name)
        assert isinstance(f, Delta) and isinstance(module, DeltaLinear)
        n, d = r.shape
        nnz = max(1, round(0.002 * n * d))
        extra = (tensor_bits((n, 4), 8, "uniform") + tensor_bits((4, d), 8, "uniform")
                 + tensor_bits((1, nnz), 8, "uniform"))
        extra += nnz * (d - 1).bit_length() + (n + 1) * nnz.bit_length()  # CSR column indices, row pointers
        assert r.storage_bits == f.storage_bits == before[r.name][0] + extra
        torch.testing.assert_close(f.base.reconstruct(), before[r.name][1])  # the compressed layer stayed frozen
        assert module.U.abs().sum() > 0 and module.values.abs().sum() > 0  # the update trained
        x = torch.randn(3, d)
        torch.testing.assert_close(module(x), x @ f.reconstruct().T + originals[r.name].bias.detach(),
                                   rtol=1e-4, atol=1e-4)
    path = save_compressed(model, {r.name: r.factorization for r in results}, tmp_path / "m", minilm[1], "encoder")
    loaded, _ = lrsweep.load_compressed(path)
    torch.testing.assert_close(hidden(loaded, minilm[1]), hidden(model, minilm[1]), rtol=1e-5, atol=1e-5)
    assert json.loads((path / "compressed.json").read_text())["modules"][results[0].name]["kind"] == "delta"


def test_dsee_with_no_steps_changes_nothing_but_the_bits(minilm, compose):
    """The update starts at zero: zero steps leave the outputs exactly those of the compressed model."""
    cfg, model, results, originals = compressed(minilm, compose, ["method=svd", "rank=8", "heal=dsee", "heal.steps=0"])
    want = hidden(model, minilm[1])
    info = heal.apply(model, originals, results, ctx_for(cfg, minilm[1]))
    assert info["loss_curve"] == []
    torch.testing.assert_close(hidden(model, minilm[1]), want)


def test_heal_config_identity_and_errors(compose):
    plain = compose([*FAST])
    assert "heal" not in plain  # rows of runs without healing keep their run_id
    a, b = compose([*FAST, "heal=distill"]), compose([*FAST, "heal=distill", "heal.steps=5"])
    assert len({identity.run_id(plain), identity.run_id(a), identity.run_id(b)}) == 3
    for overrides, key in [(["heal=distill", "heal.steps=-1"], "heal.steps"),
                           (["heal=distill", "heal.lr=0"], "heal.lr"),
                           (["heal=dsee", "heal.density=1.5"], "heal.density"),
                           (["heal=dsee", "heal.bits=1"], "heal.bits"),
                           (["heal=dsee", "heal.rank=0"], "heal.rank"),
                           (["heal=dsee", "heal.scheme=nf4"], "heal.scheme"),
                           (["heal=distill", "heal.qat=maybe"], "heal.qat")]:
        with pytest.raises(ConfigError) as e:
            validate(compose([*FAST, *overrides]))
        assert e.value.key == key


def test_heal_distill_row_end_to_end(compose, config_error, tmp_path):
    """A grid point: one row with the metrics before and after healing; the healed embeddings are closer to dense."""
    cfg = compose([*FAST, BLOCKS, "heal.data.seq_len=64", "heal.data.batch_size=4", "method=svd", "rank=16", "bits=8",
                   "heal=distill", "heal.steps=20", "heal.lr=1e-3", "logger=wandb", f"results_dir={tmp_path}"])
    assert job.run(cfg).status == "ok"
    import wandb

    wandb.teardown()  # the W&B service writes the offline run out when it stops, as at the end of a job's process
    (row,) = [json.loads(p.read_text()) for p in (tmp_path / "rows").glob("*.json")]
    assert row["status"] == "ok" and row["heal"] == "distill" and row["heal_seconds"] > 0
    assert row["bits_per_weight"] == row["bits_per_weight_pre_heal"]
    assert row["cosine_similarity"] > row["cosine_similarity_pre_heal"] + 0.02
    assert row["accuracy_pre_heal"] is not None and row["recon_rel_err_pre_heal"] is not None
    assert row["extra"]["heal"]["requantized"] is True and len(row["extra"]["heal"]["loss_curve"]) >= 2
    (run_dir,) = list(tmp_path.glob("**/offline-run-*"))  # W&B: the heal loss as history, the row as summary
    offline = read_offline_run(run_dir)
    assert [[h["_step"], h["heal/loss"]] for h in offline["history"]] == row["extra"]["heal"]["loss_curve"]
    assert offline["summary"]["cosine_similarity_pre_heal"] == row["cosine_similarity_pre_heal"]
    bad = config_error(*FAST, "heal=dsee", "heal.density=2", f"results_dir={tmp_path / 'bad'}")
    assert bad.startswith("lrsweep: config error: heal.density"), bad
    assert not (tmp_path / "bad" / "rows").exists()


@pytest.mark.e2e
def test_a_swept_heal_group_key_is_a_config_error_naming_plus_plus(tmp_path):
    """The CLI: Hydra composes a sweep's base config without its swept groups; exit 2 and the ``++`` hint."""
    swept = run_cli("-m", *FAST, "heal=distill,dsee", "heal.steps=5", f"results_dir={tmp_path}")
    assert swept.returncode == 2 and "++heal.steps=5" in swept.stderr  # how to set a swept group's keys
    assert not (tmp_path / "rows").exists()


def test_heal_causal_lm_job(compose, tmp_path):
    """A (tiny, random) causal LM: distillation of the logits; perplexity before and after."""
    small = ["model=llama7b_random", "model.num_layers=2", "model.random_init.hidden_size=64",
             "model.random_init.intermediate_size=172", "model.random_init.num_attention_heads=4",
             "model.random_init.num_key_value_heads=4", "model.random_init.vocab_size=30528"]
    cfg = compose([*FAST, *small, "method=svd", "rank=8", f"results_dir={tmp_path}", "heal=distill", "heal.steps=8",
                   "heal.lr=1e-2", "heal.data.n_samples=8", "heal.data.seq_len=32", "heal.data.batch_size=4",
                   "eval.ppl_tokens=256", "eval.ppl_context=128", "eval.ppl_stride=128", "eval.latency.batch_size=1",
                   "eval.latency.seq_len=16", "eval.latency.shapes=[]"])
    row = job.run(cfg)
    assert row.status == "ok", row.error
    assert row.perplexity_pre_heal > 1 and row.perplexity > 1 and row.perplexity != row.perplexity_pre_heal
    curve = row.extra["heal"]["loss_curve"]
    assert curve[-1][1] < curve[0][1], curve


def test_distill_keeps_a_tied_factorized_embedding_tied(compose, tmp_path):
    """Embedding and lm_head share L and R: trained once, re-quantized once, still one pair of Parameters."""
    tiny = ["model=llama7b_random", "model.num_layers=1", "model.random_init.hidden_size=64",
            "model.random_init.intermediate_size=128", "model.random_init.num_attention_heads=4",
            "model.random_init.num_key_value_heads=4", "model.random_init.vocab_size=30528",
            "+model.random_init.tie_word_embeddings=true"]
    cfg = compose([*FAST, *tiny, r"model.targets='model\.embed_tokens|model\.layers\.\d+\..*'", "method=svd",
                   "rank=8", "bits=6", "heal=distill", "heal.steps=6", "heal.lr=1e-2", "heal.data.n_samples=4",
                   "heal.data.seq_len=32", "heal.data.batch_size=4", f"results_dir={tmp_path}"])
    model, tok = models.load(cfg.model, "cpu", os.environ["LRSWEEP_CACHE"])
    before = heal.snapshot(model)
    results = compress_model(model, models.target_modules(model, cfg.model.targets), cfg, progress=False)
    originals = heal.replaced(before, model)
    assert {"model.embed_tokens", "lm_head"} <= set(originals)  # the teacher gets its tied pair back
    (emb,) = [r for r in results if r.name == "model.embed_tokens"]
    assert emb.info["tied"] == ["lm_head"]
    L0 = emb.factorization.stored["L"].value.clone()
    info = heal.apply(model, originals, results, ctx_for(cfg, tok))
    assert info["loss_curve"][-1][1] < info["loss_curve"][0][1]
    head, table = model.lm_head, model.model.embed_tokens
    shared = {id(p) for p in head.parameters()} & {id(p) for p in table.parameters()}
    assert len(shared) == 2  # L and R, the same objects in both modules
    f = emb.factorization
    assert not torch.equal(f.stored["L"].value, L0)  # trained
    for key, p in f.trainable(table).items():
        assert torch.equal(p.detach().reshape(f.stored[key].value.shape), f.stored[key].value)
        assert torch.equal(requantize(f.stored[key], f.stored[key].value).value, f.stored[key].value)
    x = torch.randn(3, 64)
    torch.testing.assert_close(head(x), x @ f.reconstruct().T, rtol=1e-4, atol=1e-4)
