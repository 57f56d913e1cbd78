"""A worked example of bringing your own model and data set.

Point a job at these factories:

    training:
      model: digits_cnn:build
      dataset: digits_cnn:load

and make the module importable by the workers (in the trainer image, or
PYTHONPATH=examples/custom_model for `dtj local`).
"""

from __future__ import annotations

from dtj_trainer.data import Dataset, digits
from torch import nn


def build(num_features: int, num_classes: int) -> nn.Module:
    """A small CNN over the 8x8 digit images (64 features -> 1x8x8). Its BatchNorm
    running statistics are buffers: state syncs average them with the parameters,
    and evaluation runs in eval() mode on them."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, num_classes),
    )


def load(seed: int) -> Dataset:
    """Any offline data works; here, the bundled digits again."""
    return digits(seed)
