"""The crp-fashion CNN (FashionMNIST, 28x28 grey) for ``model.name: python:configs/crp_fashion_model.py:fashion_cnn``.

Module names match the keys of ``fashion_model.safetensors`` in ``../shared/data/crp-fashion``; the
activations are modules of their own so that their outputs can be hooked as layers.
"""

import torch
from torch import nn

from polypure.models.factory import ExplainedModel


class FashionCNN(nn.Module):
    """conv-bn-relu, a strided conv-bn with a parallel strided conv-bn shortcut, pool, two linear layers."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.parallel = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2, bias=False), nn.BatchNorm2d(16))
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.linear1 = nn.Linear(576, 120)
        self.act3 = nn.ReLU()
        self.linear2 = nn.Linear(120, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of a batch of (B, 1, 28, 28) images."""
        h = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        h = self.pool(self.act2(h + self.parallel(x)))
        return self.linear2(self.act3(self.linear1(h.flatten(1))))


def fashion_cnn(classes: int = 10) -> ExplainedModel:
    """The network with layer aliases; weights come from ``model.weights`` (the safetensors file)."""
    return ExplainedModel(FashionCNN(classes), layers={"block_0": "act1", "block_1": "pool", "block_2": "act3",
                                                       "logits": "linear2"},
                          preprocessing={"mean": [0.0], "std": [1.0]})
