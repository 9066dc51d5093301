"""Must-show 5: the trained crp-fashion CNN on its real images, from a config, end to end."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.core import Composite

from polypure.cli import main
from polypure.config.settings import load_config
from polypure.data.datasets import build_dataset
from polypure.models.factory import create_model

from .helpers import REPO, shared_data


@pytest.fixture
def fashion_overrides(tmp_path):
    folder = shared_data("crp-fashion")
    return [f"model.weights={folder / 'fashion_model.safetensors'}", f"data.path={folder / 'fashion_val.npz'}",
            f"store={tmp_path / 'fashion.h5'}",
            f"model.name=python:{REPO / 'configs' / 'crp_fashion_model.py'}:fashion_cnn"]


def test_crp_fashion_full_run(fashion_overrides, tmp_path, capsys):
    assert main(["run", str(REPO / "configs" / "crp_fashion.yaml"), "--stages", "topk,relevance", "-q",
                 "--set", *fashion_overrides]) == 0
    with h5py.File(tmp_path / "fashion.h5", "r") as f:
        assert len(f["samples/ids"]) == 5000
        assert f["topk/block_2/indices"].shape == (120, 50)
        for target, layers in (("block_2", ["block_0", "block_1"]), ("logits", ["block_0", "block_1", "block_2"])):
            group = f[f"relevance/{target}"]
            assert group["complete"][()].all()
            for layer in layers:
                data = group[layer][()]
                assert np.isfinite(data).all()
        # each logit's top references are mostly its own class: a trained model, real data
        labels = f["samples/labels"][()]
        refs = f["topk/logits/indices"][()]
        purity = np.mean([np.mean(labels[refs[c]] == c) for c in range(10)])
        assert purity > 0.9
        relevance = f["relevance/block_2/block_1"][()]
        neurons = f["relevance/block_2/neurons"][()]
        refs = f["topk/block_2/indices"][()]

    # the stored vectors of this model (whose input shortcut bypasses block_0) equal crp's
    cfg = load_config(REPO / "configs" / "crp_fashion.yaml", fashion_overrides)
    model = create_model(cfg.model.name, cfg.model.weights)
    dataset = build_dataset(cfg.data, model)
    attribution = CondAttribution(model.module)
    for row in (0, 57, 119):
        k = int(neurons[row])
        x = torch.stack([dataset[int(i)][0] for i in refs[k, :50]]).requires_grad_(True)
        attr = attribution(x, [{"act3": [k]}], Composite(), record_layer=["pool"], start_layer="act3",
                           init_rel=lambda a: a.clamp(min=0))
        expected = ChannelConcept().attribute(attr.relevances["pool"] * attr.activations["pool"], abs_norm=True)
        np.testing.assert_allclose(relevance[row], expected.numpy(), atol=1e-5, rtol=0)
