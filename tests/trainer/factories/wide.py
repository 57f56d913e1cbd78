"""A model of ~40 MB (10M float32 parameters) for the hand-off tests: big enough that
hand-offs kept in the coordinator's store would show."""

from __future__ import annotations

from torch import nn


def build(num_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(num_features, 150_000), nn.ReLU(), nn.Linear(150_000, num_classes)
    )
