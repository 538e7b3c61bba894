"""Which encoder metric follows the model's quality? MiniLM dense and svd at several ranks, scored by the
task families of the sentence-embedding literature that the bundled data allow.

    python benchmarks/encoder_metrics.py [--ranks 32,64,128] [--queries 500]

Candidates, each on the embeddings of the model it scores (lrsweep.evaluate.embeddings):
  refit 1000/500     ``accuracy_refit`` as ``eval.probe_refit=true`` computes it: a logistic regression
                     (C=1) fitted on 1000 Rotten Tomatoes reviews, scored on 500 (± binomial stderr);
  refit 1000/2000 x5 the same probe scored on 2000 test reviews, mean ± std over 5 training subsamples
                     of 1000 drawn from 4000 (MTEB's classification protocol: several train subsamples);
  refit 4000/2000    fitted on 4000 reviews, C=1 and C=10, scored on 2000 (± binomial stderr);
  nDCG@10            ``eval.retrieval.queries=<queries>`` (lrsweep.evaluate.retrieval): news titles
                     retrieving their bodies (± the per-query stderr), and each step between consecutive
                     variants with the paired stderr of its per-query differences;
  V-measure          k-means (k = 5) of the 2,225 BBC News articles' embeddings against their topics,
                     mean ± std over 5 k-means seeds (MTEB's clustering score).
Prints a Markdown table, one row per variant, and the seconds each variant's embeddings took.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from sklearn.cluster import KMeans
from sklearn.metrics import v_measure_score
from tabulate import tabulate

import lrsweep
from lrsweep import data, linear_probe, models, provenance, stderr
from lrsweep.evaluate import Context, embed, retrieval
from lrsweep.methods.svd import SVDOptions

CONF = Path(__file__).resolve().parent.parent / "conf"


def refit(train, ytr, test, yte, C=1.0) -> float:
    return linear_probe.fit(train, ytr, C=C).accuracy(test, torch.tensor(yte))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="32,64,128")
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"eval.retrieval.queries={args.queries}"])
        bbc_cfg = compose("config", overrides=["data=bbc"]).data
    cache_dir = os.environ.get("LRSWEEP_CACHE", str(Path.home() / ".cache" / "lrsweep"))
    dense, tok = models.load(cfg.model, "cpu", cache_dir)
    ctx = Context(cfg, tok, "cpu", cache_dir, provenance.model_key(cfg))

    rt = data.load_classification(cfg.data, 4000, 2000)  # train: the seeded shuffle's first 4000, test: its last 2000
    queries, documents = retrieval.sample(cfg.eval.retrieval)
    bbc = data.load_dataset(bbc_cfg)
    topics = sorted(set(bbc[bbc_cfg.label_column]))
    bbc_texts, bbc_labels = list(bbc["text"]), [topics.index(t) for t in bbc[bbc_cfg.label_column]]

    variants = [("dense", None), *((f"svd r{r}", int(r)) for r in args.ranks.split(","))]
    rows, per_query = [], {}
    for name, rank in variants:
        model = dense
        if rank is not None:
            model = copy.deepcopy(dense)
            lrsweep.compress_(model, SVDOptions(), cfg.model.targets, rank=rank, bits=16)
        t0 = time.perf_counter()
        tr, te = embed(model, tok, rt.train.texts, ctx), embed(model, tok, rt.test.texts, ctx)
        q, d = embed(model, tok, queries, ctx), embed(model, tok, documents, ctx)
        b = embed(model, tok, bbc_texts, ctx).numpy()
        seconds = time.perf_counter() - t0
        ytr, yte = rt.train.labels, rt.test.labels

        default = refit(tr[:1000], ytr[:1000], te[-500:], yte[-500:])
        subsampled = []
        for seed in range(5):
            pick = np.random.default_rng(seed).choice(4000, 1000, replace=False)
            subsampled.append(refit(tr[pick], [ytr[i] for i in pick], te, yte))
        big = {C: refit(tr, ytr, te, yte, C) for C in (1.0, 10.0)}
        r = retrieval.ranks(q, d)
        per_query[name] = retrieval.ndcg_at(r).tolist()
        got = retrieval.scores(r)
        vm = [v_measure_score(bbc_labels, KMeans(5, n_init=1, random_state=s).fit_predict(b)) for s in range(5)]
        rows.append([name, f"{default:.3f} ± {stderr.binomial(default, 500):.3f}",
                     f"{np.mean(subsampled):.3f} ± {np.std(subsampled, ddof=1):.3f}",
                     f"{big[1.0]:.3f} ± {stderr.binomial(big[1.0], 2000):.3f}",
                     f"{big[10.0]:.3f} ± {stderr.binomial(big[10.0], 2000):.3f}",
                     f"{got['ndcg_at_10']:.3f} ± {got['ndcg_at_10_stderr']:.3f}",
                     f"{np.mean(vm):.3f} ± {np.std(vm, ddof=1):.3f}", f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    print(tabulate(rows, headers=["model", "refit 1000/500", "refit 1000/2000 x5", "refit 4000/2000 C=1",
                                  "refit 4000/2000 C=10", f"nDCG@10 ({args.queries} queries)", "V-measure BBC",
                                  "embed s"], tablefmt="github"))
    names = [n for n, _ in variants][1:]
    for lo, hi in itertools.pairwise(names):
        diff, se = stderr.item_mean([b - a for a, b in zip(per_query[lo], per_query[hi], strict=True)])
        print(f"nDCG@10 step {lo} -> {hi}: {diff:+.3f} ± {se:.3f} (paired per-query stderr)")
    print(f"loadavg {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
