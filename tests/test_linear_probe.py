"""The linear probe shared by the probe task and the encoders' calibration loss, and the
calibration sources reading only the calibration config they are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lrsweep import linear_probe
from lrsweep.calib import SOURCES


@pytest.mark.parametrize("classes", [2, 3])
def test_probe_matches_sklearn(classes):
    """predict, accuracy and per-text loss agree with the fitted LogisticRegression (binary: one logit)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    gen = torch.Generator().manual_seed(classes)
    labels = torch.arange(90) % classes
    emb = torch.nn.functional.normalize(torch.randn(90, 8, generator=gen) + labels[:, None].float(), dim=-1)
    probe = linear_probe.fit(emb, labels, C=0.5)
    clf = LogisticRegression(C=0.5, max_iter=2000).fit(emb.numpy(), labels.numpy())
    assert probe.coef.shape == (1 if classes == 2 else classes, 8) and probe.coef.dtype == torch.float32
    assert probe.predict(emb).tolist() == clf.predict(emb.numpy()).tolist()
    assert probe.accuracy(emb, labels) == pytest.approx(clf.score(emb.numpy(), labels.numpy()))
    loss = probe.loss(emb, labels)
    assert loss.shape == (90,) and (loss > 0).all()
    assert float(loss.mean()) == pytest.approx(log_loss(labels.numpy(), clf.predict_proba(emb.numpy())), rel=1e-4)


def test_pooled_is_the_masked_mean_normalized():
    class Encoder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            x = input_ids.float()
            return type("Out", (), {"last_hidden_state": torch.stack([x, x**2], -1)})()

    batch = {"input_ids": torch.tensor([[3, 4, 100]]), "attention_mask": torch.tensor([[1, 1, 0]]),
             "labels": torch.tensor([1])}  # labels are not a model input; the padded 100 is not pooled
    mean = torch.tensor([3.5, 12.5])  # of (3, 9) and (4, 16)
    assert linear_probe.pooled(Encoder(), batch)[0].tolist() == pytest.approx((mean / mean.norm()).tolist())


def test_a_source_reads_only_its_calibration_config(compose):
    """The encoder source given ``calib`` alone, detached from the rest of the config, draws the same
    texts as from the composed config (heal.data and allocation's draws are such configs)."""
    from transformers import AutoTokenizer

    from lrsweep import models

    cfg = compose(["+calib=default", "calib.n_samples=6", "calib.batch_size=4", "calib.seq_len=16"])
    tok = AutoTokenizer.from_pretrained(models.resolve_path(cfg.model))
    alone = OmegaConf.create(OmegaConf.to_container(cfg.calib, resolve=True))
    a, b = SOURCES["encoder"].batches(cfg.calib, tok), SOURCES["encoder"].batches(alone, tok)
    assert [len(x["labels"]) for x in a] == [4, 2]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
