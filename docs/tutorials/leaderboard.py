# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 3: a leaderboard on known truth, and how to read its statistics
#
# Which attribution rule and layer split neurons best? On real networks nobody knows the true split, so
# polypure *plants* it: a virtual neuron made of two real channels a and b (`sum` mode: their scaled sum,
# `max` mode: the larger of the two) has a known answer for each of its references, which of the two made
# it fire (see [the method](../method.md#planted)). This tutorial ranks two rules x three layers x two
# clusterers on planted neurons of the demo network, then reads the paired statistics line by line.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without widgets

import tempfile
from pathlib import Path

import numpy as np

from polypure import Experiment, open_results
from polypure.evaluation.comparisons import format_leaderboard

store = Path(tempfile.mkdtemp(prefix="polypure-tutorial-")) / "leaderboard.h5"

# %% [markdown]
# ## The run
#
# Two rule variants share the top-K and the references: Gradient x Activation (`gxa`) and zennit's
# `epsilon_plus` composite with its ResNet canonizer. `compare.baseline` with `baseline_method` turns the
# comparisons into a leaderboard: every (space, clusterer) against `gxa` at `block_2` with k-means, over
# the same neurons.

# %%
exp = Experiment(
    "demo", store=store, progress=False,
    overrides=["data.synthetic.n=400", "topk.k=16", "relevance.n_refs=16", "topk.layers=[block_3]"],
    relevance={"targets": [{"layer": "block_3", "neurons": "0:16", "attribution_layers": ["block_0", "block_1",
                                                                                         "block_2"]}],
               "planted": {"pairs": 12, "layer": "block_3", "mode": ["sum", "max"], "seed": 0},
               "variants": [{"id": "gxa", "composite": "gradient"},
                            {"id": "eps_plus", "composite": "epsilon_plus", "canonizers": ["resnet"]}]},
    cluster={"methods": [{"name": "kmeans", "n_clusters": 2}, {"name": "hdbscan", "min_cluster_size": 4}]},
    evaluate={"ground_truth": ["planted", "shape"], "polysemantic_by": "shape"},
    compare={"baseline": "gxa:block_2", "baseline_method": "kmeans", "metrics": ["ARI planted"]},
)
_ = exp.run(["topk", "relevance", "cluster", "evaluate"])

# %% [markdown]
# ## The leaderboard
#
# One ranked table per group of neurons: the planted neurons of each mode. `mean` is the space's mean ARI
# over the neurons it shares with the baseline, `difference` the mean of the per-neuron differences with
# its 95 % bootstrap interval, `p_holm` the Wilcoxon signed-rank p-value adjusted by Holm over every line
# of the run, `effect` the matched-pairs rank-biserial correlation, `n` the neurons compared.

# %%
with open_results(store) as results:
    table = results.comparisons()
print(format_leaderboard(table.to_dict("records"), top=8))

# %% [markdown]
# ## Reading one line
#
# Take the best line of the `sum` group: is it better than the baseline? Three numbers answer three
# questions. The interval says how large the average gain is and whether it could be 0; the p-value (after
# Holm, because the table makes many comparisons at once) says whether the neurons' differences are
# consistently of one sign; the effect says how many neurons gain versus lose (+1: all gain).

# %%
group = table[table["group"] == "block_3@planted (sum)"].sort_values("mean_b", ascending=False)
best = group.iloc[0]
print(f"{best.method}:{best.space_b}: mean {best.mean_b:.3f} vs baseline {best.mean_a:.3f}, "
      f"difference {best.mean_diff:+.3f} [{best.ci_low:+.3f}, {best.ci_high:+.3f}], p_holm {best.p_holm:.3f}, "
      f"effect {best.effect:+.2f}, n = {best.n}")
if best.ci_low > 0 and best.p_holm < 0.05:
    print("better than the baseline, neuron by neuron")
elif best.ci_low > 0:
    print("better on average, but not significant once every comparison of the run is accounted for")
else:
    print("not distinguishable from the baseline with this many neurons")

# %% [markdown]
# ## Recompute it yourself
#
# The stored statistics are plain functions of the per-neuron scores, so a line can be recomputed from the
# metrics with scipy: the Wilcoxon test of the paired differences gives the unadjusted p-value.

# %%
from scipy.stats import wilcoxon

with open_results(store) as results:
    metrics = results.metrics("block_3@planted")
planted = metrics[(metrics["metric"] == "ARI") & (metrics["of"] == "planted") & (metrics["mode"] == "sum")]
# a neuron without a score (NaN, e.g. all references noise) is left out, as the stored comparison does
a = planted[(planted["space"] == "gxa:block_2") & (planted["method"] == "kmeans")].set_index("neuron")["value"].dropna()
b = planted[(planted["space"] == best.space_b) & (planted["method"] == best.method)].set_index("neuron")["value"].dropna()
both = a.index.intersection(b.index)
diff = (b[both] - a[both]).to_numpy()
print(f"{len(both)} neurons, mean difference {diff.mean():+.3f} (stored: {best.n} neurons, {best.mean_diff:+.3f})")
if np.any(diff != 0):
    print(f"Wilcoxon p {wilcoxon(b[both], a[both]).pvalue:.4f} (stored, before Holm: {best.p_value:.4f})")
