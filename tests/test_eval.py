"""Task metrics, latency and memory against direct computations."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

from conftest import FAST
from lrsweep import data, evaluate, job, models
from lrsweep import provenance
from lrsweep.compress import compress_model
from lrsweep.errors import ConfigError
from lrsweep.validate import validate

BLOCK0 = r"model.targets='encoder\.layer\.0\..*'"


def _token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """-log p(ids[i] | ids[:i]) for i >= 1 of one window, from the logits."""
    logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
    return -logp[:-1].gather(1, ids[1:, None])[:, 0]


@torch.no_grad()
def test_perplexity_one_window_equals_exp_mean_nll(tiny_lm):
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = math.exp(float(_token_nll(tiny_lm, ids[0]).mean()))
    ppl = evaluate.perplexity(tiny_lm, ids, max_length=32, stride=32, device="cpu")
    assert ppl == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_sliding_window_scores_each_token_once_with_its_window_context(tiny_lm):
    """HF's recipe with stride < context: token i is scored in the first window that ends after it."""
    ids = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(2))
    context, stride = 8, 4
    nll, prev_end = [], 0
    for begin in range(0, 23, stride):
        end = min(begin + context, 23)
        window = _token_nll(tiny_lm, ids[0, begin:end])  # targets begin+1 .. end-1
        first_new = max(prev_end, begin + 1)
        nll.append(window[first_new - begin - 1:])
        prev_end = end
        if end == 23:
            break
    nll = torch.cat(nll)
    assert len(nll) == 22  # every token but the first, once
    got = evaluate.perplexity(tiny_lm, ids, max_length=context, stride=stride, device="cpu")
    assert got == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert got != pytest.approx(evaluate.perplexity(tiny_lm, ids, max_length=32, stride=32, device="cpu"), rel=1e-4)


@torch.no_grad()
def test_zeroshot_label_scoring_two_examples(tiny_lm, minilm):
    """Each label's score is the LM loss of its continuation tokens; the prediction is the best label."""
    _, tok = minilm
    # a word-piece tokenizer over the tiny model's 97 ids: map every token id into range
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            out = tok(text, add_special_tokens=add_special_tokens)
            out["input_ids"] = [i % 97 for i in out["input_ids"]]
            return out

    t = Tok()
    verbalizers = [" great", " terrible movie"]  # one and two tokens
    texts = ["a wonderful film", "a dull waste of time"]
    template = "Review: {text}. Verdict:"
    expected = []
    for text in texts:
        scores = []
        for v in verbalizers:
            ctx_ids, cont_ids = t(template.format(text=text)).input_ids, t(v).input_ids
            ids = torch.tensor([ctx_ids + cont_ids])
            labels = ids.clone()
            labels[0, :len(ctx_ids)] = -100
            loss = float(tiny_lm(ids, labels=labels).loss)  # mean NLL of the continuation tokens
            got = evaluate.continuation_logprob(tiny_lm, t, template.format(text=text), v, "cpu")
            assert got == pytest.approx(-loss * len(cont_ids), rel=1e-5)
            scores.append(-loss * len(cont_ids))
        expected.append(max(range(2), key=scores.__getitem__))
    assert evaluate.zeroshot_predictions(tiny_lm, t, texts, template, verbalizers, "cpu") == expected


def test_probe_accuracy_is_stable_across_runs(minilm, compose, tmp_path):
    model, tok = minilm
    cfg = compose([*FAST, "eval.probe_train=64", "eval.probe_test=64"])
    accs = []
    for run in ("a", "b"):  # two cold caches: computed twice from scratch
        ctx = evaluate.Context(cfg, tok, "cpu", str(tmp_path / run), provenance.model_key(cfg))
        accs.append(evaluate.task_for(cfg).prepare(model, ctx)["info"]["accuracy_dense"])
    assert accs[0] == accs[1] and 0.5 < accs[0] <= 1


def test_bbc_five_topics_from_folders(compose):
    cfg = compose(["data=bbc"])
    split = data.load_classification(cfg.data, 50, 50)
    assert split.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(split.train.texts) == len(split.test.texts) == 50
    assert not set(split.train.texts) & set(split.test.texts)
    assert len(set(split.test.labels)) >= 4 and all(len(t) > 200 for t in split.test.texts)


@pytest.mark.slow
def test_bbc_probe_accuracy(minilm, compose, tmp_path):
    model, tok = minilm
    cfg = compose([*FAST, "data=bbc", "eval.probe_train=300", "eval.probe_test=200"])
    ctx = evaluate.Context(cfg, tok, "cpu", str(tmp_path), provenance.model_key(cfg))
    assert evaluate.task_for(cfg).prepare(model, ctx)["info"]["accuracy_dense"] > 0.85


def test_task_kind_and_optional_package_checked_before_launch(compose, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("inference.fallback")):
        validate(compose([*FAST, "inference.fallback=always", f"results_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=re.escape("zeroshot needs model.kind")):
        validate(compose([*FAST, "eval.task=zeroshot", f"results_dir={tmp_path}"]))
    if importlib.util.find_spec("lm_eval") is None:
        with pytest.raises(ConfigError, match="optional package 'lm_eval'"):
            validate(compose([*FAST, "model=smollm2", "eval=lm_eval", f"results_dir={tmp_path}"]))


def test_row_has_dense_and_compressed_latency_and_memory(compose, tmp_path):
    row = job.run(compose([*FAST, BLOCK0, "rank=8", f"results_dir={tmp_path}", "eval.latency.batch_size=2",
                           "eval.latency.seq_len=32", "eval.latency.shapes=[[2,1]]", "eval.latency.repeats=3"]))
    assert row.status == "ok", row.error
    for key in ("latency_ms", "latency_ms_dense", "latency_ms_p90", "latency_ms_dense_p90", "peak_mem_mb"):
        assert getattr(row, key) > 0, key
    assert row.latency_ms_p90 >= row.latency_ms and row.latency_ms_dense_p90 >= row.latency_ms_dense
    assert 0 < row.model_bytes < row.model_bytes_dense
    for which in ("dense", "compressed"):
        assert set(row.extra["latency"][which]) == {"b2xt32", "b2xt1"}
    assert row.extra["latency"]["dense"]["b2xt32"]["median"] == row.latency_ms_dense


def test_fallback_keeps_outputs_and_follows_the_timings(minilm, compose):
    model, tok = minilm
    import copy

    model = copy.deepcopy(model)
    cfg = compose([*FAST, BLOCK0, "rank=300", "inference.fallback=auto", "eval.latency.batch_size=4",
                   "eval.latency.seq_len=64", "eval.latency.repeats=3"])
    layers = models.target_modules(model, cfg.model.targets)
    names = [r.name for r in compress_model(model, layers, cfg, progress=False)]
    batch = tok(["one sentence to check", "and another"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    ctx = evaluate.Context(cfg, tok, "cpu", "", {})
    info = evaluate.layer_fallback(model, names, ctx)
    with torch.no_grad():
        after = model(**batch).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert set(info["layer_latency"]) == set(names)
    slower = {n for n, t in info["layer_latency"].items() if t["dense_ms"] < t["factorized_ms"]}
    assert set(info["fallback_layers"]) == slower
    for n in names:
        assert isinstance(model.get_submodule(n), torch.nn.Linear) == (n in slower)


def test_latency_inputs_are_ids_the_model_has_rows_for(tiny_lm, compose):
    """A tokenizer whose vocabulary is larger than the model's embedding table (97 rows here) gets
    random ids below the table's size, not an IndexError."""
    from types import SimpleNamespace

    ctx = evaluate.Context(compose([*FAST, "model=smollm2"]), SimpleNamespace(vocab_size=50_000), "cpu", "", {})
    speed = evaluate.speed(tiny_lm, ctx)
    assert speed.median_ms > 0 and list(speed.shapes) == ["b2xt16"]


def test_a_stage_peak_keeps_the_process_peak(monkeypatch):
    """reset_peak (streamed blocks) restarts CUDA's peak counter; peak_memory_mb still reports the
    process's peak from before it (the dense evaluation), and later ones above it."""
    from lrsweep.evaluate import latency

    counter = {"peak": 0}
    monkeypatch.setattr(latency, "_CUDA_PEAK", {})
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counter["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counter.update(peak=0))
    counter["peak"] = 4096 * 2**20  # the dense model evaluated on the device
    latency.reset_peak("cuda:0")     # a block starts
    counter["peak"] = 2048 * 2**20
    assert torch.cuda.max_memory_allocated("cuda:0") / 2**20 == 2048  # the block's own peak
    assert latency.peak_memory_mb("cuda:0") == 4096
    latency.reset_peak("cuda:0")
    counter["peak"] = 5000 * 2**20
    assert latency.peak_memory_mb("cuda:0") == 5000
