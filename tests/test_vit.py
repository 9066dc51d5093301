"""Vision transformers: token-layout layers, aliases, relevance equal to plain autograd, top-K over tokens."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from polypure import Experiment
from polypure.attribution.engine import ConditionalRelevance, channel_init
from polypure.attribution.hooks import probe_layers
from polypure.attribution.topk import channel_statistic
from polypure.errors import ConfigError, PolypureError
from polypure.models.factory import ExplainedModel, attach_layers, create_model

from .helpers import random_images
from .nets import small_vit


def test_timm_vit_gets_block_mlp_and_logits_aliases_and_token_layers_are_read_channels_first():
    model = create_model("timm:vit_tiny_patch16_224", img_size=32)
    assert [model.layers[f"block_{i}"] for i in (0, 11)] == ["blocks.0", "blocks.11"]
    assert model.layers["mlp_3"] == "blocks.3.mlp.act" and model.layers["logits"] == "head"
    assert model.module_path("block_2.attn.qkv") == "blocks.2.attn.qkv"
    assert model.channel_axis("block_0") == "tokens" and model.channel_axis("mlp_0") == "tokens"
    assert model.canonizers == []
    layers = {name: model.submodule(name) for name in ["block_0", "mlp_1", "logits", "patch_embed.proj"]}
    shapes, _ = probe_layers(model.module, layers, torch.randn(2, 3, 32, 32))
    # 4 patches + the class token are positions; 192 channels, 768 MLP neurons, 1000 logits
    assert shapes == {"block_0": (192, 5), "mlp_1": (768, 5), "logits": (1000,), "patch_embed.proj": (192, 2, 2)}


def test_open_clip_dinov2_and_torchvision_vits_are_recognised():
    clip = create_model("open_clip:ViT-B-32")
    assert clip.layers["block_11"] == "transformer.resblocks.11"
    assert clip.layers["mlp_0"] == "transformer.resblocks.0.mlp.gelu" and "logits" not in clip.layers
    assert clip.preprocessing["image_size"] == 224 and clip.channel_axis("block_0") == "tokens"
    dinov2 = create_model("timm:vit_small_patch14_dinov2", img_size=56)
    assert dinov2.layers["mlp_11"] == "blocks.11.mlp.act" and "logits" not in dinov2.layers   # no head
    assert dinov2.preprocessing["image_size"] == 56                    # the size it was built for, not 518
    # a hybrid ViT: its convolutional stem's maps stay channels first, its tokens are (D, T)
    hybrid = create_model("timm:vit_tiny_r_s16_p8_224", img_size=64)
    layers = {name: hybrid.submodule(name) for name in ["patch_embed.backbone.norm", "patch_embed", "block_0"]}
    shapes, _ = probe_layers(hybrid.module, layers, torch.randn(1, 3, 64, 64))
    assert shapes == {"patch_embed.backbone.norm": (64, 32, 32), "patch_embed": (192, 4), "block_0": (192, 5)}
    from torchvision.models import VisionTransformer as TorchvisionViT
    tv = attach_layers(ExplainedModel(TorchvisionViT(32, 8, 2, 2, 16, 32, num_classes=3)))
    assert tv.layers["block_1"] == "encoder.layers.encoder_layer_1" and tv.layers["logits"] == "heads.head"
    shapes, _ = probe_layers(tv.module, {"mlp_0": tv.submodule("mlp_0")}, torch.randn(1, 3, 32, 32))
    assert shapes == {"mlp_0": (32, 17)}


@pytest.mark.parametrize("target,layers", [("block_2", ["block_0", "mlp_1", "block_1.attn"]),
                                           ("mlp_2", ["block_1", "block_2.norm1"]),
                                           ("logits", ["block_2", "mlp_2"])])
def test_gradient_x_activation_on_a_vit_equals_plain_autograd(target, layers):
    model = attach_layers(ExplainedModel(small_vit(seed=3)))
    images = torch.randn(3, 3, 32, 32)
    rows, neurons = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([1, 1, 4, 3, 0])
    engine = ConditionalRelevance(model.module, {target: model.submodule(target)},
                                  {name: model.submodule(name) for name in layers})
    with engine:
        got = engine(images, rows, channel_init(neurons))

    # independent: every row its own image, (B, T, D) outputs as the network makes them, and channel k's
    # clamped activation at every token as the initial gradient
    outputs = {}
    handles = [model.submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
               for name in [target, *layers]]
    try:
        with torch.enable_grad():
            model.module(images[rows].requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    out = outputs[target]
    init = torch.zeros_like(out)
    for j, k in enumerate(neurons.tolist()):
        init[j, ..., k] = out[j, ..., k].clamp(min=0)
    grads = torch.autograd.grad(out, [outputs[name] for name in layers], init)
    for name, grad in zip(layers, grads):
        relevance = (grad * outputs[name]).sum(1)                      # summed over tokens
        expected = relevance / (relevance.abs().sum(1, keepdim=True) + 1e-10)
        assert got.relevance[name].shape == expected.shape == (5, 32 if "mlp" not in name else 64)
        torch.testing.assert_close(got.relevance[name], expected.detach(), atol=1e-5, rtol=0)
        assert expected.abs().sum() > 1                                 # not all zero


def _brute_force(module, layer_module, images, statistic):
    seen = []
    handle = layer_module.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        module(images)
    handle.remove()
    out = seen[0]
    if out.ndim == 2:
        return out
    return {"max": out.amax(1), "mean": out.mean(1), "cls": out[:, 0]}[statistic]


@pytest.mark.parametrize("statistic", ["max", "mean", "cls"])
def test_topk_over_tokens_equals_brute_force(tmp_path, statistic):
    module = small_vit(seed=1)
    dataset = random_images(30, 32, seed=2)
    exp = Experiment(model=module, dataset=dataset, store=tmp_path / "v.h5", progress=False,
                     data={"batch_size": 7}, topk={"layers": ["block_1", "mlp_2", "logits"], "k": 6,
                                                   "statistic": statistic},
                     relevance={"n_refs": 6, "target_layer": "logits", "attribution_layers": ["block_2"]})
    exp.topk()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with h5py.File(tmp_path / "v.h5", "r") as f:
        for layer, path in [("block_1", "blocks.1"), ("mlp_2", "blocks.2.mlp.act"), ("logits", "head")]:
            scores = _brute_force(module, module.get_submodule(path), images, statistic)
            values, indices = f[f"topk/{layer}/values"][:], f[f"topk/{layer}/indices"][:]
            assert values.shape == (scores.shape[1], 6)
            expected = torch.topk(scores.T, 6, dim=1)
            np.testing.assert_allclose(values, expected.values.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(indices, expected.indices.numpy())


class TokenMixer(nn.Module):
    """A network polypure does not know whose middle layer outputs (B, T, D) tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Conv2d(3, 12, 8, stride=8)
        self.mixer = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)            # (B, 16, 12)
        return self.head(torch.relu(self.mixer(tokens)).mean(1))


def test_a_declared_channel_axis_makes_any_token_layer_a_target(tmp_path):
    dataset = random_images(20, 32, seed=4)
    settings = dict(dataset=dataset, progress=False, topk={"layers": ["tokens"], "k": 5},
                    relevance={"targets": [{"layer": "tokens", "neurons": [0, 7], "attribution_layers": ["embed"]}],
                               "n_refs": 5})
    exp = Experiment({"model": {"layers": {"tokens": {"module": "mixer", "channel_axis": -1}}}},
                     model=TokenMixer(), store=tmp_path / "t.h5", **settings)
    exp.run(["topk", "relevance"])
    module = exp.model.module
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    scores = _brute_force(module, module.mixer, images, "max")
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["topk/tokens/values"].shape == (12, 5)                 # 12 channels, not 16 tokens
        np.testing.assert_array_equal(f["topk/tokens/indices"][:], torch.topk(scores.T, 5).indices.numpy())
        assert f["relevance/tokens/embed"].shape[-1] == 12


def test_cls_statistic_on_a_cnn_layer_is_one_line(tmp_path):
    from .nets import tiny
    exp = Experiment(model=tiny(), dataset=random_images(8, 32), store=tmp_path / "c.h5", progress=False,
                     topk={"layers": ["c2"], "k": 2, "statistic": "cls"},
                     relevance={"n_refs": 2, "target_layer": "logits", "attribution_layers": ["c2"]})
    with pytest.raises(ConfigError, match=r"topk.layers\[0\]: statistic 'cls' takes the class token"):
        exp.topk()
    assert not (tmp_path / "c.h5").exists()
    with pytest.raises(PolypureError, match="'cls' takes the class token"):
        channel_statistic(torch.zeros(2, 3, 4, 4), "cls")


def test_channel_axis_on_the_input_is_refused():
    with pytest.raises(ConfigError, match="model input is channels first"):
        attach_layers(ExplainedModel(small_vit()), {"x": {"module": "", "channel_axis": -1}})
