"""benchmarks/unigram_floor.py: token frequencies scored by lrsweep's perplexity protocol."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from lrsweep.evaluate.ppl import perplexity_stderr

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "unigram_floor.py"


@pytest.fixture(scope="module")
def Unigram():
    spec = importlib.util.spec_from_file_location("unigram_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Unigram


def test_add_one_frequencies_scored_on_the_windows_new_tokens(Unigram):
    # counts 2, 1, 1, 0 over a vocabulary of 4: p = (c + 1) / (4 + 4) = 3/8, 2/8, 2/8, 1/8
    model = Unigram([0, 0, 1, 2], vocab=4)
    ids = torch.tensor([[0, 1, 2, 3, 0, 3]])
    value, se = perplexity_stderr(model, ids, max_length=3, stride=3, device="cpu")
    # windows [0, 1, 2] and [3, 0, 3] score their last two tokens: 1, 2 and 0, 3
    nll = -(math.log(2 / 8) + math.log(2 / 8) + math.log(3 / 8) + math.log(1 / 8)) / 4
    assert value == pytest.approx(math.exp(nll))
    assert se > 0


def test_no_text_gives_the_vocabulary_size(Unigram):
    # with no counts every token has probability 1 / vocab: the perplexity is the vocabulary size
    model = Unigram([], vocab=50)
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(0))
    value, _ = perplexity_stderr(model, ids, max_length=16, stride=16, device="cpu")
    assert value == pytest.approx(50.0)
