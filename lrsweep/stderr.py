"""Standard errors of the evaluation metrics, from the evaluation itself (one run, one seed).

  binomial     an accuracy p over n independent test items: sqrt(p (1 - p) / n);
  item_mean    the mean of per-item scores over n items (nDCG@10 over retrieval queries): the sample
               standard deviation (n - 1 in its denominator) / sqrt(n);
  window_mean  the token-weighted mean of per-window mean losses, windows as the independent units
               (tokens within a window are not independent): the ratio estimator's standard error
               sqrt(k / (k - 1) * sum(w_i^2 (l_i - mean)^2)) / sum(w_i), w_i the tokens a window scores;
               with equal windows this is the sample std of the window losses / sqrt(k);
  perplexity   exp(mean NLL) with its standard error by the delta method: exp(mean) * se(mean)
               (in perplexity units; the standard error of the log-perplexity is stderr / perplexity).

These measure the test set's sampling noise of one model, not the spread over seeds of a
randomized method (analysis/: std over seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def binomial(p: float | None, n: int) -> float | None:
    """Standard error of an accuracy ``p`` measured on ``n`` items (None without a value or items)."""
    if p is None or n < 1 or not math.isfinite(p):
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def item_mean(scores: Sequence[float]) -> tuple[float, float | None]:
    """(mean, its standard error) of per-item scores; the error is None for fewer than two items.
    :func:`window_mean` with equal weights."""
    return window_mean(scores, [1.0] * len(scores))


def window_mean(losses: Sequence[float], weights: Sequence[float]) -> tuple[float, float | None]:
    """(weighted mean, its standard error) of per-window losses weighted by the tokens each scores;
    the error is None for fewer than two windows (nothing to estimate it from)."""
    if len(losses) != len(weights) or not losses:
        raise ValueError(f"{len(losses)} window losses for {len(weights)} weights")
    total = float(sum(weights))
    mean = sum(w * x for w, x in zip(weights, losses, strict=True)) / total
    k = len(losses)
    if k < 2 or not math.isfinite(mean):
        return mean, None
    var = k / (k - 1) * sum((w * (x - mean)) ** 2 for w, x in zip(weights, losses, strict=True)) / total**2
    return mean, math.sqrt(var)


def perplexity(losses: Sequence[float], weights: Sequence[float]) -> tuple[float, float | None]:
    """(perplexity, its standard error by the delta method) of per-window mean NLLs."""
    mean, se = window_mean(losses, weights)
    ppl = math.inf if mean > 700 else math.exp(mean)  # math.exp overflows (an error) past ~709
    return ppl, (None if se is None or not math.isfinite(ppl) else ppl * se)
