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
# # Tutorial 1: the demo, from Experiment to the report
#
# The bundled demo explains a small ResNet trained on synthetic concept images whose four classes each
# merge two unrelated shapes, so every logit is polysemantic with a known split (see
# [Getting started](../getting-started.md)). This tutorial runs it at a tenth of its size (under two minutes
# on two CPU cores), reads the results as pandas tables, draws a figure and writes the report.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without widgets

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

import polypure
from polypure import Experiment, open_results, write_report

folder = Path(tempfile.mkdtemp(prefix="polypure-tutorial-"))
store = folder / "demo.h5"

# %% [markdown]
# ## Run the stages
#
# `Experiment("demo")` loads the bundled config; `overrides` change single keys as `--set` does on the
# command line. Every stage writes the store and skips work it already holds, so running a cell twice
# costs nothing.

# %%
exp = Experiment("demo", store=store, progress=False,
                 overrides=["data.synthetic.n=400", "topk.k=16", "relevance.n_refs=16",
                            "relevance.planted.pairs=8", "report.neurons=2"])
_ = exp.run(["topk", "relevance", "cluster", "evaluate"])

# %% [markdown]
# ## The results as tables
#
# `open_results` opens the store read-only. `summary()` is the table `polypure run` prints: per group of
# neurons, space and metric, the mean and standard deviation over neurons.

# %%
with open_results(store) as results:
    summary = results.summary()
    metrics = results.metrics("block_3")
summary[(summary["group"] == "block_3 [polysemantic by shape]") & (summary["metric"] == "ARI shape")][
    ["group", "space", "metric", "mean", "std", "n"]]

# %% [markdown]
# `metrics(target)` has one row per neuron, space, clusterer and score; here the adjusted Rand index of
# each `block_3` channel's k-means clusters against the shape of its references, per space.

# %%
ari = metrics[(metrics["metric"] == "ARI") & (metrics["of"] == "shape")]
ari.pivot_table(index="neuron", columns="space", values="value").describe().loc[["count", "mean", "50%"]]

# %% [markdown]
# ## Is one layer better, neuron by neuron?
#
# `compare` pairs each space with a baseline over the same neurons: the mean difference with its bootstrap
# interval, the Wilcoxon signed-rank p-value (Holm-adjusted over the table) and the rank-biserial effect.

# %%
with open_results(store) as results:
    table = results.compare("ARI shape", baseline="block_2", group="block_3 [polysemantic by shape]")
table[["space_a", "space_b", "n", "mean_diff", "ci_low", "ci_high", "p_holm", "effect"]]

# %%
fig, ax = plt.subplots(figsize=(5, 2.5))
ax.errorbar(table.mean_diff, table.space_b, xerr=(table.mean_diff - table.ci_low, table.ci_high - table.mean_diff),
            fmt="o")
ax.axvline(0, color="grey", lw=0.8)
ax.set_xlabel("ARI shape: space - block_2 (95 % CI)")
plt.show()

# %% [markdown]
# ## A figure of the store, and the report
#
# Every figure of the report is a function of `polypure.viz.figures` that writes PNG and SVG; the report is
# a folder that opens from disk in a browser.

# %%
from IPython.display import Image

from polypure.viz import figures

paths = figures.ground_truth_table(store, folder / "figures", formats=("png",))
Image(filename=str(paths[0]))

# %%
index = write_report(store, dataset=exp.dataset, max_neurons=2, progress=False)
print(index.relative_to(folder), "written,", len(list(index.parent.rglob("*.html"))), "pages")
print("polypure", polypure.__version__)
