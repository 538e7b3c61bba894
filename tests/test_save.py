"""save_compressed -> load_compressed rebuilds the factorized model with the same outputs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import lrsweep
from conftest import FAST
from lrsweep import evaluate, job, models
from lrsweep import provenance
from lrsweep.compress import compress_model
from lrsweep.save import save_compressed

BLOCKS = r"model.targets='encoder\.layer\.[01]\..*'"


@pytest.mark.parametrize("overrides", [
    ["method=svd", "bits=4"],                                       # uniform integer codes
    ["method=svd", "bits=3", "method.scheme=group", "method.group_size=48"],  # absmax groups
    ["method=lplr", "bits=16"],                                     # fp16 factors
    pytest.param(["method=losparse", "bits=8"], marks=pytest.mark.slow),    # low rank + sparse indices
    pytest.param(["method=kronecker", "bits=16"], marks=pytest.mark.slow),  # another factorized module
])
def test_save_load_same_outputs(minilm, compose, tmp_path, overrides):
    base, tok = minilm
    model = copy.deepcopy(base)
    cfg = compose([*FAST, BLOCKS, "rank=16", "save_compressed=true", *overrides])
    layers = models.target_modules(model, cfg.model.targets)
    results = compress_model(model, layers, cfg, progress=False)
    factorizations = {r.name: r.factorization for r in results}
    path = save_compressed(model, factorizations, tmp_path / "m", tok, "encoder", {"accuracy": 0.5})
    loaded, tok2 = lrsweep.load_compressed(path)
    batch = tok(["a film to remember", "nothing works in this one, sadly"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want, got = model(**batch).last_hidden_state, loaded(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in factorizations:
        assert type(loaded.get_submodule(name)) is type(model.get_submodule(name))
    desc = json.loads((path / "compressed.json").read_text())
    assert set(desc["modules"]) == set(factorizations) and desc["metrics"] == {"accuracy": 0.5}
    assert tok2("same text").input_ids == tok("same text").input_ids
    assert {p.suffix for p in path.iterdir()} <= {".safetensors", ".json", ".txt"}  # no pickles


def test_saved_codes_are_the_stored_bits(minilm, compose, tmp_path):
    """At 4 bits the factors file holds uint8 codes, not fp32 values: it is smaller than the dense layers."""
    from safetensors.torch import load_file

    model, tok = copy.deepcopy(minilm[0]), minilm[1]
    cfg = compose([*FAST, BLOCKS, "rank=16", "bits=4", "save_compressed=true"])
    results = compress_model(model, models.target_modules(model, cfg.model.targets), cfg, progress=False)
    path = save_compressed(model, {r.name: r.factorization for r in results}, tmp_path / "m", tok, "encoder")
    factors = load_file(str(path / "factors.safetensors"))
    codes = [v for k, v in factors.items() if k.endswith("/codes")]
    assert len(codes) == 2 * len(results) and all(c.dtype == torch.uint8 for c in codes)
    desc = json.loads((path / "compressed.json").read_text())
    assert {e["encoding"] for m in desc["modules"].values() for e in m["stored"].values()} == {"uniform"}


def test_job_saves_a_model_that_reproduces_its_logged_accuracy(compose, tmp_path):
    cfg = compose([*FAST, BLOCKS, "rank=8", "bits=8", "save_compressed=true", f"results_dir={tmp_path}",
                   "eval.latency.batch_size=2", "eval.latency.seq_len=16", "eval.latency.shapes=[]"])
    row = job.run(cfg)
    assert row.status == "ok", row.error
    path = row.extra["saved_model"]
    assert path.endswith(f"models/{row.run_id}")
    model, tok = lrsweep.load_compressed(path)
    ctx = evaluate.Context(cfg, tok, "cpu", os.environ["LRSWEEP_CACHE"], provenance.model_key(cfg))
    task = evaluate.task_for(cfg)
    out = task.evaluate(model, ctx, task.prepare(model, ctx))
    assert out["accuracy"] == pytest.approx(row.accuracy, abs=1e-9)
    assert out["cosine_similarity"] == pytest.approx(row.cosine_similarity, abs=1e-5)
