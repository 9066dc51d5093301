"""The demo model: a small ResNet trained on synthetic concept images with merged-shape labels.

Four stages of torchvision BasicBlocks (so the aliases block_0..block_3 and zennit's ResNet canonizer
apply as for ResNet-34), a linear classifier (alias ``logits``) over four classes, each class being two
unrelated shapes (:data:`polypure.data.synthetic.CLASS_PAIRS`). Every logit is therefore polysemantic by
construction, with its two shapes as the known sub-concepts.

The trained weights ship with polypure (``assets/demo_resnet.safetensors``) together with the training
settings and the held-out accuracy they reached (``assets/demo_resnet.json``); ``polypure demo-train``
retrains them.

Example
-------
>>> from polypure.models.factory import create_model
>>> model = create_model("demo_resnet", weights="DEFAULT")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from polypure.config.paths import require_output_folder
from polypure.data.synthetic import CLASS_PAIRS, class_of_shape, render
from polypure.models.factory import ExplainedModel, apply_state_dict, load_state_dict_file

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "demo_resnet.safetensors"
CARD = ASSETS / "demo_resnet.json"
MEAN, STD = (0.3, 0.3, 0.3), (0.25, 0.25, 0.25)
WIDTHS = (16, 32, 64, 128)


def _stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample))


class DemoResNet(nn.Module):
    """A ResNet with one BasicBlock per stage, widths 16-32-64-128, for 64 x 64 images."""

    def __init__(self, classes: int = len(CLASS_PAIRS)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(WIDTHS[0], WIDTHS[0], 1)
        self.layer2 = _stage(WIDTHS[0], WIDTHS[1], 2)
        self.layer3 = _stage(WIDTHS[1], WIDTHS[2], 2)
        self.layer4 = _stage(WIDTHS[2], WIDTHS[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTHS[3], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of a batch of images."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def demo_resnet(weights: str | None = None, classes: int = len(CLASS_PAIRS)) -> ExplainedModel:
    """The demo ResNet; ``weights="DEFAULT"`` loads the shipped trained weights.

    Parameters
    ----------
    weights : str, optional
        None for random initialisation, ``DEFAULT`` for the shipped weights.
    classes : int
    """
    module = DemoResNet(classes)
    if weights is not None:
        if weights != "DEFAULT":
            from polypure.errors import ConfigError
            raise ConfigError(f"model.weights: demo_resnet knows the tag 'DEFAULT' or a local file, not {weights!r}")
        apply_state_dict(module, load_state_dict_file(WEIGHTS), str(WEIGHTS))
    return ExplainedModel(module, preprocessing={"mean": list(MEAN), "std": list(STD)}, canonizers=["resnet"])


def _batches(images: np.ndarray, labels: np.ndarray, batch: int, shuffle: np.random.Generator | None):
    order = shuffle.permutation(len(images)) if shuffle is not None else np.arange(len(images))
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div_(255)
        yield (x - mean) / std, torch.from_numpy(labels[idx])


def evaluate_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of the demo model on uint8 images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in _batches(images, labels, batch, None):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(labels)


def fit(model: nn.Module, optimizer, schedule, *, epochs: int, per_epoch: int, held_out: int, seed: int,
        batch: int, progress: bool, label_smoothing: float = 0.0, clip_norm: float | None = None) -> list[float]:
    """Train a demo model on fresh synthetic images with merged-shape labels; its held-out accuracy per epoch.

    The loop both demo models share. Every epoch draws fresh images (seed ``1000 + seed * 100 + epoch``) and
    visits them in an order drawn from ``numpy.random.default_rng(seed)``; the held-out set uses seed
    ``999_999 - seed``.

    Parameters
    ----------
    model : Module
    optimizer, schedule
        A torch optimizer and a learning-rate scheduler stepped after every batch.
    epochs, per_epoch, held_out, seed, batch
        As in :func:`train_demo`.
    progress : bool
        A progress bar per epoch and a line with each epoch's accuracy.
    label_smoothing : float
        Of the cross-entropy loss.
    clip_norm : float, optional
        Largest gradient norm (none: not clipped).

    Returns
    -------
    list of float
        Held-out accuracy after each epoch, rounded to 4 digits.
    """
    from tqdm.auto import tqdm

    shape_class = class_of_shape()
    val_images, val_factors = render(held_out, seed=999_999 - seed)
    val_labels = shape_class[val_factors["shape"]]
    history = []
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        images, factors = render(per_epoch, seed=1000 + seed * 100 + epoch)
        labels = shape_class[factors["shape"]]
        model.train()
        bar = tqdm(total=per_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, y in _batches(images, labels, batch, rng):
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            schedule.step()
            bar.update(len(y))
        bar.close()
        accuracy = evaluate_accuracy(model, val_images, val_labels)
        history.append(round(accuracy, 4))
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: held-out accuracy {accuracy:.4f}")
    return history


def train_demo(out: Path | None = None, epochs: int = 12, per_epoch: int = 8000, held_out: int = 2000,
               seed: int = 0, batch: int = 128, lr: float = 3e-3, progress: bool = True) -> dict:
    """Train the demo ResNet from a fixed seed and save its weights and card.

    Every epoch draws fresh synthetic images (seed ``1000 + seed * 100 + epoch``); the held-out set uses
    seed ``999_999 - seed`` and the demo data uses seed 0, so neither is ever trained on.

    Parameters
    ----------
    out : Path, optional
        Folder for ``demo_resnet.safetensors`` and ``demo_resnet.json`` (default: the package's assets).
    epochs, per_epoch, held_out, seed, batch, lr
        Training settings, recorded in the card.
    progress : bool

    Returns
    -------
    dict
        The card: settings, held-out accuracy, training time.
    """
    from safetensors.torch import save_file

    # checked before the minutes of training, not when the weights are saved
    out = require_output_folder(out, "--out") if out is not None else ASSETS
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = DemoResNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((per_epoch + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    start = time.time()
    history = fit(model, optimizer, schedule, epochs=epochs, per_epoch=per_epoch, held_out=held_out, seed=seed,
                  batch=batch, progress=progress)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS.name))
    card = {
        "model": "demo_resnet", "classes": ["|".join(p) for p in CLASS_PAIRS],
        "training": {"epochs": epochs, "images_per_epoch": per_epoch, "batch": batch, "lr": lr, "seed": seed,
                     "optimizer": "AdamW(weight_decay=1e-4) with one-cycle schedule",
                     "data": "fresh synthetic images every epoch (polypure.data.synthetic.render, 64 px)",
                     "normalize": {"mean": list(MEAN), "std": list(STD)}},
        "held_out": {"images": held_out, "seed": 999_999 - seed, "accuracy": history[-1]},
        "accuracy_per_epoch": history,
        "seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    (out / CARD.name).write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_card(folder: Path | None = None) -> dict:
    """The training card of the shipped (or retrained) demo weights."""
    return json.loads(((Path(folder) if folder else ASSETS) / CARD.name).read_text())
