"""The perplexity of a model that knows only token frequencies: the floor a compressed model falls to
when it keeps nothing of the context.

    python benchmarks/unigram_floor.py model=smollm2

A unigram model of the calibration text (``calib.text``, the model's tokenizer, add-one smoothed over
its vocabulary) scored by lrsweep's own perplexity protocol (``eval.text`` and ``eval.ppl_*``: the
same tokens, windows and standard error as a run's ``perplexity``). Hydra overrides select the model,
the texts and the windows as in a run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from torch import nn

import hydra_plugins.lrsweep_launcher.launcher  # noqa: F401  (registers the launcher configs compose reads)
from lrsweep import data, models
from lrsweep.context import Context
from lrsweep.evaluate import ppl
from lrsweep.provenance import model_key


class Unigram(nn.Module):
    """Token frequencies as a causal LM: every position predicts the same distribution; ``forward``
    returns the mean NLL of the scored labels, as a Hugging Face model's ``loss``."""

    def __init__(self, token_ids: list[int], vocab: int):
        super().__init__()
        counts = torch.bincount(torch.tensor(token_ids, dtype=torch.long), minlength=vocab).double()
        self.logp = torch.log((counts + 1) / (counts.sum() + vocab))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        targets = labels[:, 1:]
        return SimpleNamespace(loss=-self.logp[targets[targets != -100]].mean())


def main(overrides: list[str]) -> None:
    """``overrides``: Hydra overrides (model=smollm2 eval.ppl_context=2048 ...); -h prints this module's help."""
    if {"-h", "--help"} & set(overrides):
        raise SystemExit(__doc__)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "device=cpu", "method=svdllm", *overrides])
    _, tokenizer = models.load(cfg.model, "cpu", str(cfg.cache_dir))
    ctx = Context(cfg, tokenizer, "cpu", str(cfg.cache_dir), model_key(cfg))
    calib_ids = tokenizer(data.load_text(cfg.calib.text, "calib.text"), add_special_tokens=False).input_ids
    model = Unigram(calib_ids, len(tokenizer))
    value, se = ppl.perplexity_stderr(model, ppl.ppl_tokens(ctx), **ppl.ppl_args(ctx))
    print(f"unigram perplexity {value:.1f} ± {se:.1f} ({cfg.model.name}, calibration text "
          f"{len(calib_ids):,} tokens, vocabulary {len(tokenizer):,})")


if __name__ == "__main__":
    main(sys.argv[1:])
