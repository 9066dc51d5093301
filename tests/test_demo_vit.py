"""The demo ViT: a plain timm VisionTransformer, its shipped weights and card, and reproducible training."""

from __future__ import annotations

import inspect

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from polypure.cli import main
from polypure.data.synthetic import class_of_shape, render
from polypure.errors import ConfigError
from polypure.models.demo_resnet import evaluate_accuracy
from polypure.models.demo_vit import ARCHITECTURE, ConvStem, load_card, train_demo_vit
from polypure.models.factory import create_model


@pytest.fixture(scope="module")
def shipped():
    return create_model("demo_vit", weights="DEFAULT")


def test_shipped_weights_are_accurate_on_new_images(shipped):
    # a seed that neither training (1000 + epoch), the card's held-out set (999_999) nor the demo (0) uses
    images, factors = render(400, seed=31337)
    assert evaluate_accuracy(shipped.module, images, class_of_shape()[factors["shape"]]) >= 0.95


def test_card_records_the_training_defaults_and_its_accuracy():
    card = load_card()
    assert card["model"] == "demo_vit"
    assert card["held_out"]["accuracy"] >= 0.95
    assert card["held_out"]["accuracy"] == card["accuracy_per_epoch"][-1]
    assert len(card["accuracy_per_epoch"]) == card["training"]["epochs"]
    defaults = {k: p.default for k, p in inspect.signature(train_demo_vit).parameters.items()}
    training = card["training"]
    assert (training["epochs"], training["images_per_epoch"], training["batch"], training["lr"], training["seed"]) \
        == (defaults["epochs"], defaults["per_epoch"], defaults["batch"], defaults["lr"], defaults["seed"])
    assert card["held_out"] == {"images": defaults["held_out"], "seed": 999_999 - defaults["seed"],
                                "accuracy": card["held_out"]["accuracy"]}
    assert {k: card["architecture"][k] for k in ARCHITECTURE} == ARCHITECTURE
    assert card["seconds"] > 0 and card["threads"] >= 1


def test_model_is_a_timm_vit_with_a_conv_stem_aliases_and_token_layout(shipped):
    module = shipped.module
    assert type(module) is VisionTransformer and isinstance(module.patch_embed, ConvStem)
    assert not module.training and shipped.canonizers == ["merge_bn"]
    assert shipped.layers == {**{f"block_{i}": f"blocks.{i}" for i in range(4)},
                              **{f"mlp_{i}": f"blocks.{i}.mlp.act" for i in range(4)}, "logits": "head"}
    assert shipped.preprocessing == {"mean": [0.3] * 3, "std": [0.25] * 3}
    seen = {}
    handle = shipped.submodule("block_0").register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        logits = module(torch.zeros(3, 3, 64, 64))
    handle.remove()
    assert seen["out"].shape == (3, 65, 128)            # class token + 8 x 8 patches, width 128
    assert logits.shape == (3, 4)
    assert isinstance(shipped.submodule("blocks.0.mlp.act"), torch.nn.GELU)


def test_other_weight_tags_are_refused():
    with pytest.raises(ConfigError, match="demo_vit knows the tag 'DEFAULT'"):
        create_model("demo_vit", weights="IMAGENET1K_V1")


@pytest.mark.slow
def test_training_is_reproducible(tmp_path):
    cards = [train_demo_vit(tmp_path / str(i), epochs=1, per_epoch=256, held_out=64, progress=False)
             for i in range(2)]
    assert cards[0]["accuracy_per_epoch"] == cards[1]["accuracy_per_epoch"]
    assert (tmp_path / "0" / "demo_vit.safetensors").read_bytes() == \
        (tmp_path / "1" / "demo_vit.safetensors").read_bytes()
    # the written weights load into the factory's model
    model = create_model("demo_vit", weights=str(tmp_path / "0" / "demo_vit.safetensors"))
    assert model.layers["block_3"] == "blocks.3"


@pytest.mark.slow
def test_cli_trains_the_vit_when_asked(tmp_path, capsys):
    assert main(["demo-train", "--model", "demo_vit", "--out", str(tmp_path), "--epochs", "1",
                 "--per-epoch", "64", "-q"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert load_card(tmp_path)["training"]["images_per_epoch"] == 64
    assert (tmp_path / "demo_vit.safetensors").is_file() and not (tmp_path / "demo_resnet.json").exists()
