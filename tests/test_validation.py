"""Every name is checked before the first stage runs, with one line naming the key."""

from __future__ import annotations

import pytest
import torchvision

from polypure import Experiment
from polypure.cli import main, split_overrides
from polypure.config.settings import load_config
from polypure.errors import ConfigError
from polypure.models.factory import ExplainedModel

from .helpers import random_images
from .nets import tiny

BASE = dict(
    topk={"layers": ["c3"], "k": 6},
    relevance={"targets": [{"layer": "c3", "neurons": "0:4", "attribution_layers": ["c1", "c2"]}],
               "n_refs": 4, "batch_size": 8},
)


def experiment(tmp_path, **changes):
    sections = {key: {**BASE.get(key, {}), **value} for key, value in changes.items()}
    return Experiment(model=tiny(seed=1), dataset=random_images(12, 16, seed=2), store=tmp_path / "s.h5",
                      progress=False, **{**BASE, **sections})


def target(**changes):
    return {"targets": [{**BASE["relevance"]["targets"][0], **changes}]}


@pytest.mark.parametrize("changes,message", [
    ({"relevance": {"composite": "epsilon_plus_flt"}}, "relevance.composite: unknown composite 'epsilon_plus_flt'"),
    ({"relevance": {"canonizers": ["resnt"]}}, "relevance.canonizers: unknown canonizer 'resnt'"),
    ({"relevance": target(attribution_layers=["c1", "c9"])},
     "relevance.targets[0].attribution_layers[1]: layer 'c9' is neither an alias nor a module"),
    ({"relevance": target(neurons=[2, 16])}, "relevance.targets[0].neurons: neuron 16 out of range for a layer with "
                                             "16 channels"),
    ({"cluster": {"methods": [{"name": "kmeens"}]}}, "cluster.methods[0] (kmeens): unknown clusterer 'kmeens'"),
    ({"cluster": {"methods": [{"name": "kmeans", "n_cluster": 3}]}}, "cluster.methods[0] (kmeans):"),
    ({"evaluate": {"ground_truth": ["shape"]}}, "evaluate.ground_truth: 'shape' is not known for this data"),
    ({"relevance": target(attribution_layers=["c1", "logits"])},
     "relevance.targets[0].attribution_layers[1]: 'logits' runs after the target layer 'c3'"),
    ({"relevance": target(attribution_layers=["c1", "c1"])}, "'c1' is listed twice"),
    ({"relevance": target(attribution_layers=["c3"])}, "'c3' is the target layer itself"),
    ({"topk": {"k": 13}, "relevance": {"n_refs": 4}}, "topk.k: 13 is more than the 12 samples of the data (valid: 1..12)"),
])
def test_bad_names_fail_before_any_stage(tmp_path, monkeypatch, changes, message):
    import polypure.attribution.topk
    calls = []
    monkeypatch.setattr(polypure.attribution.topk, "collect_topk", lambda *a, **k: calls.append(1))
    exp = experiment(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        exp.run()
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not calls                           # no top-K pass started
    assert not (tmp_path / "s.h5").exists()    # and nothing was written


def test_unknown_clusterer_parameter_is_named(tmp_path):
    exp = experiment(tmp_path, cluster={"methods": [{"name": "kmeans", "n_cluster": 3}]})
    with pytest.raises(ConfigError, match="n_cluster"):
        exp.validate()


def test_a_valid_config_passes_and_keeps_the_probed_shapes(tmp_path):
    exp = experiment(tmp_path).validate()
    assert exp.layer_shapes(["c1", "c3"]) == {"c1": (8, 16, 16), "c3": (16, 4, 4)}


def test_a_layer_typo_lists_the_closest_names():
    model = tiny()
    with pytest.raises(ConfigError, match=r"closest: c3") as info:
        model.submodule("c33")
    assert "aliases: c1, c2, c3, logits" in str(info.value)


def test_a_model_without_aliases_lists_its_top_level_modules():
    model = ExplainedModel(torchvision.models.convnext_tiny(), name="torchvision:convnext_tiny")
    with pytest.raises(ConfigError) as info:
        model.submodule("stage_3")
    text = str(info.value)
    assert "no aliases; top-level modules: features, avgpool, classifier" in text


def test_set_before_the_config_leaves_the_config_positional(tmp_path):
    assert split_overrides(["run", "--set", "topk.k=3", "relevance.n_refs=3", "my.yaml", "--overwrite"]) == [
        "run", "--set=topk.k=3", "--set=relevance.n_refs=3", "my.yaml", "--overwrite"]
    config = tmp_path / "c.yaml"
    images = tmp_path / "imgs"
    images.mkdir()
    config.write_text(f"model: {{name: torchvision:resnet18}}\ndata: {{kind: images, root: {images}}}\n")
    # the config after --set is read as the config (the empty image folder is the next problem)
    code = main(["topk", "--set", "topk.k=3", "relevance.n_refs=3", str(config)])
    assert code == 2


def test_a_bad_set_value_is_reported_as_a_set_value(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, ["topk.k=three"])
    assert str(info.value).startswith("--set topk.k=three: topk.k: Input should be a valid integer")
    config.write_text("name: x\ntopk: {k: three}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, ["relevance.n_refs=2"])
    assert str(info.value).startswith(f"{config}: topk.k:")


def test_class_ground_truth_is_known_from_the_items(tmp_path):
    import torch

    items = torch.utils.data.TensorDataset(torch.rand(12, 3, 16, 16), torch.arange(12) % 3)
    exp = Experiment(model=tiny(seed=1), dataset=items, to_pixels="identity", store=tmp_path / "s.h5",
                     progress=False, evaluate={"ground_truth": ["class"]}, **BASE)
    exp.validate()
    unlabelled = torch.utils.data.TensorDataset(torch.rand(12, 3, 16, 16))
    exp = Experiment(model=tiny(seed=1), dataset=unlabelled, to_pixels="identity", store=tmp_path / "t.h5",
                     progress=False, evaluate={"ground_truth": ["class"]}, **BASE)
    with pytest.raises(ConfigError, match="'class' is not known"):
        exp.validate()
