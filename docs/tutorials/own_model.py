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
# # Tutorial 2: your own torchvision model, two rules, a rule check and a paired comparison
#
# No config file and no download: a torchvision ResNet-18 and images held in memory. The images here are
# synthetic concept images (known shape, colour and texture) so that the result can be scored; any torch
# dataset of `(image, label)` items works the same way. The network is trained for under a minute on them, so
# its neurons mean something, if not much: a network this briefly trained splits its neurons by class only
# weakly (the bundled demo model, trained properly, is the one to learn what the numbers can look like).

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without widgets

import tempfile
from pathlib import Path

import torch
import torchvision

from polypure import Experiment, open_results
from polypure.data.synthetic import class_of_shape, render

torch.manual_seed(0)
store = Path(tempfile.mkdtemp(prefix="polypure-tutorial-")) / "resnet18.h5"

images, factors = render(600, seed=0)                     # uint8 (N, 64, 64, 3) and the factors per image
shape = factors["shape"]                                   # 8 shapes
x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
x = (x - mean[:, None, None]) / std[:, None, None]
y = torch.as_tensor(class_of_shape()[shape])               # 4 classes, each two unrelated shapes
dataset = torch.utils.data.TensorDataset(x, y)

# %% [markdown]
# ## A small model, trained briefly
#
# Four classes that each merge two shapes make every logit polysemantic by construction.

# %%
net = torchvision.models.resnet18(weights=None, num_classes=4)
optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
for _ in range(8):
    for batch in torch.randperm(len(x)).split(32):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
        loss.backward()
        optimiser.step()
net.eval()
with torch.no_grad():
    accuracy = (net(x).argmax(1) == y).float().mean().item()
print(f"training accuracy {accuracy:.2f}")

# %% [markdown]
# ## Two rules in one store
#
# `relevance.variants` names rules; each gets its own relevance vectors at the same references. Gradient x
# Activation (`gxa`) needs no canonizer; zennit's `epsilon_plus` composite on a ResNet needs the `resnet`
# canonizer (it makes the skip connections' additions explicit, so relevance is split between the branches
# and conserved). `mean` and `std` tell polypure how the images were normalised, for thumbnails.

# %%
exp = Experiment(
    model=net, dataset=dataset, mean=mean.tolist(), std=std.tolist(), store=store, progress=False,
    topk={"layers": ["block_3", "logits"], "k": 16},
    relevance={"targets": [{"layer": "block_3", "neurons": "0:24", "attribution_layers": ["block_1", "block_2"]}],
               "n_refs": 16,
               "variants": [{"id": "gxa", "composite": "gradient"},
                            {"id": "lrp", "composite": "epsilon_plus", "canonizers": ["resnet"]}]},
    cluster={"methods": [{"name": "kmeans", "n_clusters": 2}]},
    evaluate={"ground_truth": ["class"]},
    compare={"baseline": "gxa:block_2", "metrics": ["ARI class"]},
)

# %% [markdown]
# ## Check the rules before computing
#
# `check_rules` runs each rule on a few samples and neurons and measures, layer by layer, whether relevance
# is conserved (the median share of the target's relevance that reaches the layer: near 1 for a sound LRP
# rule; far above 1 is relevance created, near 0 relevance lost), whether canonizers changed the model's
# output, and how many rows are silent. Gradient x Activation is not a conserving rule, so it gets no
# conservation verdict.

# %%
report = exp.check_rules(samples=4, neurons=3)
print(report.table())
print("every check passed" if report.passed else "\n".join(report.failures))

# %%
_ = exp.run(["topk", "relevance", "cluster", "evaluate"])

# %% [markdown]
# ## Which rule splits the neurons by class better?
#
# The comparisons pair each space with the baseline (`gxa` at `block_2`) over the same neurons. The
# channels of `block_3` whose references mix classes are the ones with something to split; the group
# `block_3` holds them all (a channel whose references are all of one class gets no score).

# %%
with open_results(store) as results:
    table = results.comparisons()
table[["group", "metric", "space_a", "space_b", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high",
       "p_holm", "effect"]].round(3)

# %% [markdown]
# A difference whose interval includes 0 is no evidence that one rule splits better; `effect` near +1 or -1
# means nearly every neuron moves the same way. See [the rule leaderboard](leaderboard.py) for a ranking of
# many rules at once on planted ground truth.
