"""Small networks for fast tests (random weights, seeded)."""

from __future__ import annotations

import torch
from torch import nn

from polypure.models.factory import ExplainedModel


class TinyNet(nn.Module):
    """Three conv stages and a linear head; ``bypass`` adds a shortcut from the input to the last stage."""

    def __init__(self, bypass: bool = False, classes: int = 4):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU()
        self.conv3, self.act3 = nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU()
        self.shortcut = nn.Conv2d(3, 16, 1, stride=4) if bypass else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        h = self.conv3(h)
        if self.shortcut is not None:
            h = h + self.shortcut(x)
        return self.fc(self.pool(self.act3(h)).flatten(1))


def tiny(seed: int = 0, bypass: bool = False) -> ExplainedModel:
    torch.manual_seed(seed)
    return ExplainedModel(TinyNet(bypass).eval(), layers={"c1": "act1", "c2": "act2", "c3": "act3",
                                                          "logits": "fc"})


def small_vit(seed: int = 0, depth: int = 3, classes: int = 5) -> nn.Module:
    """A random timm ViT for 32 px inputs: 4 patches of 8 px and a class token, width 32, 2 heads."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2,
                             num_classes=classes).eval()
