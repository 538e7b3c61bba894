"""Mean-pooled sentence embeddings and a logistic-regression probe on them.

One implementation for the encoders' probe task (:mod:`lrsweep.evaluate.probe`) and their
calibration loss (:mod:`lrsweep.calib.sources`): the embedding of a text is the mean of the last
hidden states over its real tokens (attention mask), L2-normalized, in fp32; the probe is
scikit-learn's ``LogisticRegression`` fitted on the dense model's embeddings, kept as tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, hidden) embeddings of a tokenized batch (its ``labels``, if any, are not model inputs)."""
    hidden = model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


@dataclass
class Probe:
    """A fitted linear probe: one logit per class, or a single one for two classes (sklearn's binary case)."""

    coef: torch.Tensor  # (classes or 1, hidden), fp32
    intercept: torch.Tensor  # (classes or 1,)

    def to(self, device: str) -> Probe:
        return Probe(self.coef.to(device), self.intercept.to(device))

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ self.coef.T + self.intercept

    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        logits = self.logits(emb)
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)

    def accuracy(self, emb: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(emb) == labels).float().mean())

    def loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each text's cross-entropy (B,): of the softmax, or of the sigmoid of the single logit."""
        logits = self.logits(emb)
        if logits.shape[1] == 1:
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction="none")
        return nn.functional.cross_entropy(logits, labels, reduction="none")


def fit(emb: torch.Tensor, labels: Any, C: float) -> Probe:
    """Logistic regression (inverse regularization ``C``) of ``labels`` on the embeddings ``emb`` (CPU)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=2000).fit(emb.numpy(), np.asarray(labels))
    return Probe(torch.tensor(clf.coef_, dtype=torch.float32), torch.tensor(clf.intercept_, dtype=torch.float32))
