"""The held-out check of a candidate allocation against the uniform one.

The calibration loss of the model with every layer truncated in its metric, on ``CHECK_SAMPLES``
windows drawn with ``calib.seed + 1`` (not the ones that chose the candidate), for the candidate
ranks and for the uniform ones. The uniform allocation ships unless the candidate's mean
per-sample loss is lower by more than ``CHECK_Z`` = 2 standard errors of the paired differences (a
one-sided test at about 2%: at one standard error, MiniLM shipped two candidates with 3 and 5 points
less test accuracy). A causal LM's 16 windows come in ``CHECK_LOOKS`` = 2 looks of 8: after the
first the check stops when the candidate's loss is not lower (futility) or lower by more than
``CHECK_STOP_Z`` = 3 standard errors (efficacy, Haybittle-Peto's interim bound), so a clear verdict
costs half the forward passes. For encoders the check's probe is fitted on dense embeddings of other
held-out texts than those it scores, as the evaluation's probe is (in-sample, a lower probe loss
once shipped a candidate with 4.6 points less test accuracy).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from torch import nn

from lrsweep.allocate.losses import Swap, sample_losses
from lrsweep.allocate.spectra import Spectrum

# calibration windows (causal LMs, calib.seq_len tokens) or labelled texts (encoders: the probe needs both
# classes) of the check; encoders draw twice as many: the probe is fitted on the first half, scored on the second
CHECK_SAMPLES = {"causal_lm": 16, "encoder": 256}  # 16: with 4 windows the standard error is itself noise
CHECK_Z = 2.0  # the candidate ships when its held-out loss is lower by more than CHECK_Z standard errors
# causal LMs: the check's windows come in CHECK_LOOKS equal batches; after each but the last it stops when
# the candidate's loss is not lower (futility) or lower by more than CHECK_STOP_Z standard errors (efficacy)
CHECK_LOOKS = {"causal_lm": 2, "encoder": 1}
CHECK_STOP_Z = 3.0


@dataclass
class Check:
    """The held-out check of a candidate allocation against uniform, per held-out sample."""

    loss_uniform: float
    loss_candidate: float
    se: float  # standard error of the mean paired difference (candidate - uniform); 0 with one sample
    samples: int
    forward_s: float = 0.0  # seconds of the two forward passes over the held-out samples
    stopped: str = ""  # "futility" / "efficacy": decided at an interim look, before all the samples

    @classmethod
    def of(cls, uniform: np.ndarray, candidate: np.ndarray, forward_s: float) -> Check:
        d = candidate - uniform
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        return cls(float(uniform.mean()), float(candidate.mean()), se, len(d), forward_s)

    @property
    def better(self) -> bool:
        """Lower by more than CHECK_Z standard errors of the paired difference: a candidate whose
        gain is within the noise of the held-out samples does not ship."""
        return self.loss_candidate - self.loss_uniform + CHECK_Z * self.se < 0

    def interim(self) -> str:
        """At a look before the last: stop for futility (the candidate's loss is not lower: it would
        need a gain of over CHECK_Z se from the samples left) or efficacy (lower by over CHECK_STOP_Z
        se, Haybittle-Peto's bound, which leaves the final CHECK_Z test's error rate about as it is);
        "" goes on."""
        if self.loss_candidate >= self.loss_uniform:
            return "futility"
        return "efficacy" if self.loss_candidate - self.loss_uniform + CHECK_STOP_Z * self.se < 0 else ""


def against_uniform(model: nn.Module, layers: dict[str, nn.Module], spectra: dict[str, Spectrum],
                    uniform: dict[str, int], ranks: dict[str, int], batches: list[dict], loss_fn
                    ) -> tuple[dict[str, int], Check]:
    """(the ranks that ship, the check): the candidate only when its held-out loss is lower than
    uniform's by more than CHECK_Z standard errors of the paired per-sample difference. Each batch is
    a look: both rank sets on it, then (before the last) :meth:`Check.interim` may decide early."""
    losses: tuple[list, list] = ([], [])
    forward = 0.0
    for i, batch in enumerate(batches):
        for rs, out in zip((uniform, ranks), losses, strict=True):
            with Swap(layers, {n: spectra[n].approx(r) for n, r in rs.items()}):
                t0 = time.perf_counter()
                out.append(sample_losses(model, [batch], loss_fn))
                forward += time.perf_counter() - t0
        check = Check.of(*(np.concatenate(x) for x in losses), forward)
        if i < len(batches) - 1 and (stop := check.interim()):
            check.stopped = stop
            break
    return (ranks if check.better else uniform), check
