"""Datasets passed from Python: the model sees the items as they are, pixels come from what the user says."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torchvision

from polypure import Experiment
from polypure.data.datasets import MEMORY_DATA_KEYS, FactoryDataset, WrappedDataset
from polypure.errors import ConfigError
from polypure.evaluation.evaluators import EVALUATORS, Evaluator
from polypure.store.hdf5_store import Store
from polypure.store.inspection import MEMORY_DATA_SHOWN, describe, shown_config

from .helpers import random_images
from .nets import tiny

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class Items(torch.utils.data.Dataset):
    """``(image, label)`` items; the labels are in an attribute polypure does not look at."""

    def __init__(self, images, classes):
        self.images = images
        self.classes_of_items = [int(c) for c in classes]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.classes_of_items[index]


def normalised(n, size, seed=0):
    """ImageNet-normalised float32 tensors (values well outside [0, 1]) and the pixels they came from."""
    generator = torch.Generator().manual_seed(seed)
    pixels = [torch.rand(3, size, size, generator=generator) for _ in range(n)]
    return [(p - MEAN) / STD for p in pixels], pixels


def test_topk_of_normalised_tensors_equals_brute_force_and_leaves_them_unchanged(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images, _ = normalised(40, 64)
    before = [image.clone() for image in images]
    exp = Experiment(model=model, dataset=Items(images, np.arange(40) % 4), store=tmp_path / "r.h5",
                     progress=False, data={"batch_size": 16}, topk={"layers": ["block_3"], "k": 8},
                     relevance={"neurons": [0, 7], "n_refs": 8, "attribution_layers": ["block_2"]})
    exp.run(["topk", "relevance"])

    outputs = []
    handle = model.layer4.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        for start in range(0, 40, 16):
            model(torch.stack(before[start:start + 16]))
    handle.remove()
    statistic = torch.cat(outputs).flatten(2).amax(2).T                # (512 channels, 40 samples)
    # torch.topk with ties going to the smaller sample index, as polypure breaks them
    values, indices = torch.sort(statistic, dim=1, descending=True, stable=True)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        np.testing.assert_array_equal(f["topk/block_3/indices"][()], indices[:, :8].numpy())
        np.testing.assert_allclose(f["topk/block_3/values"][()], values[:, :8].numpy(), rtol=1e-6)
        assert f["relevance/block_3/complete"][()].all()
    assert all(torch.equal(image, kept) for image, kept in zip(images, before))


def test_items_go_to_the_model_cast_to_its_dtype_without_rescaling():
    items = [torch.arange(12, dtype=torch.uint8).view(3, 2, 2), torch.full((3, 2, 2), 1 / 3, dtype=torch.float64)]
    ds = WrappedDataset(Items(items, [0, 1]))
    assert torch.equal(ds[0][0], torch.arange(12, dtype=torch.float32).view(3, 2, 2))
    assert ds[1][0].dtype == torch.float32 and torch.equal(ds[1][0], items[1].float())
    doubles = WrappedDataset(Items(items, [0, 1]), dtype=torch.float64)
    assert torch.equal(doubles[1][0], items[1])
    # a copy: changing what polypure got never reaches the dataset
    doubles[1][0].zero_()
    assert (items[1] != 0).all()


def test_labels_carried_only_by_items_reach_the_store_and_the_metrics(tmp_path, monkeypatch):
    images, _ = normalised(30, 24, seed=1)
    classes = np.arange(30) % 3
    settings = dict(store=tmp_path / "l.h5", progress=False, data={"batch_size": 8},
                    topk={"layers": ["c3"], "k": 6, "checkpoint_every": 1},
                    relevance={"target_layer": "c3", "neurons": [0, 1, 2], "attribution_layers": ["c1", "c2"],
                               "n_refs": 6},
                    cluster={"spaces": ["c2", "activation", "labels"]}, evaluate={"references": ["labels"]})

    # the top-K pass is stopped part-way; the labels of the samples it had seen must survive the restart
    original, calls = Store.write_topk, {"n": 0}

    def interrupted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Store, "write_topk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Experiment(model=tiny(seed=4), dataset=Items(images, classes), **settings).topk()
    monkeypatch.setattr(Store, "write_topk", original)
    with h5py.File(tmp_path / "l.h5", "r") as f:
        assert 0 < f["topk/c3"].attrs["samples_done"] < 30
        seen = f["topk/c3"].attrs["samples_done"]
        np.testing.assert_array_equal(f["samples/labels"][:seen], classes[:seen])

    Experiment(model=tiny(seed=4), dataset=Items(images, classes), **settings).run(["topk", "relevance"])
    # a new experiment, whose dataset has not streamed past any item, runs the label evaluator and the metrics
    exp = Experiment(model=tiny(seed=4), dataset=Items(images, classes), **settings)
    exp.run(["embed", "cluster", "evaluate"])
    with h5py.File(tmp_path / "l.h5", "r") as f:
        np.testing.assert_array_equal(f["samples/labels"][()], classes)
        refs = f["topk/c3/indices"][[0, 1, 2], :6]
        np.testing.assert_array_equal(f["embeddings/labels/c3"][()].argmax(-1), classes[refs])
        assert "metrics/c3/ari/class/c2/kmeans" in f
    assert any(r["metric"] == "ARI class" and r["space"] == "c2" for r in exp.summary)
    assert "labelled 30" in describe(tmp_path / "l.h5")


def test_labels_attribute_stays_the_fast_path():
    class Targets(Items):
        targets = [2, 2, 1]

    ds = WrappedDataset(Targets([torch.zeros(3, 2, 2)] * 3, [0, 0, 0]))
    assert not ds.labels_from_items and ds.labels.tolist() == [2, 2, 1] and ds[0][1] == 2
    items = WrappedDataset(Items([torch.zeros(3, 2, 2)] * 3, [0, 1, 2]))
    assert items.labels_from_items and items[2][1] == 2
    # only integer classes count as labels
    unlabelled = WrappedDataset(torch.utils.data.TensorDataset(torch.zeros(2, 3, 2, 2), torch.tensor([0.5, 1.5])))
    assert unlabelled[1][1] == -1


class MeanColour(Evaluator):
    """The mean of each pixel channel: shows exactly which pixels an evaluator got."""

    calls = 0

    def embed_images(self, images):
        MeanColour.calls += 1
        return torch.stack([image.mean((1, 2)) for image in images])


def test_evaluators_need_pixels_and_get_them_from_mean_and_std(tmp_path, monkeypatch):
    monkeypatch.setitem(EVALUATORS._entries, "mean_colour", MeanColour)
    images, pixels = normalised(12, 16, seed=2)
    settings = dict(store=tmp_path / "p.h5", progress=False, topk={"layers": ["c3"], "k": 4},
                    relevance={"target_layer": "c3", "neurons": [0, 1], "attribution_layers": ["c2"], "n_refs": 4},
                    evaluate={"references": ["mean_colour"]})
    with pytest.raises(ConfigError) as refused:
        Experiment(model=tiny(seed=1), dataset=Items(images, np.zeros(12)), **settings)
    message = str(refused.value)
    assert "\n" not in message and "mean_colour" in message
    assert "mean=..., std=..." in message and "to_pixels" in message

    exp = Experiment(model=tiny(seed=1), dataset=Items(images, np.zeros(12)), mean=MEAN.flatten().tolist(),
                     std=STD.flatten().tolist(), **settings)
    for i in (0, 5):
        torch.testing.assert_close(exp.dataset.view(i), pixels[i], rtol=0, atol=1e-6)
    exp.run(["topk", "relevance", "embed"])
    with h5py.File(tmp_path / "p.h5", "r") as f:
        refs = f["topk/c3/indices"][[0, 1], :4]
        expected = np.stack([[pixels[int(i)].mean((1, 2)).numpy() for i in row] for row in refs])
        np.testing.assert_allclose(f["embeddings/mean_colour/c3"][()], expected, atol=1e-6)

    # other pixels make other embeddings: the stored ones are not reused
    calls = MeanColour.calls
    Experiment(model=tiny(seed=1), dataset=Items(images, np.zeros(12)), mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2],
               **settings).embed()
    assert MeanColour.calls > calls


def test_other_ways_to_pixels():
    grey = [torch.tensor([[[0, 51], [255, 102]]], dtype=torch.uint8)]
    identity = WrappedDataset(Items(grey, [0]), to_pixels="identity")
    torch.testing.assert_close(identity.view(0), torch.tensor([[[0, 0.2], [1, 0.4]]]))
    halved = WrappedDataset(Items([torch.full((1, 2, 2), 3.0)], [0]), to_pixels=lambda image: image / 4 - 0.5)
    torch.testing.assert_close(halved.view(0), torch.full((1, 2, 2), 0.25))
    # out-of-range pixels are clamped in the view only
    items = [torch.full((1, 2, 2), 5.0)]
    assert WrappedDataset(Items(items, [0]), to_pixels="identity").view(0).max() == 1 and items[0].max() == 5
    with pytest.raises(ConfigError, match="channels"):
        WrappedDataset(Items(items, [0]), mean=[0.1, 0.2, 0.3], std=[1, 1, 1]).view(0)
    with pytest.raises(ConfigError, match="to_pixels='identity'"):
        WrappedDataset(Items(items, [0])).view(0)
    with pytest.raises(ConfigError, match="not both"):
        WrappedDataset(Items(items, [0]), mean=[0.5], std=[0.5], to_pixels="identity")


def test_the_report_says_why_it_has_no_thumbnails(tmp_path, caplog):
    images, _ = normalised(12, 16, seed=3)
    exp = Experiment(model=tiny(seed=1), dataset=Items(images, np.arange(12) % 2), store=tmp_path / "t.h5",
                     progress=False, topk={"layers": ["c3"], "k": 4},
                     relevance={"target_layer": "c3", "neurons": [0], "attribution_layers": ["c2"], "n_refs": 4},
                     report={"neurons": 1})
    with caplog.at_level("INFO", logger="polypure"):
        exp.run()
    html = exp.report_path.read_text()
    assert "No thumbnails" in html and "mean=..., std=..." in html
    assert not (exp.report_path.parent / "thumbs").exists()
    assert any("no thumbnails" in r.getMessage() for r in caplog.records)


def test_data_settings_that_would_not_apply_are_refused():
    dataset = Items(normalised(4, 8)[0], [0, 1, 2, 3])
    with pytest.raises(ConfigError, match=r"data.normalize does not apply .* mean=..., std=...") as refused:
        Experiment(model=tiny(), dataset=dataset, data={"normalize": "imagenet"})
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="data.image_size does not apply"):
        Experiment(model=tiny(), dataset=dataset, data={"image_size": 224})
    with pytest.raises(ConfigError, match="data.normalize does not apply"):
        Experiment({"data": {"normalize": {"mean": [0.5], "std": [0.5]}}}, model=tiny(), dataset=dataset)
    exp = Experiment(model=tiny(), dataset=dataset, data={"batch_size": 3, "num_workers": 0})
    assert exp.config.data.kind == "memory" and exp.config.data.batch_size == 3
    with pytest.raises(ConfigError, match="Experiment\\(dataset=...\\).*data.normalize"):
        Experiment("demo", mean=[0.5], std=[0.5])
    with pytest.raises(ConfigError, match="makes its own pixels"):
        Experiment(model=tiny(), dataset=random_images(4, 8), to_pixels="identity")


def test_inspect_shows_only_the_data_settings_of_an_in_memory_dataset(tmp_path):
    images, _ = normalised(8, 16)
    Experiment(model=tiny(), dataset=Items(images, np.arange(8) % 2), store=tmp_path / "m.h5", progress=False,
               data={"batch_size": 4}, topk={"layers": ["c3"], "k": 2},
               relevance={"target_layer": "c3", "attribution_layers": ["c1"], "n_refs": 2}).topk()
    text = describe(tmp_path / "m.h5")
    data = text.split("\n  data:\n", 1)[1].split("\n  topk:", 1)[0]
    assert data.split() == ["kind:", "memory", "batch_size:", "4", "num_workers:", "0"]
    assert "image_size" not in text and "normalize" not in text
    assert "labelled 8, from a dataset passed from Python" in text
    assert set(MEMORY_DATA_SHOWN) == {"kind", *MEMORY_DATA_KEYS}

    from polypure.config.settings import load_config
    built = load_config("demo").to_yaml()
    assert shown_config(built) == built


def test_a_factory_dataset_prepares_pixel_items_without_changing_them():
    pixels = [torch.full((3, 10, 12), 1.5)]
    ds = FactoryDataset(Items(pixels, [2]), image_size=8, mean=[0.5], std=[0.5])
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and torch.allclose(image, torch.ones(3, 8, 8)) and label == 2
    assert ds.view(0).max() == 1 and pixels[0].max() == 1.5
