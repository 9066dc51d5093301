"""Must-show 2: streaming top-K equals brute force (ties, K = N, shards, resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polypure import Experiment
from polypure.attribution.topk import TopK, channel_scorer, channel_statistic, collect_topk
from polypure.data.datasets import ArrayDataset

from .helpers import random_images
from .nets import tiny


def dataset_with_ties(n=23, size=16, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    pixels[7] = pixels[2]          # exact duplicates give exactly equal activations: ties
    pixels[19] = pixels[2]
    pixels[11] = 0                 # a black image drives many channels to the same value
    pixels[13] = 0
    return ArrayDataset(pixels, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def brute_force(model, dataset, layer, statistic, k):
    """All statistics kept; order by decreasing value, ties by increasing sample index."""
    module = model.submodule(layer)
    stats = []
    with torch.no_grad():
        for i in range(len(dataset)):
            out = {}
            handle = module.register_forward_hook(lambda m, a, o, out=out: out.setdefault("a", o))
            model.module(dataset[i][0].unsqueeze(0))
            handle.remove()
            stats.append(channel_statistic(out["a"], statistic)[0])
    stats = torch.stack(stats).numpy()           # (N, C)
    indices = np.stack([np.lexsort((np.arange(len(col)), -col))[:k] for col in stats.T])
    return np.take_along_axis(stats.T, indices, 1), indices


@pytest.mark.parametrize("statistic", ["max", "mean"])
@pytest.mark.parametrize("layer,k", [("c2", 5), ("c3", 23), ("logits", 4)])
def test_topk_equals_brute_force(tmp_path, statistic, layer, k):
    model, dataset = tiny(seed=3), dataset_with_ties()
    # ties: duplicated images (2, 7, 19), two black images, and
    # channel 0 of c3 (and logit 0) is the same constant for every sample: a k-way tie
    with torch.no_grad():
        model.module.conv3.weight[0] = 0
        model.module.conv3.bias[0] = 0.5
        model.module.fc.weight[0] = 0
    exp = Experiment(model=model, dataset=dataset, store=tmp_path / "t.h5", progress=False,
                     topk={"layers": [layer], "k": k, "statistic": statistic},
                     relevance={"target_layer": layer, "attribution_layers": ["c1"], "n_refs": 1})
    exp.topk()
    expected_values, expected_indices = brute_force(model, dataset, layer, statistic, k)
    import h5py
    with h5py.File(tmp_path / "t.h5", "r") as f:
        np.testing.assert_array_equal(f[f"topk/{layer}/indices"][()], expected_indices)
        np.testing.assert_allclose(f[f"topk/{layer}/values"][()], expected_values, rtol=1e-6, atol=1e-6)
        assert f[f"topk/{layer}"].attrs["statistic"] == statistic
    if layer != "c2":
        assert expected_indices[0].tolist() == list(range(k))  # the tie resolved by sample index


def test_ties_go_to_smaller_index():
    acc = TopK(channels=1, k=3)
    acc.update(torch.tensor([[1.0], [2.0], [2.0]]), torch.tensor([10, 11, 12]))
    acc.update(torch.tensor([[2.0], [3.0]]), torch.tensor([4, 5]))   # a later shard with smaller indices
    assert acc.indices.tolist() == [[5, 4, 11]]
    assert acc.values.tolist() == [[3.0, 2.0, 2.0]]


def test_shards_merge_to_the_whole():
    model, dataset = tiny(seed=1), dataset_with_ties()
    modules = {"c3": model.submodule("c3")}
    scorer = channel_scorer("c3", 16, "max")
    whole = collect_topk(model.module, dataset, modules, [scorer], k=6, progress=False)["c3"]
    parts = [collect_topk(model.module, dataset, modules, [scorer], k=6, start=a, stop=b, batch_size=4,
                          progress=False)["c3"] for a, b in [(15, 23), (0, 6), (6, 15)]]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(merged.indices, whole.indices)
    # other batch compositions may change the last float bit of a convolution
    torch.testing.assert_close(merged.values, whole.values, rtol=0, atol=1e-6)


def test_resume_from_checkpoint_matches_one_pass():
    model, dataset = tiny(seed=2), dataset_with_ties()
    modules = {"c2": model.submodule("c2")}
    scorer = channel_scorer("c2", 12, "mean")
    whole = collect_topk(model.module, dataset, modules, [scorer], k=5, batch_size=3, progress=False)["c2"]
    saved = {}

    class Stop(Exception):
        pass

    def checkpoint(states, done):
        if "done" in saved:          # the checkpoint written on the way out of the interrupted pass
            return
        saved["state"] = TopK.from_arrays(*states["c2"].arrays()[:2])
        saved["done"] = done["c2"]
        raise Stop

    with pytest.raises(Stop):
        collect_topk(model.module, dataset, modules, [scorer], k=5, batch_size=3, checkpoint=checkpoint,
                     checkpoint_every=2, progress=False)
    assert saved["done"] == 6
    resumed = collect_topk(model.module, dataset, modules, [scorer], k=5, batch_size=3, progress=False,
                           states={"c2": saved["state"]}, done={"c2": saved["done"]})["c2"]
    assert torch.equal(resumed.indices, whole.indices)


def test_k_larger_than_dataset_is_a_config_error(tmp_path):
    from polypure.errors import ConfigError
    exp = Experiment(model=tiny(), dataset=random_images(4, 16), store=tmp_path / "t.h5", progress=False,
                     topk={"layers": ["c3"], "k": 5},
                     relevance={"target_layer": "c3", "attribution_layers": ["c1"], "n_refs": 1})
    with pytest.raises(ConfigError, match=r"topk.k: 5 is more than the 4 samples of the data \(valid: 1..4\)"):
        exp.topk()


def test_nan_activation_names_the_sample():
    from polypure.errors import PolypureError
    acc = TopK(channels=2, k=1)
    with pytest.raises(PolypureError, match="NaN activation at sample 8"):
        acc.update(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), torch.tensor([7, 8]))


def test_a_bad_image_keeps_the_batches_finished_before_it(tmp_path):
    """The pass stops with an error naming the image, and a checkpoint of all batches before it."""
    from polypure.errors import PolypureError
    from polypure.store.hdf5_store import Store

    dataset = dataset_with_ties()
    original = dataset._raw

    def broken(index):
        if index == 17:
            raise PolypureError("image 'x.jpg' (sample 17) cannot be read: truncated")
        return original(index)

    dataset._raw = broken
    exp = Experiment(model=tiny(seed=2), dataset=dataset, store=tmp_path / "t.h5", progress=False,
                     data={"batch_size": 4}, topk={"layers": ["c3"], "k": 3, "checkpoint_every": 100},
                     relevance={"target_layer": "c3", "attribution_layers": ["c1"], "n_refs": 1})
    with pytest.raises(PolypureError, match="sample 17"):
        exp.topk()
    with Store(tmp_path / "t.h5", "r") as store:
        _, indices, samples_done, complete = store.topk_progress("c3")
    assert samples_done == 16 and not complete and indices.max() < 16
    dataset._raw = original
    exp.topk()
    fresh = tiny(seed=2)
    expected = collect_topk(fresh.module, dataset, {"c3": fresh.submodule("c3")},
                            [channel_scorer("c3", 16, "max")], k=3, batch_size=4, progress=False)["c3"]
    with Store(tmp_path / "t.h5", "r") as store:
        np.testing.assert_array_equal(store.topk_progress("c3")[1], expected.indices.numpy())
