"""The demo Vision Transformer: a small timm ViT trained on synthetic concept images with merged-shape labels.

A :class:`timm.models.vision_transformer.VisionTransformer` (64 px input, 8 x 8 = 64 patch tokens plus a
class token; width 128, 4 blocks of 4 heads, MLP ratio 4, no dropout) with a linear classifier on the class
token over the same four classes as the demo ResNet (:mod:`polypure.models.demo_resnet`): each class is two
unrelated shapes (:data:`polypure.data.synthetic.CLASS_PAIRS`), so every logit is polysemantic by construction,
with its two shapes as the known sub-concepts.

Its patches are embedded by a small convolutional stem (:class:`ConvStem`, four 3 x 3 convolutions, three
of stride 2) instead of one 8 x 8 linear projection, as in Xiao et al. 2021, "Early convolutions help
transformers see better". Why: with the linear patch embedding the ViT learned the shape classes too slowly
for a demo trained on 2 cores (held-out accuracy 0.42 after 32 000 images; 0.77 with a 2-convolution stem;
the demo ResNet has 0.83 there), while this stem reached 0.9 and more. The transformer above the stem is
timm's own, so the model has what polypure looks for in a timm ViT: ``blocks.0`` .. ``blocks.3`` with their
tokens laid out (B, T, D) = (B, 65, 128), ``blocks.i.mlp.act``, and timm's attention modules. Aliases:
``block_0`` .. ``block_3`` (the blocks' outputs), ``mlp_0`` .. ``mlp_3`` (the MLPs' hidden neurons) and
``logits`` (``head``). The stem's batch norms follow convolutions: ``merge_bn`` merges them for LRP.

The trained weights ship with polypure (``assets/demo_vit.safetensors``) together with the training
settings, the held-out accuracy they reached and how long training took (``assets/demo_vit.json``);
``polypure demo-train --model demo_vit`` retrains them.

Example
-------
>>> from polypure.models.factory import create_model
>>> model = create_model("demo_vit", weights="DEFAULT")     # doctest: +SKIP
>>> model.layers["block_3"], model.layers["logits"]         # doctest: +SKIP
('blocks.3', 'head')
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from polypure.config.paths import require_output_folder
from polypure.data.synthetic import CLASS_PAIRS
from polypure.models.demo_resnet import ASSETS, MEAN, STD, fit
from polypure.models.factory import ExplainedModel, apply_state_dict, load_state_dict_file

WEIGHTS = ASSETS / "demo_vit.safetensors"
CARD = ASSETS / "demo_vit.json"
#: The architecture, as passed to timm's VisionTransformer (and recorded in the card), with :class:`ConvStem`
#: as its patch embedding.
ARCHITECTURE = {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0,
                "class_token": True, "global_pool": "token"}
#: Channels of the stem's convolutions before the last, which maps to ``embed_dim``.
STEM = (32, 64, 64)
#: Training settings that are not arguments of :func:`train_demo_vit` (recorded in the card).
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
WARMUP = 0.15
CLIP_NORM = 1.0


class ConvStem(nn.Module):
    """The patch embedding of the demo ViT: 3 x 3 convolutions down to one token per 8 x 8 patch.

    Takes the place of timm's ``PatchEmbed`` (``embed_layer=ConvStem``): (B, 3, 64, 64) images become
    (B, 64, embed_dim) tokens. Convolutions of 32, 64 and 64 channels (strides 2, 2, 1), each with a batch
    norm and a ReLU, then one of stride 2 to ``embed_dim``: a receptive field of 31 px per token.

    Parameters
    ----------
    img_size, patch_size, in_chans, embed_dim
        As timm passes them to a patch embedding; ``patch_size`` must be 8 (three stride-2 convolutions).
    **kwargs
        Other arguments timm passes (``bias``, ``dynamic_img_pad``, ...), unused.
    """

    def __init__(self, img_size: int = 64, patch_size: int = 8, in_chans: int = 3, embed_dim: int = 128,
                 **kwargs):
        super().__init__()
        if patch_size != 8:
            raise ValueError("ConvStem makes 8 x 8 px patches")
        # what timm's VisionTransformer reads from its patch embedding
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad, self.flatten, self.output_fmt = False, True, "NCHW"
        layers, width = [], in_chans
        for channels, stride in zip(STEM, (2, 2, 1)):
            layers += [nn.Conv2d(width, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
            width = channels
        self.proj = nn.Sequential(*layers, nn.Conv2d(width, embed_dim, 3, 2, 1))
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images to (B, H/8 * W/8, embed_dim) tokens."""
        return self.proj(x).flatten(2).transpose(1, 2)


def build_vit(classes: int = len(CLASS_PAIRS)) -> nn.Module:
    """The demo ViT with random weights: timm's VisionTransformer of :data:`ARCHITECTURE` with :class:`ConvStem`.

    Parameters
    ----------
    classes : int

    Returns
    -------
    timm.models.vision_transformer.VisionTransformer
    """
    from timm.models.vision_transformer import VisionTransformer

    # every dropout and drop-path rate is timm's default 0: training and eval give the same function
    return VisionTransformer(num_classes=classes, embed_layer=ConvStem, **ARCHITECTURE)


def demo_vit(weights: str | None = None, classes: int = len(CLASS_PAIRS)) -> ExplainedModel:
    """The demo ViT; ``weights="DEFAULT"`` loads the shipped trained weights.

    Parameters
    ----------
    weights : str, optional
        None for random initialisation, ``DEFAULT`` for the shipped weights.
    classes : int

    Returns
    -------
    ExplainedModel
        With aliases ``block_0`` .. ``block_3`` (``blocks.0`` .. ``blocks.3``) and ``logits`` (``head``)
        (:func:`polypure.models.factory.create_model` adds ``mlp_0`` .. ``mlp_3``), the preprocessing of the demo
        ResNet (mean 0.3, std 0.25), and ``merge_bn`` for zennit's LRP composites (the stem's batch norms).

    Raises
    ------
    ConfigError
        For a weights tag other than ``DEFAULT``.
    """
    module = build_vit(classes)
    if weights is not None:
        if weights != "DEFAULT":
            from polypure.errors import ConfigError
            raise ConfigError(f"model.weights: demo_vit knows the tag 'DEFAULT' or a local file, not {weights!r}")
        apply_state_dict(module, load_state_dict_file(WEIGHTS), str(WEIGHTS))
    layers = {f"block_{i}": f"blocks.{i}" for i in range(ARCHITECTURE["depth"])}
    layers["logits"] = "head"
    # same normalisation as the demo ResNet, so both models read the same images the same way
    return ExplainedModel(module, layers=layers, preprocessing={"mean": list(MEAN), "std": list(STD)},
                          canonizers=["merge_bn"])


def train_demo_vit(out: Path | None = None, epochs: int = 18, per_epoch: int = 5000, held_out: int = 1000,
                   seed: int = 0, batch: int = 64, lr: float = 2e-3, progress: bool = True) -> dict:
    """Train the demo ViT from a fixed seed and save its weights and card.

    Every epoch draws fresh synthetic images (seed ``1000 + seed * 100 + epoch``, as for the demo ResNet);
    the held-out set uses seed ``999_999 - seed`` and the demo data uses seed 0, so neither is ever trained
    on. AdamW (weight decay :data:`WEIGHT_DECAY`) with a one-cycle schedule (warm-up :data:`WARMUP` of the
    steps), label smoothing :data:`LABEL_SMOOTHING` and gradients clipped to norm :data:`CLIP_NORM`.

    Parameters
    ----------
    out : Path, optional
        Folder for ``demo_vit.safetensors`` and ``demo_vit.json`` (default: the package's assets).
    epochs, per_epoch, held_out, seed, batch, lr
        Training settings, recorded in the card.
    progress : bool

    Returns
    -------
    dict
        The card: architecture, settings, held-out accuracy per epoch, training time.
    """
    from safetensors.torch import save_file

    # checked before the minutes of training, not when the weights are saved
    out = require_output_folder(out, "--out") if out is not None else ASSETS
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps = epochs * ((per_epoch + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=WARMUP)
    start = time.time()
    # a transformer trained from scratch at a high learning rate: clipping keeps early steps stable
    history = fit(model, optimizer, schedule, epochs=epochs, per_epoch=per_epoch, held_out=held_out, seed=seed,
                  batch=batch, progress=progress, label_smoothing=LABEL_SMOOTHING, clip_norm=CLIP_NORM)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS.name))
    card = {
        "model": "demo_vit", "classes": ["|".join(p) for p in CLASS_PAIRS],
        "architecture": {"class": "timm.models.vision_transformer.VisionTransformer", **ARCHITECTURE,
                         "num_classes": len(CLASS_PAIRS), "embed_layer": "polypure.models.demo_vit.ConvStem",
                         "stem": list(STEM)},
        "training": {"epochs": epochs, "images_per_epoch": per_epoch, "batch": batch, "lr": lr, "seed": seed,
                     "optimizer": f"AdamW(weight_decay={WEIGHT_DECAY}) with one-cycle schedule "
                                  f"(warm-up {WARMUP} of the steps), gradient norm clipped to {CLIP_NORM}",
                     "label_smoothing": LABEL_SMOOTHING,
                     "data": "fresh synthetic images every epoch (polypure.data.synthetic.render, 64 px)",
                     "normalize": {"mean": list(MEAN), "std": list(STD)}},
        "held_out": {"images": held_out, "seed": 999_999 - seed, "accuracy": history[-1]},
        "accuracy_per_epoch": history,
        "seconds": round(time.time() - start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (out / CARD.name).write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_card(folder: Path | None = None) -> dict:
    """The training card of the shipped (or retrained) demo ViT weights."""
    return json.loads(((Path(folder) if folder else ASSETS) / CARD.name).read_text())
